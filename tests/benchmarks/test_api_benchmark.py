"""The array API benchmark runs (on small arrays) and prints its ratios; it asserts no timing."""

from __future__ import annotations

import subprocess
import sys

from support import TOP


def test_api_benchmark_runs_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(TOP / "benchmarks" / "api.py"), "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ratio getitem under trio / zarr's arr[:]") == 3
    assert done.stdout.count("ratio getitem under asyncio / zarr's arr[:]") == 3
    assert "iter_blocks RSS growth / bound" in done.stdout
