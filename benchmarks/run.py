"""Read speed of zarr_anyio's LocalStore against zarr-python's own, measured in the same runs.

    python3 tests/dev.py bench            # the full run (about ten minutes)
    python3 tests/dev.py bench --quick    # a small run, as the test suite does

The main figure is zarr-python's ``arr[:]`` through ``zarr.storage.LocalStore`` and through ours,
on the same data (written once by zarr's store, read from the page cache), for each workload:

* ``1-D 1 MiB``: float64, 512 chunks of 1 MiB, uncompressed;
* ``2-D 1 MiB``: float32 (262144, 512) in (512, 512) chunks, uncompressed;
* ``2-D 1 MiB zstd``: the same, zstd-compressed;
* ``1-D 4 KiB``: float64, 8,192 chunks of 4 KiB, uncompressed.

Each workload is read in ``--runs`` fresh processes (a process's history, such as what its
allocator has mapped, is part of what is measured). A run reads through both stores in turn,
``--repeat`` times, after one read of each to warm up, and gives the median of each; its figure is
the ratio ours / theirs (lower is better). The table gives min / median / max of that ratio over
the runs. The machine may be shared: the load average is printed with the figures.

The uncompressed 1 MiB workloads are then read again into one preallocated output
(``get_basic_selection(..., out=...)``). ``arr[:]`` makes zarr allocate a fresh 512 MiB result
for every read, and on a virtual machine whose host takes back memory the guest has freed (free
page reporting), touching it costs one time 60 ms and another 330-620 ms (measured here: 512 MiB
touched within half a second of the previous one's release, then after two to four seconds),
for either store alike. That cost is zarr's, not a store's, and it is what still scatters the
``arr[:]`` ratio; with the output kept, what is left is the stores' own work.

Then, in this process: a bulk read (``get_partial_values``) through both stores, our bulk read
under trio and under asyncio, and zarr reading a zip through both ZipStores.

``--pipeline fused`` makes zarr (>= 3.4) use its ``FusedCodecPipeline``, which reads through the
stores' ``get_sync``; by default zarr uses its ``BatchedCodecPipeline`` and awaits ``get``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import numpy as np
import zarr
import zarr.codecs
import zarr.storage
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import zarr_anyio

PROTO = default_buffer_prototype()
FUSED = "zarr.core.codec_pipeline.FusedCodecPipeline"


class Workload(NamedTuple):
    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    zstd: bool

    @property
    def folder_name(self) -> str:
        return self.name.replace(" ", "_")


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("1-D 1 MiB", (8 * 131072,), (131072,), "float64", zstd=False),
            Workload("1-D 4 KiB", (64 * 512,), (512,), "float64", zstd=False),
        ]
    return [
        Workload("1-D 1 MiB", (512 * 131072,), (131072,), "float64", zstd=False),
        Workload("2-D 1 MiB", (262144, 512), (512, 512), "float32", zstd=False),
        Workload("2-D 1 MiB zstd", (262144, 512), (512, 512), "float32", zstd=True),
        Workload("1-D 4 KiB", (8192 * 512,), (512,), "float64", zstd=False),
    ]


def write(workload: Workload, folder: Path) -> None:
    """The workload's array, written by zarr's own store."""
    size = int(np.prod(workload.shape))
    # Values that compress, but not to nothing: whole numbers below 1,000 in a random order.
    data = np.random.default_rng(0).integers(0, 1000, size).astype(workload.dtype)
    compressors: Any = zarr.codecs.ZstdCodec() if workload.zstd else None
    array = zarr.create_array(
        store=zarr.storage.LocalStore(folder / workload.folder_name),
        shape=workload.shape,
        chunks=workload.chunks,
        dtype=workload.dtype,
        compressors=compressors,
    )
    array[:] = data.reshape(workload.shape)


def median_results(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Run each callable ``repeat`` times, interleaved, and give the median of what each returns.

    The order turns around every repetition, so that none always runs after the same other
    (what one leaves behind, in the allocator or the caches, is met by the next).
    """
    results: dict[str, list[float]] = {name: [] for name in runs}
    for repetition in range(repeat):
        order = list(runs.items())
        for name, run in order if repetition % 2 == 0 else reversed(order):
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


# ------------------------------------------------------------------ one run, in its own process


def one_run(folder: Path, repeat: int, pipeline: str, into_out: bool) -> dict[str, float]:
    """``arr[:]`` through both stores, interleaved: the median seconds of each. ``into_out``:
    read into one preallocated output instead of a new array each time."""
    if pipeline == "fused":
        zarr.config.set({"codec_pipeline.path": FUSED})
    arrays = {
        "theirs": zarr.open_array(store=zarr.storage.LocalStore(folder, read_only=True), mode="r"),
        "ours": zarr.open_array(store=zarr_anyio.LocalStore(folder, read_only=True), mode="r"),
    }
    expected = arrays["theirs"][-1]
    shape, dtype = arrays["theirs"].shape, arrays["theirs"].dtype
    out = PROTO.nd_buffer.from_numpy_array(np.empty(shape, dtype)) if into_out else None

    def read(name: str) -> Callable[[], None]:
        def run() -> None:
            if out is None:
                result = np.asarray(arrays[name][:])
            else:
                arrays[name].get_basic_selection(slice(None), out=out)
                result = out.as_numpy_array()
            assert np.array_equal(result[-1], expected)

        return run

    for name in arrays:
        read(name)()  # warm up: the page cache, and each store's first use
    return median_seconds({name: read(name) for name in arrays}, repeat)


def run_in_a_process(folder: Path, repeat: int, pipeline: str, into_out: bool) -> dict[str, float]:
    done = subprocess.run(
        [
            *(sys.executable, __file__, "--one-run", str(folder)),
            *("--repeat", str(repeat), "--pipeline", pipeline),
            *(["--into-out"] if into_out else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def distribution(
    folder: Path, cases: list[Workload], runs: int, repeat: int, pipeline: str, into_out: bool
) -> list[str]:
    what = "into one preallocated out=" if into_out else "arr[:]"
    lines = [f"\n## {what}, ours / zarr.storage.LocalStore: {runs} runs of {repeat} reads each"]
    table = [
        "| workload | chunks | min | median | max | our median | their median |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload in cases:
        ratios, ours, theirs = [], [], []
        for _ in range(runs):
            seconds = run_in_a_process(folder / workload.folder_name, repeat, pipeline, into_out)
            ratios.append(seconds["ours"] / seconds["theirs"])
            ours.append(seconds["ours"])
            theirs.append(seconds["theirs"])
        chunks = int(
            np.prod([s // c for s, c in zip(workload.shape, workload.chunks, strict=True)])
        )
        lines.append(
            f"{workload.name}: runs ours/theirs "
            + " ".join(f"{ratio:.2f}" for ratio in ratios)
            + f"  (load {os.getloadavg()[0]:.1f})"
        )
        lines.append(
            f"ratio {what} ours/theirs, {workload.name}: min {min(ratios):.2f} "
            f"median {statistics.median(ratios):.2f} max {max(ratios):.2f}"
        )
        table.append(
            f"| {workload.name} | {chunks} | {min(ratios):.2f} | {statistics.median(ratios):.2f}"
            f" | {max(ratios):.2f} | {statistics.median(ours) * 1000:.0f} ms"
            f" | {statistics.median(theirs) * 1000:.0f} ms |"
        )
    return [*lines, "", *table]


# ------------------------------------------------------------------ in this process


def bench_bulk(folder: Path, workload: Workload, repeat: int) -> list[str]:
    """A bulk read of every chunk key through both stores, and ours under trio and asyncio."""
    path = folder / workload.folder_name
    theirs = zarr.storage.LocalStore(path, read_only=True)
    ours = zarr_anyio.LocalStore(path, read_only=True)
    chunks = int(np.prod([s // c for s, c in zip(workload.shape, workload.chunks, strict=True)]))
    separator = "/".join("0" * (len(workload.shape) - 1))
    keys = [(f"c/{i}/{separator}".rstrip("/"), None) for i in range(chunks)]

    def bulk_on_zarrs_loop(store: Any) -> None:
        results = sync(store.get_partial_values(PROTO, keys))
        assert all(result is not None for result in results)

    async def bulk_ours() -> None:
        results = await ours.get_partial_values(PROTO, keys)
        assert all(result is not None for result in results)

    timings = median_seconds(
        {
            "get_partial_values, zarr.storage.LocalStore": lambda: bulk_on_zarrs_loop(theirs),
            "get_partial_values, zarr_anyio.LocalStore": lambda: bulk_on_zarrs_loop(ours),
            "zarr_anyio bulk read under asyncio": lambda: anyio.run(bulk_ours, backend="asyncio"),
            "zarr_anyio bulk read under trio": lambda: anyio.run(bulk_ours, backend="trio"),
        },
        repeat,
    )
    lines = [f"\n## bulk read, {workload.name}, {chunks} chunks (median of {repeat})"]
    for name, seconds in timings.items():
        lines.append(f"{name:48s} {seconds * 1000:9.1f} ms  {seconds / chunks * 1e6:8.1f} µs/chunk")
    values = list(timings.values())
    lines.append(f"ratio bulk read ours/theirs:         {values[1] / values[0]:.2f}")
    lines.append(f"ratio our bulk read trio/asyncio:    {values[3] / values[2]:.2f}")
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
        result = np.asarray(zarr.open_array(store=store, mode="r")[:])
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
    parser.add_argument("--repeat", type=int, default=None, help="reads per store in a run")
    parser.add_argument("--runs", type=int, default=None, help="processes per workload")
    parser.add_argument("--pipeline", choices=["batched", "fused"], default="batched")
    parser.add_argument("--only", default=None, help="workloads whose name contains this")
    parser.add_argument("--one-run", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--into-out", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 7)
    if args.one_run is not None:
        print(json.dumps(one_run(args.one_run, repeat, args.pipeline, args.into_out)))
        return 0
    runs = args.runs or (2 if args.quick else 10)
    cases = [w for w in workloads(args.quick) if args.only is None or args.only in w.name]
    print(
        f"# zarr_anyio benchmarks (python {sys.version.split()[0]}, zarr {zarr.__version__}, "
        f"{args.pipeline} codec pipeline, {os.cpu_count()} cpus, "
        f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())})"
    )
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for workload in cases:
            write(workload, folder)
        for line in distribution(folder, cases, runs, repeat, args.pipeline, into_out=False):
            print(line, flush=True)
        uncompressed_large = [w for w in cases if not w.zstd and "MiB" in w.name]
        for line in distribution(
            folder, uncompressed_large, runs, repeat, args.pipeline, into_out=True
        ):
            print(line, flush=True)
        if args.only is None:
            for workload in (cases[0], cases[-1]):
                for line in bench_bulk(folder, workload, repeat):
                    print(line, flush=True)
            for line in bench_zip(folder, 4096, 100 if args.quick else 1000, repeat):
                print(line, flush=True)
    print(f"\nload at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
