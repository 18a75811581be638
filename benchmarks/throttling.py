"""Remote stores against a matrix of throttling servers, beside zarr.storage's stores on the
same servers.

    python benchmarks/throttling.py                 # the whole matrix, its table
    python benchmarks/throttling.py --plot          # ... and docs/throttling.png
    python benchmarks/throttling.py --only sliding,drop --count 600 --ceilings 32

Each server is `throttle_http.py` in a process of its own, its limits the tests' own
(``tests/support/limits.py``); every count is the server's own. Against each kind of server,
1,500 x 4 KiB (twice that for the 480/s servers) are read with ``get_partial_values`` by our
ObjectStore (obstore's HTTPStore, its retries off) and FsspecStore (http) at max_concurrency 32,
128 and 256, by an "oracle" (ours with a fixed window set to the server's limit, known in
advance as a client never knows it: what this machine can do against that server), and by
zarr.storage's ObjectStore (obstore's own 10 retries) and FsspecStore at zarr's default
``async.concurrency`` of 10. The kinds of server (20 ms an answer unless said):

* **rate**: a token bucket, 300 requests/s (bursts of 10); S3's 503 SlowDown at once beyond;
* **sliding**: at most 300 requests in any one second (as API gateways count); **fixed**: 300 in
  each second of the clock, the count reset on the second; 503 SlowDown at once beyond;
* **concurrency**: 48 requests in flight (100 ms each, so 480/s), 503 beyond;
* **queue**: 48 places (100 ms each); the rest wait for one: latency grows, nothing is refused;
* **retry-after**: the token bucket of 300/s answering 429 with ``Retry-After: 1``; the server
  counts a retry that comes sooner ("early");
* **drop**: the token bucket, 300/s, down to 100/s from 2 s after the first request, back to
  300/s from 4 s.

Target for our stores, every kind, every ceiling: >= 90% of what the server admits, <= 10% of
requests throttled, never a failure. The table's cells read "share / throttled": the reads a
second over the rate the server admits (for **drop**: over what it admitted in that time), and
the share of the requests the server received that it refused; ``FAIL``: the read raised; a
``!`` marks an our-store cell that misses the target. Where the client's ceiling bounds the
rate below the server's (32 in flight at 100 ms is 320 of the 48-place servers' 480 a second),
the share of what the server admits *at that ceiling* (min(the server's rate, ceiling /
latency)) follows in brackets, and the target is judged on it. ``--only plain``: an
unthrottled 200 ms server, the adaptive window against a fixed one of 128. ``--plot`` draws the
matrix and the window over time (our ObjectStore, ceiling 128, against the **drop** server) into
``docs/throttling.png`` (needs matplotlib: the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
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
PLOT = HERE.parent / "docs" / "throttling.png"


@dataclass(frozen=True)
class Kind:
    """A kind of server: `throttle_http.py`'s options, and what it admits."""

    title: str
    options: tuple[str, ...]
    rate: float  # requests a second admitted (before any change)
    knee: int  # the oracle's fixed window: the server's limit, in requests in flight
    latency: float  # seconds an admitted request takes
    reads: int = 1  # times the run's count read from it
    rate_changes: tuple[tuple[float, float], ...] = ()

    def admits(self, seconds: float, ceiling: int | None = None) -> float:
        """How many requests the server admits in its first ``seconds``; with ``ceiling``,
        how many it admits to a client that keeps at most that many in flight (at most
        ``ceiling / latency`` a second: 32 in flight at 100 ms is 320/s, whatever the
        server's rate)."""
        most = float("inf") if ceiling is None else ceiling / self.latency
        total, rate, since = 0.0, self.rate, 0.0
        for after, new_rate in self.rate_changes:
            if seconds <= after:
                break
            total += min(rate, most) * (after - since)
            rate, since = new_rate, after
        return total + min(rate, most) * (seconds - since)


FAST = ("--delay=0.02",)
SLOW = ("--delay=0.1", "--concurrency=48")
KINDS: dict[str, Kind] = {
    "rate": Kind("token bucket, 300 requests/s, 20 ms", (*FAST, "--rate=300"), 300, 7, 0.02),
    "sliding": Kind(
        "300 in any 1 s (sliding window), 20 ms", (*FAST, "--window=300"), 300, 7, 0.02
    ),
    "fixed": Kind(
        "300 in each clock second (fixed window), 20 ms",
        (*FAST, "--window=300", "--window-kind=fixed"),
        300,
        7,
        0.02,
    ),
    "concurrency": Kind("48 in flight, 100 ms, 503 beyond", SLOW, 480, 48, 0.1, reads=2),
    "queue": Kind(
        "48 in flight, 100 ms, the rest queued", (*SLOW, "--queue"), 480, 48, 0.1, reads=2
    ),
    "retry-after": Kind(
        "token bucket, 300 requests/s, 429 with Retry-After: 1",
        (*FAST, "--rate=300", "--status=429", "--retry-after=1"),
        300,
        7,
        0.02,
    ),
    "drop": Kind(
        "token bucket, 300/s, 100/s from 2 s to 4 s",
        (*FAST, "--rate=300", "--rate-changes=2:100,4:300"),
        300,
        7,
        0.02,
        rate_changes=((2.0, 100.0), (4.0, 300.0)),
    ),
}
TARGET_SHARE, TARGET_THROTTLED = 0.90, 0.10


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
    """Our two stores over ``url``, each client's own retries off."""
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


def close_zarrs(store: Any) -> None:
    """zarr's FsspecStore leaves an async filesystem's session open: close it on zarr's loop."""
    session = getattr(getattr(store, "fs", None), "_session", None)
    if session is not None:
        sync(session.close())


@dataclass
class Cell:
    """One client's read from one server: the server's counts beside the client's."""

    client: str
    count: int
    seconds: float | None  # None: the read raised `error`
    counts: dict[str, Any]
    share: float = 0.0
    error: str = ""
    seen: int | None = None  # the throttles the store counted (ours)
    # The share of what the server admits to a client with this one's ceiling (in flight);
    # None: the ceiling is no bound on that server's rate (the share is the raw one).
    at_ceiling: float | None = None

    @property
    def judged(self) -> float:
        """The share the target is judged on: of what the server admits at this ceiling."""
        return self.share if self.at_ceiling is None else self.at_ceiling

    @property
    def throttled(self) -> float:
        throttled: int = self.counts["throttled"]
        requests: int = self.counts["requests"]
        return throttled / max(1, requests)

    @property
    def targeted(self) -> bool:
        """Whether the target is this client's: our stores', the oracle aside."""
        return self.seen is not None and "oracle" not in self.client

    @property
    def misses(self) -> bool:
        return self.seconds is None or (
            self.judged < TARGET_SHARE or self.throttled > TARGET_THROTTLED
        )

    def line(self) -> str:
        counts = self.counts
        if self.seconds is None:
            return f"{self.client:58s} {'fails':>8s} {'':>7s} {'':>8s} {self.throttled:10.0%} " + (
                f"{counts['requests']:9d}  {self.error}"
            )
        seen = "" if self.seen is None else f"{self.seen}/{counts['throttled']}"
        at_ceiling = "" if self.at_ceiling is None else f"{self.at_ceiling:.0%}"
        return (
            f"{self.client:58s} {self.count / self.seconds:8.0f} {self.share:7.0%} "
            f"{at_ceiling:>8s} {self.throttled:10.0%} {counts['requests']:9d} "
            f"{counts['most_in_flight']:7d} {counts['early']:6d} {seen:>11s}"
        )

    def cell(self) -> str:
        if self.seconds is None:
            return "FAIL"
        mark = "!" if self.targeted and self.misses else ""
        share = f"{self.share:.0%}"
        if self.at_ceiling is not None:
            share += f" ({self.at_ceiling:.0%})"
        return f"{share} / {self.throttled:.0%}{mark}"


HEADER = (
    f"{'client':58s} {'reads/s':>8s} {'share':>7s} {'at ceil':>8s} {'throttled':>10s} "
    f"{'requests':>9s} {'most':>7s} {'early':>6s} {'seen':>11s}"
)


@dataclass
class Run:
    """Every cell of one kind of server, in the order measured."""

    kind: str
    cells: list[Cell] = field(default_factory=list)


def measure(kind: Kind, url: str, client: str, count: int, store: Any, ceiling: int | None) -> Cell:
    """``count`` reads by ``store`` (ours, or zarr's at its default concurrency), which keeps
    at most ``ceiling`` requests in flight (``None``: no bound)."""
    ours = isinstance(store, zarr_anyio.RemoteStore)
    reset(url)
    try:
        seconds: float | None = read_ours(store, count) if ours else read_zarrs(store, count, 10)
        error = ""
    except Exception as raised:  # zarr's FsspecStore over http does not retry
        seconds, error = None, f"{type(raised).__name__}: {str(raised)[:60]}"
    counts = server_counts(url)
    seen = store.stats().throttled if ours else None
    share = count / kind.admits(seconds) if seconds else 0.0
    at_ceiling = None
    if seconds and ceiling is not None and kind.admits(seconds, ceiling) < kind.admits(seconds):
        at_ceiling = count / kind.admits(seconds, ceiling)
    return Cell(client, count, seconds, counts, share, error, seen, at_ceiling)


def run_kind(
    name: str,
    count: int,
    ceilings: list[int],
    oracle: bool = True,
    report: Callable[[str], None] = print,
) -> Run:
    """Every client against one server of kind ``name``, in a process of its own; each line
    given to ``report`` as it is measured."""
    kind = KINDS[name]
    count *= kind.reads
    run = Run(name)
    report(
        f"\n## {name}: {kind.title}; {count} x 4 KiB; the oracle's window: {kind.knee}\n{HEADER}"
    )

    def add(cell: Cell) -> None:
        run.cells.append(cell)
        report(cell.line())

    with server(*kind.options) as url:
        if oracle:
            for client, store in stores(url, kind.knee, adaptive=False).items():
                label = f"{client}, oracle (fixed window at the limit)"
                add(measure(kind, url, label, count, store, kind.knee))
                store.close()
        for ceiling in ceilings:
            for client, store in stores(url, ceiling).items():
                label = f"{client}, max_concurrency={ceiling}"
                add(measure(kind, url, label, count, store, ceiling))
                store.close()
        for client, store in zarr_stores(url).items():
            label = f"{client}, async.concurrency=10"
            # zarr's FsspecStore hands fsspec every range at once: async.concurrency does not
            # bound it (the queue server saw 48 and more in flight).
            bound = 10 if "ObjectStore" in client else None
            add(measure(kind, url, label, count, store, bound))
            close_zarrs(store)
    return run


def beside_oracle(run: Run, cell: Cell) -> str:
    """The oracle's share in the same run, by the same client library, beside a cell that
    missed: what this machine got against that server, knowing its limit. Under load the
    client's own delays cost even the oracle (100 ms answers take longer to be heard), and a
    miss the oracle shares is the machine's, not the window's."""
    library = cell.client.split(",")[0]
    for other in run.cells:
        if other.client.startswith(f"{library}, oracle") and other.seconds is not None:
            return f" (the oracle: {other.judged:.0%})"
    return ""


def table(runs: list[Run]) -> list[str]:
    """The matrix: one row a client, one column a kind of server, "share / throttled"."""
    clients = list(dict.fromkeys(cell.client for run in runs for cell in run.cells))
    found = {(run.kind, cell.client): cell for run in runs for cell in run.cells}
    lines = [
        "| client | " + " | ".join(run.kind for run in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for client in clients:
        cells = [found.get((run.kind, client)) for run in runs]
        lines.append(
            f"| {client} | " + " | ".join(cell.cell() if cell else "" for cell in cells) + " |"
        )
    missed = [
        f"{run.kind}: {cell.client}{beside_oracle(run, cell)}"
        for run in runs
        for cell in run.cells
        if cell.targeted and cell.misses
    ]
    lines.append(
        f"\nOur stores' cells missing >= {TARGET_SHARE:.0%} admitted, <= {TARGET_THROTTLED:.0%}"
        f" throttled, no failure: {len(missed)}" + "".join(f"\n  {miss}" for miss in missed)
    )
    return lines


def bench_rate(count: int, ceilings: list[int]) -> list[str]:
    lines: list[str] = []
    run_kind("rate", count, ceilings, report=lines.append)
    return lines


def bench_concurrency(count: int, ceilings: list[int]) -> list[str]:
    # `count` here is the number of reads already (the kind reads twice the run's count).
    lines: list[str] = []
    run_kind("concurrency", count // 2, ceilings, report=lines.append)
    return lines


def bench_plain(count: int) -> list[str]:
    lines = [f"\n## Unthrottled server, 200 ms, {count} x 4 KiB, ceiling 128"]
    lines.append(f"{'client':44s} {'reads/s':>8s} {'of fixed':>9s}")
    with server("--delay=0.2") as url:
        fixed, adaptive = stores(url, 128, adaptive=False), stores(url, 128)
        for name in fixed:
            fixed_seconds = read_ours(fixed[name], count)
            adaptive_seconds = read_ours(adaptive[name], count)
            lines.append(f"{name + ', fixed window 128':44s} {count / fixed_seconds:8.0f}")
            lines.append(
                f"{name + ', adaptive, ceiling 128':44s} {count / adaptive_seconds:8.0f} "
                f"{fixed_seconds / adaptive_seconds:9.0%}"
            )
            fixed[name].close()
            adaptive[name].close()
        for name, store in zarr_stores(url).items():
            seconds = read_zarrs(store, count, 128)
            lines.append(f"{name + ', async.concurrency=128':44s} {count / seconds:8.0f}")
            close_zarrs(store)
    return lines


def window_over_time(count: int) -> tuple[list[tuple[float, int]], list[list[Any]], float]:
    """Our ObjectStore, ceiling 128, against the **drop** server: its window every 20 ms, the
    server's answers (time, admitted), and when the read started (the server's clock)."""
    kind = KINDS["drop"]
    with server(*kind.options) as url:
        store = stores(url, 128)["zarr_anyio.ObjectStore"]
        samples: list[tuple[float, int]] = []

        async def read() -> None:
            requests = [(f"c/{i}", None) for i in range(count)]
            async with anyio.create_task_group() as tg:

                async def sample() -> None:
                    async for stats in store.watch(0.02):
                        samples.append((time.monotonic(), stats.window))

                tg.start_soon(sample)
                await store.get_partial_values(PROTO, requests)
                tg.cancel_scope.cancel()

        started = time.monotonic()
        anyio.run(read)
        store.close()
        answers: list[list[Any]] = server_counts(url, answers=True)["answers"]
    return samples, answers, started


def plot(runs: list[Run], count: int, path: Path) -> str:
    """The matrix (share of what each server admits, per client) above the window over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, answers, started = window_over_time(count)
    clients = list(dict.fromkeys(cell.client for run in runs for cell in run.cells))
    found = {(run.kind, cell.client): cell for run in runs for cell in run.cells}
    fig, (grid, window, rate) = plt.subplots(
        3, 1, figsize=(10, 4 + 0.3 * len(clients) + 5), height_ratios=[len(clients) / 3, 1, 1]
    )
    shares = [
        [found[(run.kind, c)].judged if (run.kind, c) in found else float("nan") for run in runs]
        for c in clients
    ]
    grid.imshow(shares, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for row, client in enumerate(clients):
        for column, run in enumerate(runs):
            cell = found.get((run.kind, client))
            if cell is not None:
                grid.text(column, row, cell.cell(), ha="center", va="center", fontsize=7)
    grid.set_xticks(range(len(runs)), [run.kind for run in runs])
    grid.set_yticks(range(len(clients)), clients, fontsize=7)
    grid.xaxis.tick_top()
    grid.set_title(
        "share of what the server admits / of requests throttled (colour: the share judged)",
        fontsize=9,
    )
    window.step([t - started for t, _ in samples], [w for _, w in samples], where="post")
    window.axhline(6, color="grey", linestyle=":", label="300 req/s x 20 ms = 6")
    window.axhline(2, color="silver", linestyle=":", label="100 req/s x 20 ms = 2")
    window.set_title(
        f"zarr_anyio.ObjectStore, ceiling 128, {count} x 4 KiB from the drop server"
        " (300/s; 100/s from 2 s to 4 s)",
        fontsize=9,
    )
    window.set_ylabel("window (in flight)")
    window.legend(loc="upper right", fontsize=7)
    bin_width = 0.25
    bins: dict[int, list[int]] = {}
    for when, admitted in answers:
        slot = int((when - started) / bin_width)
        bins.setdefault(slot, [0, 0])[0 if admitted else 1] += 1
    slots = sorted(bins)
    xs = [slot * bin_width for slot in slots]
    rate.step(xs, [bins[s][0] / bin_width for s in slots], where="post", label="admitted")
    rate.step(xs, [bins[s][1] / bin_width for s in slots], where="post", label="throttled (503)")
    rate.set_ylabel("answers per second")
    rate.set_xlabel("seconds")
    rate.legend(loc="upper right", fontsize=7)
    window.sharex(rate)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"\n## Plot: {path} ({len(samples)} samples of the window)"


def report(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        help=f"comma-separated, of: {', '.join(KINDS)}, plain (default: every kind)",
    )
    parser.add_argument("--ceilings", default="32,128,256", help="comma-separated")
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--no-oracle", dest="oracle", action="store_false")
    parser.add_argument("--plot", nargs="?", const=PLOT, type=Path, help=f"default: {PLOT}")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - {*KINDS, "plain"}
    if unknown:
        parser.error(f"no such kind of server: {', '.join(sorted(unknown))}")
    load = os.getloadavg()
    print(f"# throttling benchmarks (python {sys.version.split()[0]}, zarr {zarr.__version__})")
    print(f"# load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    started = time.monotonic()
    ceilings = [int(c) for c in args.ceilings.split(",")]
    kinds = [name for name in KINDS if args.only is None or name in args.only]
    runs = [run_kind(name, args.count, ceilings, args.oracle, report) for name in kinds]
    if args.only is not None and "plain" in args.only:
        print("\n".join(bench_plain(args.count)), flush=True)
    if runs:
        print("\n## The matrix\n")
        print("\n".join(table(runs)), flush=True)
    if args.plot is not None:
        print(plot(runs, args.count, args.plot))
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"# {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
