"""The benchmark script runs (on small arrays) and prints its ratios; it asserts no timing."""

from __future__ import annotations

import subprocess
import sys

from support import TOP


def test_benchmark_script_runs_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(TOP / "benchmarks" / "run.py"), "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ratio arr[:] ours/theirs") == 2
    assert done.stdout.count("ratio into one preallocated out= ours/theirs") == 1
    assert done.stdout.count("ratio our bulk read trio/asyncio") == 2
    assert done.stdout.count("ratio zip arr[:] ours/theirs") == 1


def test_remote_benchmark_script_runs_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(TOP / "benchmarks" / "remote.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio our ObjectStore / zarr's ObjectStore" in done.stdout
    assert done.stdout.count("of ideal") == 1
    assert "zarr.storage.ObjectStore" in done.stdout.split("## HTTP")[1]


def test_throttling_benchmark_runs_against_a_sliding_window() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(TOP / "benchmarks" / "throttling.py"),
            "--only",
            "sliding",
            "--count",
            "60",
            "--ceilings",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Sliding-window server" in done.stdout
    ours = [line for line in done.stdout.splitlines() if line.startswith("zarr_anyio.")]
    assert len(ours) == 4  # both backends, the oracle and ceiling 32
    assert not any("fails" in line for line in ours)
    assert "zarr.storage.ObjectStore" in done.stdout
