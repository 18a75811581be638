"""Our codec pipeline against zarr's own, zarrs' and tensorstore's, on the same arrays, in one run.

    python3 benchmarks/pipeline.py             # 512 x 1 MiB raw 2-D, 8,192 x 4 KiB raw 1-D,
                                               # 256 x 1 MiB zstd(1) 2-D; ~800 MiB in /tmp
    python3 benchmarks/pipeline.py --quick     # small arrays
    python3 benchmarks/pipeline.py --repeat 7

Whole-array reads from a local folder (hot in the page cache), interleaved in a new order each
round; medians, and every reader's ratio to zarr's default pipeline (lower is better):

* zarr: zarr's sync ``arr[:]``, its `BatchedCodecPipeline`, its LocalStore.
* ours (sync API): zarr's sync ``arr[:]`` with ``codec_pipeline.path`` set to ours, on a
  zarr_anyio LocalStore (chunks read in batches by worker threads).
* ours (api, trio) / ours (api, asyncio): ``await arr.getitem(...)`` through `zarr_anyio.api`,
  the same pipeline selected.
* zarrs: zarr's sync ``arr[:]`` with the ``zarrs`` package's Rust pipeline, zarr's LocalStore.
* tensorstore: its zarr3 driver, ``read().result()``.

zarrs and tensorstore are optional (``pip install zarrs tensorstore``); a missing one is said so.
Also whole-array writes (``arr[:] = data``) of the same three arrays into an empty folder: ours
(sync API, on a zarr_anyio LocalStore, atomic writes) against zarr's pipeline on its LocalStore,
zarrs, and tensorstore (``write(data).result()``). Timings on a shared 2-core machine are noisy:
read the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import zarr
import zarr.codecs
import zarr.storage

import zarr_anyio
import zarr_anyio.api as za
import zarr_anyio.arrays  # registers the pipeline

OURS = "zarr_anyio.arrays.AnyioCodecPipeline"
ZARR = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS = "zarrs.ZarrsCodecPipeline"
MIB = 1 << 20

try:
    import zarrs  # noqa: F401
except ImportError:
    HAVE_ZARRS = False
else:
    HAVE_ZARRS = True
try:
    import tensorstore
except ImportError:
    tensorstore = None


def interleaved_medians(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Each run ``repeat`` times, in a new order each round; the median wall time of each."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            results[name].append(runs[name]())
    return {name: statistics.median(got) for name, got in results.items()}


def timed(function: Callable[[], Any], check: Callable[[Any], None]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
        check(result)
        return elapsed

    return run


def opened(path: Path, pipeline: str, store: Any = None) -> zarr.Array:
    with zarr.config.set({"codec_pipeline.path": pipeline}):
        return zarr.open_array(
            store if store is not None else zarr.storage.LocalStore(path), mode="r"
        )


def bench_reads(
    path: Path,
    label: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    compressors: Any,
    repeat: int,
) -> list[str]:
    values = (np.arange(int(np.prod(shape)), dtype="float32") % 1000).reshape(shape)
    with zarr.config.set({"codec_pipeline.path": ZARR}):
        arr = zarr.create_array(
            zarr.storage.LocalStore(path),
            shape=shape,
            chunks=chunks,
            dtype="float32",
            compressors=compressors,
        )
        arr[...] = values
    expected_last = values.reshape(-1)[-1]
    del values

    def check(result: Any) -> None:
        assert np.asarray(result).reshape(-1)[-1] == expected_last

    theirs = opened(path, ZARR)
    ours_sync = opened(path, OURS, zarr_anyio.LocalStore(path, read_only=True))
    our_store = zarr_anyio.LocalStore(path, read_only=True)

    async def ours_api() -> Any:
        with zarr.config.set({"codec_pipeline.path": OURS}):
            arr = await za.open_array(store=our_store, mode="r")
        start = time.perf_counter()
        result = await arr.getitem(...)
        ours_api.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]
        return result

    def api_run(runner: Callable[[], Any]) -> float:
        check(runner())
        return float(ours_api.elapsed)  # type: ignore[attr-defined]

    runs: dict[str, Callable[[], float]] = {
        "zarr": timed(lambda: theirs[...], check),
        "ours (sync API)": timed(lambda: ours_sync[...], check),
    }
    with asyncio.Runner() as loop:
        runs["ours (api, trio)"] = lambda: api_run(lambda: anyio.run(ours_api, backend="trio"))
        runs["ours (api, asyncio)"] = lambda: api_run(lambda: loop.run(ours_api()))
        if HAVE_ZARRS:
            with_zarrs = opened(path, ZARRS)
            runs["zarrs"] = timed(lambda: with_zarrs[...], check)
        if tensorstore is not None:
            ts_array = tensorstore.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
            ).result()
            runs["tensorstore"] = timed(lambda: ts_array.read().result(), check)
        medians = interleaved_medians(runs, repeat)
    count = int(np.prod([-(-s // c) for s, c in zip(shape, chunks, strict=True)]))
    chunk_kib = int(np.prod(chunks)) * 4 // 1024
    lines = [
        f"\n## read {label}: {count} chunks of {chunk_kib} KiB, shape {shape} (median of {repeat})",
        f"{'':22s} {'wall':>9s}     {'per chunk':>9s}  {'/ zarr':>7s}  {'/ zarrs':>7s}",
    ]
    base = medians["zarr"]
    for name, wall in medians.items():
        versus_zarrs = f"{wall / medians['zarrs']:7.2f}" if "zarrs" in medians else "      -"
        lines.append(
            f"{name:22s} {wall * 1000:9.1f} ms  {wall / count * 1e6:8.1f} µs  "
            f"{wall / base:7.2f}  {versus_zarrs}"
        )
    return lines


def bench_writes(
    folder: Path,
    label: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    compressors: Any,
    repeat: int,
) -> list[str]:
    values = (np.arange(int(np.prod(shape)), dtype="float32") % 1000).reshape(shape)
    rounds = iter(range(10**6))

    def create(store: Any) -> zarr.Array:
        return zarr.create_array(
            store, shape=shape, chunks=chunks, dtype="float32", compressors=compressors
        )

    def write(pipeline: str, store_class: Any) -> float:
        path = folder / f"w{next(rounds)}"
        with zarr.config.set({"codec_pipeline.path": pipeline}):
            arr = create(store_class(path))
            start = time.perf_counter()
            arr[...] = values
            elapsed = time.perf_counter() - start
        shutil.rmtree(path)
        return elapsed

    def write_tensorstore() -> float:
        # The metadata written by zarr (not timed), the chunks by tensorstore's zarr3 driver.
        path = folder / f"w{next(rounds)}"
        create(zarr.storage.LocalStore(path))
        assert tensorstore is not None
        ts_array = tensorstore.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        ).result()
        start = time.perf_counter()
        ts_array.write(values).result()
        elapsed = time.perf_counter() - start
        shutil.rmtree(path)
        return elapsed

    runs: dict[str, Callable[[], float]] = {
        "zarr": lambda: write(ZARR, zarr.storage.LocalStore),
        "ours (sync API)": lambda: write(OURS, zarr_anyio.LocalStore),
    }
    if HAVE_ZARRS:
        runs["zarrs"] = lambda: write(ZARRS, zarr.storage.LocalStore)
    if tensorstore is not None:
        runs["tensorstore"] = write_tensorstore
    medians = interleaved_medians(runs, repeat)
    count = int(np.prod([-(-s // c) for s, c in zip(shape, chunks, strict=True)]))
    lines = [f"\n## write {label}: {count} chunks (median of {repeat})"]
    for name, wall in medians.items():
        lines.append(
            f"{name:22s} {wall * 1000:9.1f} ms  {wall / count * 1e6:8.1f} µs  "
            f"{wall / medians['zarr']:7.2f} of zarr's"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small arrays")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-writes", action="store_true")
    parser.add_argument("--no-reads", action="store_true")
    args = parser.parse_args()
    scale = 8 if args.quick else 1
    print(
        f"zarr {zarr.__version__}; zarrs {'yes' if HAVE_ZARRS else 'not installed'}; "
        f"tensorstore {'yes' if tensorstore is not None else 'not installed'}; "
        f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs"
    )
    zstd = zarr.codecs.ZstdCodec(level=1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [
            ("raw float32 2-D", (16384 // scale, 8192), (512, 512), None),
            ("raw float32 1-D", (8192 * 1024 // scale,), (1024,), None),
            ("zstd(1) float32 2-D", (8192 // scale, 8192), (512, 512), zstd),
        ]
        for number, (label, shape, chunks, compressors) in enumerate(cases):
            if args.no_reads:
                break
            for line in bench_reads(
                folder / f"r{number}", label, shape, chunks, compressors, args.repeat
            ):
                print(line, flush=True)
            shutil.rmtree(folder / f"r{number}")
        if not args.no_writes:
            for label, shape, chunks, compressors in cases[:3]:
                for line in bench_writes(folder, label, shape, chunks, compressors, args.repeat):
                    print(line, flush=True)


if __name__ == "__main__":
    main()
