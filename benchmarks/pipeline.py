"""Our codec pipeline against zarr's own, zarrs' and tensorstore's, on the same arrays, in one run.

    python3 benchmarks/pipeline.py             # every workload below; ~1 GiB in /tmp
    python3 benchmarks/pipeline.py --quick     # small arrays, for the smoke test
    python3 benchmarks/pipeline.py --repeat 7 --only zstd,remote

Workloads (reads; the local ones from a folder hot in the page cache):

* 512 x 1 MiB raw float32 2-D, whole array; 8,192 x 4 KiB raw float32 1-D, whole array;
  256 x 1 MiB zstd(1) 2-D, whole array;
* 512 x 1 MiB raw 2-D read as a strided region not aligned to chunks, ``arr[::3, 100:-100]``;
* 256 x 1 MiB blosc(lz4, shuffle) 2-D, whole array;
* 64 shards of 64 inner chunks of 16 KiB, raw and zstd(1), whole array;
* remote: 2,000 x 64 KiB raw chunks behind a loopback HTTP server that answers each request after
  20 ms (`slow_http.py`, in a process of its own), every store held to the same window of
  requests in flight (``--window``, default 64; zarr's stores through ``async.concurrency``).
  Beside the ratios, the rate as a fraction of what the window allows: window / latency.

Readers, each run in every round, rounds interleaved in a new order each time:

* remote only: aiohttp alone and obstore alone (the same GETs, ``window`` at a time, nothing
  else done with them): what the server gives a client that does nothing else, through either.
* zarr: zarr's sync ``arr[sel]``, its `BatchedCodecPipeline`, its LocalStore (remote: its
  FsspecStore over HTTP; also its ObjectStore over obstore's HTTPStore).
* ours (sync API): zarr's sync ``arr[sel]`` with ``codec_pipeline.path`` set to ours, on a
  zarr_anyio store (LocalStore; remote: FsspecStore and ObjectStore).
* ours (api, trio) / ours (api, asyncio): ``await arr.getitem(sel)`` through `zarr_anyio.api`.
* zarrs: zarr's sync ``arr[sel]`` with the ``zarrs`` package's Rust pipeline, zarr's store.
* tensorstore: its zarr3 driver, ``arr[sel].read().result()`` (remote: its http kvstore).

zarrs and tensorstore are optional (``pip install zarrs tensorstore``); a missing one is said so.
Each reader's time is divided by zarr's in the same round; the min / median / max of that ratio
over the rounds is printed (lower is better), then markdown tables for the docs. Also
whole-array writes (``arr[:] = data``) of the raw 2-D, raw 1-D and zstd arrays into an empty
folder: ours (sync API, on a zarr_anyio LocalStore, atomic writes) against zarr's pipeline on its
LocalStore, zarrs, and tensorstore (``write(data).result()``). Timings on a shared 2-core machine
are noisy: read the ratios of one run, and the load printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import server_process

OURS = "zarr_anyio.arrays.AnyioCodecPipeline"
ZARR = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS = "zarrs.ZarrsCodecPipeline"
MIB = 1 << 20
LATENCY = 0.02
BARE = "aiohttp alone (no zarr)"
OBSTORE_ALONE = "obstore alone (no zarr)"

# Optional readers, not in any extra (pip install zarrs tensorstore): imported by name, so that
# the type check is the same whether or not they are installed.
HAVE_ZARRS = importlib.util.find_spec("zarrs") is not None
tensorstore: Any
try:
    tensorstore = importlib.import_module("tensorstore")
except ImportError:
    tensorstore = None

Selection = Any  # what ``arr[...]`` takes: Ellipsis or a tuple of slices


@dataclass(frozen=True)
class Workload:
    label: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    compressors: Any = None
    selection: Selection = Ellipsis
    selection_text: str = "[:]"
    remote: bool = False
    written: bool = False  # also measured writing it
    shards: tuple[int, ...] | None = None  # then chunks (and per-chunk times) are inner chunks

    @property
    def count(self) -> int:
        return int(np.prod([-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True)]))

    @property
    def chunk_kib(self) -> int:
        return int(np.prod(self.chunks)) * 4 // 1024


def workloads(quick: bool) -> list[Workload]:
    scale = 8 if quick else 1
    zstd = zarr.codecs.ZstdCodec(level=1)
    blosc = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    # tensorstore reads a negative stop as an index, not from the end: spell it out.
    strided = (slice(None, None, 3), slice(100, 8192 - 100))
    return [
        Workload("512 x 1 MiB raw float32, 2-D", (16384 // scale, 8192), (512, 512), written=True),
        Workload("8,192 x 4 KiB raw, 1-D", (8192 * 1024 // scale,), (1024,), written=True),
        Workload("256 x 1 MiB zstd(1), 2-D", (8192 // scale, 8192), (512, 512), zstd, written=True),
        Workload(
            "512 x 1 MiB raw, 2-D, strided region",
            (16384 // scale, 8192),
            (512, 512),
            None,
            strided,
            "[::3, 100:-100]",
        ),
        Workload("256 x 1 MiB blosc(lz4, shuffle), 2-D", (8192 // scale, 8192), (512, 512), blosc),
        # 64 shards of 64 inner chunks of 16 KiB: zarr 3.1 reads a part of a shard with a
        # request per inner chunk, ours with the shard's index and a request per run of them.
        Workload(
            "64 shards x 64 x 16 KiB raw, sharded",
            (4096 // scale, 4096),
            (64, 64),
            shards=(512, 512),
        ),
        Workload(
            "64 shards x 64 x 16 KiB zstd(1), sharded",
            (4096 // scale, 4096),
            (64, 64),
            zstd,
            shards=(512, 512),
        ),
        Workload(
            "remote: 2,000 x 64 KiB raw, HTTP 20 ms",
            (2000 * 16384 // (10 if quick else 1),),
            (16384,),
            remote=True,
        ),
    ]


def interleaved(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    """Each run ``repeat`` times, in a new order each round; every wall time of each."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            results[name].append(runs[name]())
    return results


def ratios(results: dict[str, list[float]], base: str) -> dict[str, tuple[float, float, float]]:
    """Each reader's time over ``base``'s in the same round: min, median, max."""
    out = {}
    for name, walls in results.items():
        got = [wall / theirs for wall, theirs in zip(walls, results[base], strict=True)]
        out[name] = (min(got), statistics.median(got), max(got))
    return out


def timed(function: Callable[[], Any], check: Callable[[Any], None]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
        check(result)
        return elapsed

    return run


def opened(store: Any, pipeline: str) -> zarr.Array[Any]:
    with zarr.config.set({"codec_pipeline.path": pipeline}):
        return zarr.open_array(store, mode="r")


def api_runs(
    name: str, store: Any, selection: Selection, check: Callable[[Any], None], loop: Any
) -> dict[str, Callable[[], float]]:
    """``await arr.getitem(selection)`` through `zarr_anyio.api`, under trio and asyncio; the
    time of the read alone (not of opening the array, nor of starting the loop)."""
    elapsed = [0.0]

    async def read() -> Any:
        with zarr.config.set({"codec_pipeline.path": OURS}):
            arr = await za.open_array(store=store, mode="r")
        start = time.perf_counter()
        result = await arr.getitem(selection)
        elapsed[0] = time.perf_counter() - start
        return result

    def run(runner: Callable[[], Any]) -> float:
        check(runner())
        return elapsed[0]

    return {
        name.format("trio"): lambda: run(lambda: anyio.run(read, backend="trio")),
        name.format("asyncio"): lambda: run(lambda: loop.run(read())),
    }


def local_runs(
    path: Path, work: Workload, check: Callable[[Any], None], loop: Any
) -> dict[str, Callable[[], float]]:
    sel = work.selection
    theirs = opened(zarr.storage.LocalStore(path, read_only=True), ZARR)
    ours = opened(zarr_anyio.LocalStore(path, read_only=True), OURS)
    runs: dict[str, Callable[[], float]] = {
        "zarr": timed(lambda: theirs[sel], check),
        "ours (sync API)": timed(lambda: ours[sel], check),
    }
    our_store = zarr_anyio.LocalStore(path, read_only=True)
    runs.update(api_runs("ours (api, {})", our_store, sel, check, loop))
    if HAVE_ZARRS:
        with_zarrs = opened(zarr.storage.LocalStore(path, read_only=True), ZARRS)
        runs["zarrs"] = timed(lambda: with_zarrs[sel], check)
    if tensorstore is not None:
        ts_array = tensorstore.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        ).result()
        runs["tensorstore"] = timed(lambda: ts_array[sel].read().result(), check)
    return runs


def remote_runs(
    url: str, work: Workload, window: int, check: Callable[[Any], None], loop: Any
) -> dict[str, Callable[[], float]]:
    """Every store held to ``window`` requests in flight: ours by a fixed window
    (``adaptive=False``), zarr's by ``async.concurrency``, tensorstore's by its http
    concurrency limit."""
    from obstore.store import HTTPStore

    sel = work.selection

    def http_store() -> Any:
        return HTTPStore.from_url(
            url, client_options={"allow_http": True}, retry_config={"max_retries": 0}
        )

    def zarr_read(arr: zarr.Array[Any]) -> Callable[[], Any]:
        def read() -> Any:
            with zarr.config.set({"async.concurrency": window}):
                return arr[sel]

        return read

    ours: dict[str, Callable[[], Any]] = {
        "FsspecStore": lambda: zarr_anyio.FsspecStore.from_url(
            url, read_only=True, max_concurrency=window, adaptive=False
        ),
        "ObjectStore": lambda: zarr_anyio.ObjectStore(
            http_store(), read_only=True, max_concurrency=window, adaptive=False
        ),
    }
    theirs: dict[str, Callable[[], Any]] = {
        "FsspecStore": lambda: zarr.storage.FsspecStore.from_url(url, read_only=True),
        "ObjectStore": lambda: zarr.storage.ObjectStore(http_store(), read_only=True),
    }
    runs: dict[str, Callable[[], float]] = {
        BARE: lambda: loop.run(bare_gets(url, work.count, window)),
        OBSTORE_ALONE: lambda: loop.run(obstore_gets(http_store(), work.count, window)),
    }
    for kind in ("FsspecStore", "ObjectStore"):
        zarr_name = "zarr" if kind == "FsspecStore" else f"zarr, {kind}"
        runs[zarr_name] = timed(zarr_read(opened(theirs[kind](), ZARR)), check)
        runs[f"ours (sync API), {kind}"] = timed(zarr_read(opened(ours[kind](), OURS)), check)
        runs.update(api_runs(f"ours (api, {{}}), {kind}", ours[kind](), sel, check, loop))
    if HAVE_ZARRS:
        with_zarrs = opened(theirs["FsspecStore"](), ZARRS)
        probe = timed(zarr_read(with_zarrs), check)()
        ideal = work.count * LATENCY / window
        if probe < 5 * ideal:
            runs["zarrs, FsspecStore"] = timed(zarr_read(with_zarrs), check)
        else:  # one request at a time: minutes a round, so measured once
            print(
                f"(zarrs, FsspecStore: {probe * 1000:.0f} ms for one read, "
                f"{ideal / probe:.0%} of the window: left out of the rounds)"
            )
    if tensorstore is not None:
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "http", "base_url": url},
            "context": {"http_request_concurrency": {"limit": window}},
        }
        ts_array = tensorstore.open(spec).result()
        runs["tensorstore"] = timed(lambda: ts_array[sel].read().result(), check)
    return runs


async def obstore_gets(store: Any, count: int, window: int) -> float:
    """Seconds for ``count`` GETs of the chunks through obstore's async API (``get_async``,
    then ``bytes_async``: what an ObjectStore makes of each), ``window`` at a time: the most a
    reader on obstore can get from this server on this machine."""
    import obstore

    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            await (await obstore.get_async(store, f"c/{number}")).bytes_async()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    return time.perf_counter() - start


async def bare_gets(url: str, count: int, window: int) -> float:
    """Seconds for ``count`` GETs of the chunks, ``window`` at a time, on one aiohttp session:
    what the server gives a client that does nothing else (on 2 shared cores the server's own
    CPU caps the rate below the window's)."""
    import aiohttp

    numbers = iter(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=window)) as session:

        async def worker() -> None:
            for number in numbers:
                async with session.get(f"{url}/c/{number}") as response:
                    await response.read()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        return time.perf_counter() - start


@dataclass
class Measured:
    work: Workload
    ratios: dict[str, tuple[float, float, float]]
    walls: dict[str, float]  # medians, seconds
    window: int = 0
    alone: float = 0.0  # seconds one request takes with nothing else in flight
    fastest: dict[str, float] = field(default_factory=dict)  # each reader's least, seconds
    slowest: dict[str, float] = field(default_factory=dict)  # and most


def bench_read(
    folder: Path, work: Workload, repeat: int, window: int, stack: ExitStack
) -> Measured:
    path = folder / "array"
    values = (np.arange(int(np.prod(work.shape)), dtype="float32") % 1000).reshape(work.shape)
    with zarr.config.set({"codec_pipeline.path": ZARR}):
        arr = zarr.create_array(
            zarr.storage.LocalStore(path),
            shape=work.shape,
            chunks=work.chunks,
            shards=work.shards,
            dtype="float32",
            compressors=work.compressors,
        )
        arr[...] = values
    expected = values[work.selection]
    expected_shape, expected_last = expected.shape, expected.reshape(-1)[-1]
    del values, expected

    def check(result: Any) -> None:
        result = np.asarray(result)
        assert result.shape == expected_shape, (result.shape, expected_shape)
        assert result.reshape(-1)[-1] == expected_last

    with asyncio.Runner() as loop:
        if work.remote:
            url = stack.enter_context(
                server_process("slow_http.py", f"--delay={LATENCY}", f"--root={path}")
            )
            runs = remote_runs(url, work, window, check, loop)
            alone = statistics.median(loop.run(bare_gets(url, 1, 1)) for _ in range(20))
        else:
            runs = local_runs(path, work, check, loop)
        results = interleaved(runs, repeat)
    shutil.rmtree(path)
    walls = {name: statistics.median(got) for name, got in results.items()}
    if not work.remote:
        return Measured(work, ratios(results, "zarr"), walls)
    fastest = {name: min(got) for name, got in results.items()}
    slowest = {name: max(got) for name, got in results.items()}
    return Measured(work, ratios(results, "zarr"), walls, window, alone, fastest, slowest)


def report(measured: Measured, repeat: int) -> list[str]:
    work = measured.work
    lines = [
        f"\n## read {work.label}: {work.count} chunks of {work.chunk_kib} KiB, shape "
        f"{work.shape}, arr{work.selection_text} (min / median / max of {repeat} rounds, "
        f"load {os.getloadavg()[0]:.1f})",
        f"{'':32s} {'median':>9s}     {'per chunk':>9s}  {'/ zarr: min':>11s} {'median':>6s} "
        f"{'max':>5s}" + ("   of window   of bare" if measured.window else ""),
    ]
    bare = measured.walls.get(BARE, 0.0)
    for name, wall in measured.walls.items():
        low, middle, high = measured.ratios[name]
        line = (
            f"{name:32s} {wall * 1000:9.1f} ms  {wall / work.count * 1e6:8.1f} µs  "
            f"{low:11.2f} {middle:6.2f} {high:5.2f}"
        )
        if measured.window:
            ideal = measured.window / LATENCY  # requests a second the window allows
            line += f"   {work.count / wall / ideal:9.0%} {bare / wall:9.0%}"
        lines.append(line)
    if measured.window:
        ideal_wall = work.count / (measured.window / LATENCY)
        lines.append(
            f"(window {measured.window} requests in flight x 1 / {LATENCY * 1000:.0f} ms = "
            f"{measured.window / LATENCY:.0f} requests/s: {ideal_wall * 1000:.0f} ms at best; "
            f"one request alone took {measured.alone * 1000:.1f} ms, median of 20; "
            "'of bare': the rate over aiohttp's alone, the server's ceiling in this run)"
        )
    return lines


def markdown(chosen: list[Measured]) -> list[str]:
    """One table: a row per workload, a column per reader, ``median (min-max)`` ratios."""
    if not chosen:
        return []
    columns: list[str] = []
    for m in chosen:
        columns += [name for name in m.ratios if name not in columns]
    lines = [
        "| workload | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for m in chosen:
        cells = []
        for name in columns:
            if name not in m.ratios:
                cells.append("-")
                continue
            low, middle, high = m.ratios[name]
            cells.append(f"{middle:.2f} ({low:.2f}-{high:.2f})")
        label = m.work.label.replace(" x ", " \N{MULTIPLICATION SIGN} ")
        if m.work.selection_text != "[:]":
            label += f" `{m.work.selection_text}`"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown_remote(m: Measured) -> list[str]:
    """A row per reader: its ratio to zarr, its rate as a share of the window (median, and
    its slowest and fastest round) and of what aiohttp alone got from the same server."""
    ideal = m.window / LATENCY
    lines = [
        f"| reader ({m.work.count} chunks, window {m.window}) | / zarr | of the window "
        "| of aiohttp alone |",
        "|---|---|---|---|",
    ]
    for name, wall in m.walls.items():
        low, middle, high = m.ratios[name]
        share = m.work.count / ideal  # seconds at the window's pace
        lines.append(
            f"| {name} | {middle:.2f} ({low:.2f}-{high:.2f}) | {share / wall:.0%} "
            f"({share / m.slowest[name]:.0%}-{share / m.fastest[name]:.0%}) | "
            f"{m.walls[BARE] / wall:.0%} |"
        )
    return lines


def bench_writes(folder: Path, work: Workload, repeat: int) -> list[str]:
    values = (np.arange(int(np.prod(work.shape)), dtype="float32") % 1000).reshape(work.shape)
    rounds = iter(range(10**6))

    def create(store: Any) -> zarr.Array[Any]:
        return zarr.create_array(
            store,
            shape=work.shape,
            chunks=work.chunks,
            dtype="float32",
            compressors=work.compressors,
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
    results = interleaved(runs, repeat)
    lines = [
        f"\n## write {work.label}: {work.count} chunks (min / median / max of {repeat} rounds, "
        f"load {os.getloadavg()[0]:.1f})"
    ]
    for name, (low, middle, high) in ratios(results, "zarr").items():
        wall = statistics.median(results[name])
        lines.append(
            f"{name:22s} {wall * 1000:9.1f} ms  {wall / work.count * 1e6:8.1f} µs  "
            f"{low:5.2f} {middle:5.2f} {high:5.2f} of zarr's"
        )
    return lines


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small arrays")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--window", type=int, default=64, help="requests in flight, remote")
    parser.add_argument(
        "--only", default="", help="comma-separated words: the workloads whose label has one"
    )
    parser.add_argument("--no-writes", action="store_true")
    parser.add_argument("--no-reads", action="store_true")
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}; zarr {zarr.__version__}; "
        f"zarrs {'yes' if HAVE_ZARRS else 'not installed'}; "
        f"tensorstore {'yes' if tensorstore is not None else 'not installed'}; "
        f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs"
    )
    words = [word for word in args.only.split(",") if word]
    chosen = [
        work
        for work in workloads(args.quick)
        if not words or any(word in work.label for word in words)
    ]
    measured: list[Measured] = []
    with scratch() as folder:
        for work in [] if args.no_reads else chosen:
            with ExitStack() as stack:
                measured.append(bench_read(folder, work, args.repeat, args.window, stack))
            for line in report(measured[-1], args.repeat):
                print(line, flush=True)
        table = markdown([m for m in measured if not m.work.remote])
        if table:
            print("\n## markdown, local reads (/ zarr)")
            print("\n".join(table), flush=True)
        for m in measured:
            if m.work.remote:
                print("\n## markdown, remote reads")
                print("\n".join(markdown_remote(m)), flush=True)
        if not args.no_writes:
            for work in chosen:
                if work.written:
                    for line in bench_writes(folder, work, args.repeat):
                        print(line, flush=True)


if __name__ == "__main__":
    main()
