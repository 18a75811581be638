"""zarr_anyio.api against zarr-python's own sync API, on the same zarr_anyio LocalStore, in one run.

    python3 benchmarks/api.py            # 512 x 1 MiB, 8,192 x 4 KiB, 256 x 1 MiB zstd; 1 GiB
    python3 benchmarks/api.py --quick    # small arrays, as the test suite runs it

Reads: ``await arr.getitem(...)`` of the whole array under trio (zarr's coroutines on the bridge
loop) and under asyncio (on the caller's loop), against zarr's sync ``arr[:]`` (on zarr's loop
thread), interleaved and repeated; medians and the ratios ours/zarr's (lower is better).

Memory: ``iter_blocks`` sums an array of 1 GiB in 1 MiB chunks with at most 64 blocks held, in a
fresh process, and prints its peak RSS growth against the bound 2 x (64 x 1 MiB) + 50 MiB.

Timings on a shared machine are noisy (the load average is printed): read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import zarr
import zarr.codecs

import zarr_anyio
import zarr_anyio.api as za

MIB = 1 << 20


def write_array(path: Path, chunk_bytes: int, chunks: int, compressors: Any) -> None:
    """A float64 array of ``chunks`` chunks, written a slab at a time (no whole copy in memory)."""
    items = chunk_bytes // 8
    arr = zarr.create_array(
        store=zarr_anyio.LocalStore(path),
        shape=(items * chunks,),
        chunks=(items,),
        dtype="float64",
        compressors=compressors,
    )
    slab = max(1, (64 * MIB) // chunk_bytes) * items
    for start in range(0, items * chunks, slab):
        stop = min(start + slab, items * chunks)
        arr[start:stop] = np.arange(start, stop, dtype="float64")


Timing = tuple[float, float]
"""Seconds of wall time and of this process's CPU time."""


def interleaved_medians(runs: dict[str, Callable[[], Timing]], repeat: int) -> dict[str, Timing]:
    """Run each ``repeat`` times, interleaved in a new order each round (a fixed order was seen
    to favour one place in it); the median wall time and CPU time of each."""
    results: dict[str, list[Timing]] = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            results[name].append(runs[name]())
    return {
        name: (statistics.median(t[0] for t in got), statistics.median(t[1] for t in got))
        for name, got in results.items()
    }


def bench_reads(
    folder: Path, label: str, chunk_bytes: int, chunks: int, compressors: Any, repeat: int
) -> list[str]:
    path = folder / f"{label}-{chunk_bytes}"
    write_array(path, chunk_bytes, chunks, compressors)
    # Read-only, so that opening with mode="r" uses this store and not a copy of it (a copy
    # starts its estimate of read costs afresh).
    store = zarr_anyio.LocalStore(path, read_only=True)
    last = float(chunk_bytes // 8 * chunks - 1)
    theirs = zarr.open_array(store=store, mode="r")
    # Both sides read with zarr's async.concurrency raised to the store's bound, as the API does.
    zarr_anyio.AsyncArray(theirs)

    def zarr_sync() -> Timing:
        wall, cpu = time.perf_counter(), time.process_time()
        result = np.asarray(theirs[:])
        timing = (time.perf_counter() - wall, time.process_time() - cpu)
        assert result[-1] == last
        return timing

    async def ours() -> Timing:
        arr = await za.open_array(store=store, mode="r")
        # No warm-up read of one chunk here: a hop carrying one read makes the store's estimate
        # of a read's cost jump, and the next big read go in smaller batches (more hops).
        wall, cpu = time.perf_counter(), time.process_time()
        result = await arr.getitem(...)
        timing = (time.perf_counter() - wall, time.process_time() - cpu)
        assert result[-1] == last
        return timing

    # One asyncio loop for every round, as a program has one (a new loop each round would start
    # new threads for the codecs zarr runs in the loop's default executor, each time).
    with asyncio.Runner() as runner:
        timings = interleaved_medians(
            {
                "zarr's sync arr[:]": zarr_sync,
                "zarr_anyio.api getitem under trio": lambda: anyio.run(ours, backend="trio"),
                "zarr_anyio.api getitem under asyncio": lambda: runner.run(ours()),
            },
            repeat,
        )
    lines = [
        f"\n## {label}: {chunks} chunks of {chunk_bytes // 1024} KiB (median of {repeat})",
        f"{'':40s} {'wall':>9s}     {'per chunk':>9s}      {'CPU':>9s}",
    ]
    for name, (wall, cpu) in timings.items():
        lines.append(
            f"{name:40s} {wall * 1000:9.1f} ms  {wall / chunks * 1e6:8.1f} µs  {cpu * 1000:9.1f} ms"
        )
    (sync, sync_cpu), (trio_run, trio_cpu), (asyncio_run, asyncio_cpu) = timings.values()
    lines.append(f"ratio getitem under trio / zarr's arr[:]:     {trio_run / sync:.2f}")
    lines.append(f"ratio getitem under asyncio / zarr's arr[:]:  {asyncio_run / sync:.2f}")
    lines.append(
        f"(CPU time: trio / zarr's {trio_cpu / sync_cpu:.2f}, "
        f"asyncio / zarr's {asyncio_cpu / sync_cpu:.2f})"
    )
    return lines


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reduce_in_this_process(path: str, limit: int) -> None:
    """The child: sum the array with iter_blocks under trio; print the peak RSS growth."""

    async def main() -> float:
        arr = await za.open_array(store=path, mode="r")
        baseline = rss_bytes()
        # The peak from here on: VmHWM, set afresh. (getrusage's ru_maxrss will not do: a child
        # inherits it from the parent it was forked from, whose RSS it then reports.)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        total = 0.0
        async with arr.iter_blocks(max_concurrency=limit) as blocks:
            async for _, data in blocks:
                total += float(data.sum())
        print(f"{total} {peak_rss_bytes() - baseline}")
        return total

    anyio.run(main, backend="trio")


def reduce_in_a_child(path: Path, limit: int, environment: dict[str, str]) -> tuple[float, int]:
    done = subprocess.run(
        [sys.executable, __file__, "--reduce", str(path), str(limit)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **environment},
    )
    total, growth = done.stdout.split()
    return float(total), int(growth)


def bench_iter_blocks(folder: Path, chunk_bytes: int, chunks: int, limit: int) -> list[str]:
    path = folder / "big.zarr"
    write_array(path, chunk_bytes, chunks, None)
    items = chunk_bytes // 8 * chunks
    bound = 2 * limit * chunk_bytes + 50 * MIB
    size = chunk_bytes * chunks
    lines = [
        f"\n## iter_blocks sum: {size / MIB:.0f} MiB in {chunks} chunks of "
        f"{chunk_bytes // 1024} KiB, at most {limit} blocks held; bound 2 x {limit} x chunk "
        f"+ 50 MiB = {bound / MIB:.0f} MiB (the array is {size / bound:.1f}x that)",
    ]
    # glibc keeps freed 1 MiB buffers in per-thread arenas once its mmap threshold has grown
    # past them, and RSS counts them; with the threshold pinned they go back to the system, so
    # the second figure is close to what the blocks themselves hold.
    for label, environment in (
        ("default malloc", {}),
        ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    ):
        total, growth = reduce_in_a_child(path, limit, environment)
        assert total == items * (items - 1) / 2
        lines.append(f"peak RSS growth, {label:30s} {growth / MIB:7.1f} MiB")
        if not environment:
            ratio = growth / bound
    lines.append(f"iter_blocks RSS growth / bound:             {ratio:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small arrays, few repetitions")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--reduce", nargs=2, metavar=("PATH", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reduce:
        reduce_in_this_process(args.reduce[0], int(args.reduce[1]))
        return 0
    repeat = args.repeat or (2 if args.quick else 9)
    scale = 16 if args.quick else 1
    zstd = zarr.codecs.ZstdCodec()
    cases = [
        ("raw", MIB, 512 // scale, None),
        ("raw", 4096, 8192 // scale, None),
        ("zstd", MIB, 256 // scale, zstd),
    ]
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"# zarr_anyio.api benchmarks (python {sys.version.split()[0]}, zarr {zarr.__version__})")
    print(f"load average before: {load} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as folder:
        for label, chunk_bytes, chunks, compressors in cases:
            for line in bench_reads(Path(folder), label, chunk_bytes, chunks, compressors, repeat):
                print(line, flush=True)
        print(f"zarr async.concurrency during the reads: {zarr.config.get('async.concurrency')}")
        blocks = 64 if args.quick else 1024
        for line in bench_iter_blocks(Path(folder), MIB, blocks, 4 if args.quick else 64):
            print(line, flush=True)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\nload average after: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
