"""Remote stores against servers on loopback, measured in one run against zarr-python's own.

    python3 tests/dev.py bench            # runs this after the local benchmarks
    python benchmarks/remote.py --quick   # a short run

1. An array on moto's S3 server, read by zarr-python (``arr[:]``) through
   ``zarr.storage.FsspecStore``, ``zarr.storage.ObjectStore`` and ours (both), and our bulk read
   under asyncio and under trio.
2. A latency-bound read: an HTTP server that waits 20 ms per request, N objects of 4 KiB, read
   with ``get_partial_values`` at several ``max_concurrency``; requests/s against the ideal
   (concurrency / latency), and zarr's ObjectStore over the same server for comparison.

3. What one trip through the bridge costs, next to a thread hop; and obstore's blocking API in
   worker threads (what our ObjectStore uses) against its async API (on the bridge, or awaited
   directly under asyncio), for 4 KiB and 1 MiB objects.

4. Throttling servers (``throttling.py``): a rate limit, a concurrency limit, an unthrottled
   200 ms server; the adaptive window against fixed ones and zarr's stores.

moto's server and the latency-bound server (`slow_http.py`, a bare asyncio protocol) run in
processes of their own. On a 2-core machine the servers still share the CPU with the client at
high concurrency: read the ratios.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import zarr
import zarr.storage
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import zarr_anyio
from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio._core.threads import run_in_worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import throttling
from processes import server_process
from run import median_results, median_seconds
from support.servers import S3ServerProcess

HERE = Path(__file__).resolve().parent

PROTO = default_buffer_prototype()


def bench_s3(chunks: int, repeat: int) -> list[str]:
    import fsspec
    from obstore.store import S3Store

    server = S3ServerProcess()
    server.start()
    try:
        bucket = server.new_bucket()
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": server.endpoint, "region_name": "us-east-1"},
        }
        data = np.arange(512 * chunks, dtype="float64")
        writer = zarr_anyio.FsspecStore.from_url(f"s3://{bucket}/a", storage_options=options)
        zarr.create_array(
            store=writer, shape=data.shape, chunks=(512,), dtype="float64", compressors=None
        )[:] = data

        def s3store() -> Any:
            return S3Store(
                bucket,
                prefix="a",
                endpoint=server.endpoint,
                region="us-east-1",
                access_key_id="testing",
                secret_access_key="testing",
                client_options={"allow_http": True},
            )

        fs = fsspec.filesystem("s3", asynchronous=True, skip_instance_cache=True, **options)
        stores: dict[str, Any] = {
            "zarr.storage.FsspecStore": zarr.storage.FsspecStore(fs, path=f"{bucket}/a"),
            "zarr.storage.ObjectStore": zarr.storage.ObjectStore(s3store()),
            "zarr_anyio.FsspecStore": zarr_anyio.FsspecStore.from_url(
                f"s3://{bucket}/a", storage_options=options
            ),
            "zarr_anyio.ObjectStore": zarr_anyio.ObjectStore(s3store()),
        }
        keys = [(f"c/{i}", None) for i in range(chunks)]
        ours = stores["zarr_anyio.ObjectStore"]

        def read(store: Any) -> None:
            assert np.array_equal(np.asarray(zarr.open_array(store=store, mode="r")[:]), data)

        async def bulk() -> None:
            results = await ours.get_partial_values(PROTO, keys)
            assert all(r is not None for r in results)

        runs: dict[str, Callable[[], Any]] = {
            f"arr[:] via {name}": functools.partial(read, store) for name, store in stores.items()
        }
        runs["our ObjectStore bulk read, asyncio"] = lambda: anyio.run(bulk)
        runs["our ObjectStore bulk read, trio"] = lambda: anyio.run(bulk, backend="trio")
        timings = median_seconds(runs, repeat)
        writer.close()
        stores["zarr_anyio.FsspecStore"].close()
    finally:
        server.stop()
    lines = [f"\n## moto S3: {chunks} chunks of 4 KiB (median of {repeat})"]
    for name, seconds in timings.items():
        lines.append(f"{name:44s} {seconds * 1000:8.1f} ms  {chunks / seconds:8.0f} chunks/s")
    t = list(timings.values())
    lines.append(f"ratio our FsspecStore / zarr's FsspecStore:   {t[2] / t[0]:.2f}")
    lines.append(f"ratio our ObjectStore / zarr's ObjectStore:   {t[3] / t[1]:.2f}")
    lines.append(f"ratio our bulk read trio / asyncio:           {t[5] / t[4]:.2f}")
    return lines


def slow_http_server(delay: float, size: int) -> AbstractContextManager[str]:
    """`slow_http.py` in a process of its own; gives its URL, stops it at the end."""
    return server_process("slow_http.py", f"--delay={delay}", f"--size={size}")


def bench_latency(objects: int, concurrencies: list[int]) -> list[str]:
    from obstore.store import HTTPStore

    latency = 0.02
    keys = [(f"o/{i}", None) for i in range(objects)]
    lines = [f"\n## HTTP, {latency * 1000:.0f} ms per request, {objects} objects of 4 KiB"]
    lines.append("store                                 in flight   requests/s   of ideal")
    with slow_http_server(latency, 4096) as url:

        def client() -> Any:
            return HTTPStore.from_url(
                url, client_options={"allow_http": True}, retry_config={"max_retries": 0}
            )

        def line(name: str, concurrency: int, seconds: float) -> str:
            rate = objects / seconds
            return f"{name:37s} {concurrency:9d} {rate:12.0f} {rate * latency / concurrency:9.0%}"

        for concurrency in concurrencies:
            stores: dict[str, Any] = {
                "zarr_anyio.ObjectStore": zarr_anyio.ObjectStore(
                    client(), max_concurrency=concurrency
                ),
                "zarr_anyio.FsspecStore": zarr_anyio.FsspecStore.from_url(
                    url, max_concurrency=concurrency
                ),
            }
            for name, store in stores.items():

                async def read(store: Any = store) -> None:
                    await store.get_partial_values(PROTO, keys)

                for backend in ("asyncio", "trio"):
                    started = time.perf_counter()
                    anyio.run(read, backend=backend)
                    seconds = time.perf_counter() - started
                    lines.append(line(f"{name}, {backend}", concurrency, seconds))
                store.close()
            # zarr's own ObjectStore, bounded by zarr's async.concurrency.
            with zarr.config.set({"async.concurrency": concurrency}):
                theirs = zarr.storage.ObjectStore(client())
                started = time.perf_counter()
                sync(theirs.get_partial_values(PROTO, keys))
                seconds = time.perf_counter() - started
            lines.append(line("zarr.storage.ObjectStore, asyncio", concurrency, seconds))
    return lines


async def _in_flight(calls: int, width: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Seconds for ``calls`` calls of ``call(i)``, ``width`` at a time, in one task group."""
    numbers = iter(range(calls))

    async def worker() -> None:
        for number in numbers:
            await call(number)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(width):
            tg.start_soon(worker)
    return time.perf_counter() - started


def bench_bridge_hop(calls: int, repeat: int) -> list[str]:
    """What one trip through the bridge costs, next to a hop to a worker thread."""
    import asyncio

    async def nothing() -> None:
        await asyncio.sleep(0)

    def per_call(backend: str, call: Callable[[int], Awaitable[object]]) -> Callable[[], float]:
        return lambda: anyio.run(_in_flight, calls, 64, call, backend=backend) / calls

    runs: dict[str, Callable[[], float]] = {}
    for backend in ("asyncio", "trio"):
        runs[f"bridge hop (run_on_loop), {backend}"] = per_call(
            backend, lambda _: run_on_loop(nothing)
        )
        runs[f"thread hop (anyio.to_thread), {backend}"] = per_call(
            backend, lambda _: anyio.to_thread.run_sync(lambda: None)
        )
        runs[f"thread hop (ours, run_in_worker), {backend}"] = per_call(
            backend, lambda _: run_in_worker(lambda _: None)
        )
    lines = [f"\n## One hop, 64 in flight, {calls} calls (median of {repeat})"]
    for name, seconds in median_results(runs, repeat).items():
        lines.append(f"{name:44s} {seconds * 1e6:8.1f} µs per call")
    return lines


def _obstore_paths(client: Any, keys: list[str], repeat: int) -> dict[str, float]:
    import obstore

    ours = zarr_anyio.ObjectStore(client, max_concurrency=16)
    requests = [(key, None) for key in keys]

    async def fetch_async(number: int) -> bytes:
        result = await obstore.get_async(client, keys[number])
        return bytes(await result.bytes_async())

    async def fetch_bridged(number: int) -> bytes:
        return await run_on_loop(lambda: fetch_async(number))

    async def our_store() -> None:
        await ours.get_partial_values(PROTO, requests)

    def timed_async(call: Callable[[int], Awaitable[object]], backend: str) -> float:
        return anyio.run(_in_flight, len(keys), 16, call, backend=backend)

    runs: dict[str, Callable[[], Any]] = {
        "blocking API in threads (ours), asyncio": lambda: anyio.run(our_store),
        "blocking API in threads (ours), trio": lambda: anyio.run(our_store, backend="trio"),
        "async API on the bridge, asyncio": lambda: timed_async(fetch_bridged, "asyncio"),
        "async API on the bridge, trio": lambda: timed_async(fetch_bridged, "trio"),
        "async API awaited directly, asyncio": lambda: timed_async(fetch_async, "asyncio"),
    }
    return median_seconds(runs, repeat)


def bench_obstore_paths(objects: int, repeat: int) -> list[str]:
    """obstore's blocking API in worker threads (what ObjectStore uses) against its async API,
    on the bridge (how a trio caller would reach it) and awaited directly under asyncio."""
    import obstore
    from obstore.store import LocalStore as ObstoreLocal

    lines = [f"\n## obstore call paths, {objects} objects, 16 in flight (median of {repeat})"]
    with tempfile.TemporaryDirectory() as folder:
        client = ObstoreLocal(folder)
        for size in (4096, 1 << 20):
            keys = [f"{size}/{i}" for i in range(objects)]
            for key in keys:
                obstore.put(client, key, b"x" * size)
            for name, seconds in _obstore_paths(client, keys, repeat).items():
                label = f"{size // 1024} KiB: {name}"
                lines.append(f"{label:50s} {seconds / objects * 1e6:8.1f} µs per object")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"# zarr_anyio remote benchmarks (python {sys.version.split()[0]}, zarr {zarr.__version__})"
    )
    repeat = 1 if args.quick else 5
    for line in bench_bridge_hop(200 if args.quick else 5000, repeat):
        print(line, flush=True)
    for line in bench_obstore_paths(50 if args.quick else 1000, repeat):
        print(line, flush=True)
    for line in bench_s3(chunks=20 if args.quick else 200, repeat=1 if args.quick else 5):
        print(line, flush=True)
    concurrencies = [8] if args.quick else [8, 32, 64, 128]
    for line in bench_latency(100 if args.quick else 1000, concurrencies):
        print(line, flush=True)
    # Throttling servers (and the plot, with `benchmarks/throttling.py` alone).
    count = 100 if args.quick else 1500
    ceilings = [128] if args.quick else [32, 128, 256]
    for line in [
        *throttling.bench_rate(count, ceilings),
        *throttling.bench_concurrency(2 * count, ceilings),
        *throttling.bench_plain(count),
    ]:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
