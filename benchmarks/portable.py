"""What the portable paths (macOS, Windows) cost beside Linux's, measured on Linux.

    python benchmarks/portable.py [--repeat 7] [--small 2000] [--large 64]

One folder of chunk files (``--small`` of 4 KiB, ``--large`` of 1 MiB) is read key by key
(``await store.get(key)`` under asyncio, from the page cache) by three readers, each in a fresh
process: zarr-python's ``zarr.storage.LocalStore`` (the reference); our LocalStore with the
calls Linux has (``openat2``, ``preadv``, reads from the page cache on the event loop); and our
LocalStore in portable mode (``ZARR_ANYIO_PORTABLE=1``: paths resolved by ``lstat`` and
``readlink``, a seek and a read under a lock, every read in a worker thread), which is what
Windows runs, and macOS in part (it has ``pread`` and folder handles, not the loop reads).
Each reader reads every key ``--repeat`` times after one warm-up pass; the figure is the median
pass, in µs per read, and the ratio to zarr's store. The machine may be shared: the load
average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
READERS = {
    "zarr.storage.LocalStore": ("zarr", {}),
    "ours, Linux calls": ("ours", {}),
    "ours, portable (as Windows)": ("ours", {"ZARR_ANYIO_PORTABLE": "1"}),
}


def one_reader(kind: str, folder: str, repeat: int) -> dict[str, float]:
    """In a fresh process: the median pass over each size of chunk, in µs per read."""
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    import zarr_anyio

    prototype = default_buffer_prototype()
    store = zarr.storage.LocalStore(folder) if kind == "zarr" else zarr_anyio.LocalStore(folder)
    sizes = {"4 KiB": "small", "1 MiB": "large"}

    async def passes(prefix: str) -> float:
        keys = sorted(os.listdir(Path(folder, prefix)))
        times = []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            for key in keys:
                value = await store.get(f"{prefix}/{key}", prototype)
                assert value is not None
            times.append((time.perf_counter() - start) / len(keys) * 1e6)
        return statistics.median(times[1:])

    async def main() -> dict[str, float]:
        return {size: await passes(prefix) for size, prefix in sizes.items()}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=64)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_reader(args.one[0], args.one[1], args.repeat)))
        return
    with tempfile.TemporaryDirectory() as folder:
        for prefix, count, size in (("small", args.small, 4096), ("large", args.large, 1 << 20)):
            Path(folder, prefix).mkdir()
            for i in range(count):
                Path(folder, prefix, str(i)).write_bytes(os.urandom(size))
        results: dict[str, dict[str, float]] = {}
        for name, (kind, env) in READERS.items():
            done = subprocess.run(
                [sys.executable, __file__, "--repeat", str(args.repeat), "--one", kind, folder],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(TOP), **env},
            )
            results[name] = json.loads(done.stdout)
    print(f"load average {os.getloadavg()[0]:.1f}; µs per read (ratio to zarr's store)")
    print(f"{'reader':30} {'4 KiB':>16} {'1 MiB':>16}")
    reference = results["zarr.storage.LocalStore"]
    for name, figures in results.items():
        cells = [f"{figures[s]:8.1f} ({figures[s] / reference[s]:.2f})" for s in ("4 KiB", "1 MiB")]
        print(f"{name:30} {cells[0]:>16} {cells[1]:>16}")


if __name__ == "__main__":
    main()
