"""Remote stores against throttling servers, beside zarr.storage's stores on the same servers.

    python benchmarks/throttling.py                 # every scenario, then the plot
    python benchmarks/throttling.py --only rate     # one of: rate, sliding, fixed,
                                                    # concurrency, plain, plot

Each server is `throttle_http.py` in a process of its own; every count is the server's own.

* **rate**: a server admitting 300 requests/s (20 ms each), S3's 503 SlowDown beyond; 1,500 x
  4 KiB read with ``get_partial_values``, at max_concurrency 32, 128 and 256. Target: >= 95% of
  the admitted rate, <= 5% of requests throttled, never a failure.
* **sliding**: a server admitting at most 300 requests in any one second (a sliding window, as
  API gateways count), 503 SlowDown at once beyond, 20 ms; the same reads. **fixed**: 300 in
  each second of the clock (the count resets on the second). Target: every read arrives (a
  throttle is paced, never a failure), >= 90% of the admitted rate, <= 10% throttled.
* **concurrency**: a server admitting 48 requests in flight (100 ms each), 503 beyond. Target:
  >= 90% of 480 requests/s, <= 5% throttled.
* **plain**: an unthrottled 200 ms server, ceiling 128: the adaptive window against a fixed
  window of 128. Target: >= 85% of its throughput.
* **plot**: the window and the throughput over time against the rate-limited server, saved as
  ``docs/throttling.png`` (needs matplotlib).

"share" is successful reads per second over the admitted rate; "throttled" is the share of the
requests the server received that it refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import zarr
import zarr.storage
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import zarr_anyio
from processes import server_process

HERE = Path(__file__).resolve().parent
PROTO = default_buffer_prototype()


def server(*options: str) -> AbstractContextManager[str]:
    """`throttle_http.py` in a process of its own; gives its URL, stops it at the end."""
    return server_process("throttle_http.py", *options)


def server_counts(url: str, answers: bool = False) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/__stats__{'?answers' if answers else ''}") as response:
        counts: dict[str, Any] = json.load(response)
    return counts


def reset(url: str) -> None:
    request = urllib.request.Request(f"{url}/__reset__", method="POST")
    urllib.request.urlopen(request).close()


def obstore_client(url: str, retries: int = 0) -> Any:
    from obstore.store import HTTPStore

    return HTTPStore.from_url(
        url, client_options={"allow_http": True}, retry_config={"max_retries": retries}
    )


def stores(url: str, ceiling: int, adaptive: bool = True) -> dict[str, Any]:
    """Our two stores and zarr's two over ``url``, each client's own retries off for ours."""
    options: dict[str, Any] = {"max_concurrency": ceiling, "adaptive": adaptive}
    retry = zarr_anyio.Retry(attempts=10)
    return {
        "zarr_anyio.ObjectStore": zarr_anyio.ObjectStore(
            obstore_client(url), read_only=True, retry=retry, **options
        ),
        # from_url: the store owns its filesystem and closes its session with the store.
        "zarr_anyio.FsspecStore": zarr_anyio.FsspecStore.from_url(
            url, read_only=True, retry=retry, **options
        ),
    }


def zarr_stores(url: str) -> dict[str, Any]:
    """zarr.storage's stores as a user gets them: obstore with its own retries (10)."""
    import fsspec

    return {
        "zarr.storage.ObjectStore": zarr.storage.ObjectStore(
            obstore_client(url, retries=10), read_only=True
        ),
        "zarr.storage.FsspecStore": zarr.storage.FsspecStore(
            fsspec.filesystem("http", asynchronous=True, skip_instance_cache=True),
            path=url,
            read_only=True,
        ),
    }


def read_ours(store: Any, count: int, backend: str = "asyncio") -> float:
    requests = [(f"c/{i}", None) for i in range(count)]

    async def read() -> None:
        results = await store.get_partial_values(PROTO, requests)
        assert all(r is not None and len(r) == 4096 for r in results)

    started = time.perf_counter()
    anyio.run(read, backend=backend)
    return time.perf_counter() - started


def read_zarrs(store: Any, count: int, concurrency: int) -> float:
    requests = [(f"c/{i}", None) for i in range(count)]
    with zarr.config.set({"async.concurrency": concurrency}):
        started = time.perf_counter()
        results = sync(store.get_partial_values(PROTO, requests))
        assert all(r is not None and len(r) == 4096 for r in results)
    return time.perf_counter() - started


def row(
    name: str, url: str, count: int, seconds: float | None, admitted: float, store: Any = None
) -> str:
    """One client's line; ``seen`` is how many of the server's throttles the store counted."""
    counts = server_counts(url)
    throttled = counts["throttled"] / max(1, counts["requests"])
    if seconds is None:
        return f"{name:44s} {'fails':>8s} {'':>7s} {throttled:10.0%} {counts['requests']:9d}"
    rate = count / seconds
    seen = ""
    if isinstance(store, zarr_anyio.RemoteStore):
        seen = f"{store.stats().throttled}/{counts['throttled']}"
    return (
        f"{name:44s} {rate:8.0f} {rate / admitted:7.0%} {throttled:10.0%} "
        f"{counts['requests']:9d} {counts['most_in_flight']:7d} {seen:>11s}"
    )


HEADER = (
    f"{'client':44s} {'reads/s':>8s} {'share':>7s} {'throttled':>10s} {'requests':>9s} {'most':>7s}"
    f" {'seen':>11s}"
)


def run_all(url: str, count: int, admitted: float, ceilings: list[int], knee: int) -> list[str]:
    lines = [HEADER]
    # What this machine can do against this server: a fixed window at the server's own limit,
    # known in advance (which a client never is).
    for name, store in stores(url, knee, adaptive=False).items():
        reset(url)
        seconds = read_ours(store, count)
        lines.append(
            row(f"{name}, fixed window {knee} (oracle)", url, count, seconds, admitted, store)
        )
        store.close()
    for ceiling in ceilings:
        for name, store in stores(url, ceiling).items():
            reset(url)
            seconds = read_ours(store, count)
            lines.append(
                row(f"{name}, max_concurrency={ceiling}", url, count, seconds, admitted, store)
            )
            store.close()
    for name, store in zarr_stores(url).items():
        reset(url)
        try:
            seconds: float | None = read_zarrs(store, count, 10)
        except Exception as error:  # zarr's FsspecStore over http does not retry
            seconds = None
            name = f"{name} ({type(error).__name__})"
        lines.append(row(f"{name}, async.concurrency=10", url, count, seconds, admitted))
        close_zarrs(store)
    return lines


def close_zarrs(store: Any) -> None:
    """zarr's FsspecStore leaves an async filesystem's session open: close it on zarr's loop."""
    session = getattr(getattr(store, "fs", None), "_session", None)
    if session is not None:
        sync(session.close())


def bench_rate(count: int, ceilings: list[int]) -> list[str]:
    lines = [f"\n## Rate-limited server: 300 requests/s admitted, 20 ms, {count} x 4 KiB"]
    with server("--delay=0.02", "--rate=300") as url:
        lines += run_all(url, count, 300.0, ceilings, knee=7)
    return lines


def bench_window(count: int, ceilings: list[int], kind: str) -> list[str]:
    lines = [
        f"\n## {kind.capitalize()}-window server: 300 requests in a second, 20 ms, {count} x 4 KiB"
    ]
    with server("--delay=0.02", "--window=300", f"--window-kind={kind}") as url:
        lines += run_all(url, count, 300.0, ceilings, knee=7)
    return lines


def bench_concurrency(count: int, ceilings: list[int]) -> list[str]:
    lines = [f"\n## Concurrency-limited server: 48 in flight, 100 ms, {count} x 4 KiB"]
    with server("--delay=0.1", "--concurrency=48") as url:
        lines += run_all(url, count, 480.0, ceilings, knee=48)
    return lines


def bench_plain(count: int) -> list[str]:
    lines = [f"\n## Unthrottled server, 200 ms, {count} x 4 KiB, ceiling 128"]
    lines.append(f"{'client':44s} {'reads/s':>8s} {'of fixed':>9s}")
    with server("--delay=0.2") as url:
        for name in ("zarr_anyio.ObjectStore", "zarr_anyio.FsspecStore"):
            fixed = stores(url, 128, adaptive=False)[name]
            adaptive = stores(url, 128)[name]
            fixed_seconds = read_ours(fixed, count)
            adaptive_seconds = read_ours(adaptive, count)
            lines.append(f"{name + ', fixed window 128':44s} {count / fixed_seconds:8.0f}")
            lines.append(
                f"{name + ', adaptive, ceiling 128':44s} {count / adaptive_seconds:8.0f} "
                f"{fixed_seconds / adaptive_seconds:9.0%}"
            )
            fixed.close()
            adaptive.close()
        for name, store in zarr_stores(url).items():
            seconds = read_zarrs(store, count, 128)
            lines.append(f"{name + ', async.concurrency=128':44s} {count / seconds:8.0f}")
    return lines


def bench_plot(count: int, path: Path) -> list[str]:
    """Window and throughput over time, ObjectStore at ceiling 128, rate-limited server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with server("--delay=0.02", "--rate=300") as url:
        store = stores(url, 128)["zarr_anyio.ObjectStore"]
        samples: list[tuple[float, int, int]] = []

        async def read() -> None:
            requests = [(f"c/{i}", None) for i in range(count)]
            async with anyio.create_task_group() as tg:

                async def sample() -> None:
                    async for stats in store.watch(0.02):
                        samples.append((stats.elapsed, stats.window, stats.in_flight))

                tg.start_soon(sample)
                await store.get_partial_values(PROTO, requests)
                tg.cancel_scope.cancel()

        started = time.monotonic()
        anyio.run(read)
        counts = server_counts(url, answers=True)
    t0 = samples[0][0]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    top.step([t - t0 for t, _, _ in samples], [w for _, w, _ in samples], where="post")
    top.axhline(6, color="grey", linestyle=":", label="300 req/s x 20 ms = 6")
    top.set_ylabel("window (requests in flight)")
    top.legend(loc="upper right")
    bin_width = 0.25
    bins: dict[int, list[int]] = {}
    for when, admitted in counts["answers"]:
        slot = int((when - started) / bin_width)
        bins.setdefault(slot, [0, 0])[0 if admitted else 1] += 1
    slots = sorted(bins)
    xs = [slot * bin_width for slot in slots]
    bottom.step(xs, [bins[s][0] / bin_width for s in slots], where="post", label="admitted")
    bottom.step(xs, [bins[s][1] / bin_width for s in slots], where="post", label="throttled (503)")
    bottom.axhline(300, color="grey", linestyle=":", label="admitted rate")
    bottom.set_ylabel("answers per second")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.suptitle(
        f"zarr_anyio.ObjectStore, ceiling 128: {count} x 4 KiB from a server admitting 300/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return [f"\n## Plot: {path} ({len(samples)} samples)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only", choices=["rate", "sliding", "fixed", "concurrency", "plain", "plot"]
    )
    parser.add_argument("--ceilings", default="32,128,256", help="comma-separated")
    parser.add_argument("--count", type=int, default=1500)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"# throttling benchmarks (python {sys.version.split()[0]}, zarr {zarr.__version__})")
    print(f"# load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    ceilings = [int(c) for c in args.ceilings.split(",")]
    if args.only in (None, "rate"):
        print("\n".join(bench_rate(args.count, ceilings)), flush=True)
    for kind in ("sliding", "fixed"):
        if args.only in (None, kind):
            print("\n".join(bench_window(args.count, ceilings, kind)), flush=True)
    if args.only in (None, "concurrency"):
        print("\n".join(bench_concurrency(args.count * 2, ceilings)), flush=True)
    if args.only in (None, "plain"):
        print("\n".join(bench_plain(args.count)), flush=True)
    if args.only in (None, "plot"):
        print("\n".join(bench_plot(args.count, HERE.parent / "docs" / "throttling.png")))
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
