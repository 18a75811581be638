"""The codec pipeline benchmark runs (on small arrays, one round) and prints every workload and
its tables; it asserts no timing."""

from __future__ import annotations

import subprocess
import sys

from support import TOP


def test_pipeline_benchmark_runs_quick() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(TOP / "benchmarks" / "pipeline.py"),
            "--quick",
            "--repeat",
            "1",
            "--no-writes",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("\n## read ") == 8
    assert out.count(", sharded:") == 2
    assert "arr[::3, 100:-100]" in out
    assert "blosc" in out
    assert "of window" in out
    assert "ours (api, trio), ObjectStore" in out
    assert "ours (api, asyncio), FsspecStore" in out
    assert "## markdown, local reads" in out
    assert "## markdown, remote reads" in out
