"""The benchmarks' HTTP servers, each in a process of its own (so that its CPU time and GIL are
not the client's): a script that prints its URL on its first line and stops when its stdin
closes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


@contextmanager
def server_process(script: str, *options: str) -> Iterator[str]:
    """Run ``benchmarks/<script>`` with ``options``; gives its URL, stops it at the end."""
    command = [sys.executable, str(HERE / script), *options]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        url = process.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the benchmark's HTTP server did not start: {url!r}")
        yield url
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
