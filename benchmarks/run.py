"""Read speed of zarr_anyio's LocalStore against zarr-python's own, measured in one run.

    python3 tests/dev.py bench            # the full run (512 x 1 MiB and 8,192 x 4 KiB chunks)
    python3 tests/dev.py bench --quick    # a small run, as the test suite does

For each array (uncompressed, written once, read from the page cache) it measures, interleaving
the stores and repeating: zarr-python's ``arr[:]`` through ``zarr.storage.LocalStore`` and through
ours; a bulk read (``get_partial_values`` of every chunk key) through both; and our bulk read
under trio and under asyncio. It prints medians and the ratios ours/theirs (lower is better).
Timings on a shared machine are noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import zarr
import zarr.storage
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import zarr_anyio

PROTO = default_buffer_prototype()


def median_results(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Run each callable ``repeat`` times, interleaved, and give the median of what each returns."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            results[name].append(run())
    return {name: statistics.median(values) for name, values in results.items()}


def median_seconds(runs: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Run each callable ``repeat`` times, interleaved, and give the median time of each."""

    def timer(run: Callable[[], Any]) -> Callable[[], float]:
        def timed() -> float:
            started = time.perf_counter()
            run()
            return time.perf_counter() - started

        return timed

    return median_results({name: timer(run) for name, run in runs.items()}, repeat)


def bench_array(folder: Path, chunk_bytes: int, chunks: int, repeat: int) -> list[str]:
    items = chunk_bytes // 8
    path = folder / f"array-{chunk_bytes}"
    theirs = zarr.storage.LocalStore(path)
    ours = zarr_anyio.LocalStore(path)
    data = np.arange(items * chunks, dtype="float64")
    zarr.create_array(
        store=theirs, shape=data.shape, chunks=(items,), dtype="float64", compressors=None
    )[:] = data
    keys = [(f"c/{i}", None) for i in range(chunks)]

    def read_array(store: Any) -> None:
        assert zarr.open_array(store=store, mode="r")[-1] == data[-1]
        result = zarr.open_array(store=store, mode="r")[:]
        assert result.shape == data.shape

    def bulk_on_zarrs_loop(store: Any) -> None:
        results = sync(store.get_partial_values(PROTO, keys))
        assert len(results) == chunks

    async def bulk_ours() -> None:
        results = await ours.get_partial_values(PROTO, keys)
        assert all(result is not None for result in results)

    timings = median_seconds(
        {
            "zarr arr[:] via zarr.storage.LocalStore": lambda: read_array(theirs),
            "zarr arr[:] via zarr_anyio.LocalStore": lambda: read_array(ours),
            "get_partial_values, zarr.storage.LocalStore": lambda: bulk_on_zarrs_loop(theirs),
            "get_partial_values, zarr_anyio.LocalStore": lambda: bulk_on_zarrs_loop(ours),
            "zarr_anyio bulk read under asyncio": lambda: anyio.run(bulk_ours, backend="asyncio"),
            "zarr_anyio bulk read under trio": lambda: anyio.run(bulk_ours, backend="trio"),
        },
        repeat,
    )
    label = f"{chunks} chunks of {chunk_bytes // 1024} KiB"
    lines = [f"\n## {label} (median of {repeat}, zarr {zarr.__version__})"]
    for name, seconds in timings.items():
        lines.append(f"{name:48s} {seconds * 1000:9.1f} ms  {seconds / chunks * 1e6:8.1f} µs/chunk")
    names = list(timings)
    lines.append(
        f"ratio arr[:] ours/theirs:            {timings[names[1]] / timings[names[0]]:.2f}"
    )
    lines.append(
        f"ratio bulk read ours/theirs:         {timings[names[3]] / timings[names[2]]:.2f}"
    )
    lines.append(
        f"ratio our bulk read trio/asyncio:    {timings[names[5]] / timings[names[4]]:.2f}"
    )
    return lines


def bench_zip(folder: Path, chunk_bytes: int, chunks: int, repeat: int) -> list[str]:
    """zarr-python reading one array from a zip through zarr's ZipStore and through ours."""
    items = chunk_bytes // 8
    path = folder / f"array-{chunk_bytes}.zip"
    data = np.arange(items * chunks, dtype="float64")
    with zarr.storage.ZipStore(path, mode="w") as writer:
        zarr.create_array(
            store=writer, shape=data.shape, chunks=(items,), dtype="float64", compressors=None
        )[:] = data
    theirs = zarr.storage.ZipStore(path, mode="r")
    ours = zarr_anyio.ZipStore(path, mode="r")

    def read_array(store: Any) -> None:
        result = zarr.open_array(store=store, mode="r")[:]
        assert result[-1] == data[-1]

    timings = median_seconds(
        {
            "zarr arr[:] via zarr.storage.ZipStore": lambda: read_array(theirs),
            "zarr arr[:] via zarr_anyio.ZipStore": lambda: read_array(ours),
        },
        repeat,
    )
    theirs.close()
    ours.close()
    lines = [f"\n## zip: {chunks} chunks of {chunk_bytes // 1024} KiB (median of {repeat})"]
    for name, seconds in timings.items():
        lines.append(f"{name:48s} {seconds * 1000:9.1f} ms  {seconds / chunks * 1e6:8.1f} µs/chunk")
    first, second = timings.values()
    lines.append(f"ratio zip arr[:] ours/theirs:        {second / first:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small arrays, few repetitions")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 7)
    cases = [(1 << 20, 8), (4096, 64)] if args.quick else [(1 << 20, 512), (4096, 8192)]
    print(f"# zarr_anyio benchmarks (python {sys.version.split()[0]})")
    with tempfile.TemporaryDirectory() as folder:
        for chunk_bytes, chunks in cases:
            for line in bench_array(Path(folder), chunk_bytes, chunks, repeat):
                print(line, flush=True)
        for line in bench_zip(Path(folder), 4096, 100 if args.quick else 1000, repeat):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
