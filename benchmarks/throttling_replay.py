"""The throttling matrix replayed on a fake clock: many seeds of a bulk read in seconds, where
`throttling.py` takes minutes a read and shares the machine with its servers.

    python benchmarks/throttling_replay.py                      # every kind, ceilings 32/128/256
    python benchmarks/throttling_replay.py --only drop --seeds 100 --load-ms 15

A read of ``count`` requests goes through the store's own adaptive window (`AdaptiveLimiter`) and
the store's retry loop as `storage/_remote.py` runs it: each request takes a token, waits its turn
under the pace (given back unsent, to queue for one again, if the window has shrunk below the
tokens held meanwhile) and is judged by the servers' own policy (``tests/support/limits.py``); a
refused one backs off (`Retry.delay`, bounded by `PACED_WAIT_MOST`) holding its token, unless the
window has shrunk below the tokens held. Answers take the server's latency plus up to 5 ms,
refusals 1-3 ms; ``--load-ms`` adds an exponential delay of that mean to each (a loaded client);
``--share`` runs the client only that share of the time, in slices of ``--slice-ms`` (exponential),
so what it hears or sends while off waits for its next slice: answers come in bunches, as they do
to a client sharing its cores. No CPU cost is modelled: the replay says what the rules do,
`throttling.py` what a machine does.

Each row: the median share of what the server admits (as `throttling.py` judges it: at a
ceiling that bounds the rate, of what the server admits at that ceiling), its 10th
percentile and least, the share of requests refused (median, 90th percentile, most), and how
many seeds missed the target (under 90% / over 10%).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import itertools
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from throttle_http import limits_of, options_parser

from support.limits import Admission, Limits
from throttling import KINDS as SERVERS
from throttling import Kind
from zarr_anyio import AdaptiveLimiter, Retry
from zarr_anyio._core.adaptive import Outcome
from zarr_anyio.storage._remote import PACED_WAIT_MOST

# The servers of `throttling.py` (its `KINDS`: their options, latency, rate, what a ceiling is
# judged by) that refuse without saying when to come back; queue and retry-after are left to it.
REPLAYED = ["rate", "sliding", "fixed", "concurrency", "drop"]


def limits(name: str) -> Limits:
    """What the server ``name`` admits: the limits its options start it with."""
    return limits_of(options_parser().parse_args(SERVERS[name].options))


@dataclass(frozen=True)
class Read:
    share: float  # of what the server admitted over the read
    refused: float  # share of the requests sent


@dataclass
class Scheduler:
    """When a client that runs ``share`` of the time, in exponential slices of ``slice`` seconds
    on average, is next on the CPU: a fixed schedule of the times it is off, laid out as far as
    asked, so an instant is on or off whatever was asked before."""

    jitter: random.Random
    share: float = 1.0
    slice: float = 0.004
    # The client is off from ``offs[i]`` to ``ons[i]``, and on from ``ons[i]`` to ``offs[i + 1]``.
    offs: list[float] = field(default_factory=list)
    ons: list[float] = field(default_factory=list)

    def awake(self, when: float) -> float:
        """``when``, or the end of the interval the client is off in then."""
        if self.share >= 1:
            return when
        if not self.ons:
            self.offs.append(when - 1.0)  # a second of schedule before the first instant asked
            self.ons.append(when - 1.0)
        while self.ons[-1] <= when:
            off = self.ons[-1] + self.jitter.expovariate(1 / self.slice)
            self.offs.append(off)
            self.ons.append(
                off + self.jitter.expovariate(self.share / ((1 - self.share) * self.slice))
            )
        i = bisect.bisect_right(self.offs, when) - 1
        return self.ons[i] if i >= 0 and when < self.ons[i] else when


def replay(
    name: str,
    count: int,
    ceiling: int,
    seed: int,
    load: float = 0.0,
    share: float = 1.0,
    cpu_slice: float = 0.004,
) -> Read:
    """One bulk read of ``count`` requests from the server ``name``, started at a random point
    of a clock second; ``load`` and ``cpu_slice`` in seconds (`Scheduler`)."""
    kind: Kind = SERVERS[name]
    server_limits = limits(name)
    jitter = random.Random(seed)
    random.seed(seed)  # `Retry.delay`'s own
    retry = Retry()
    window = AdaptiveLimiter(ceiling)
    admission = Admission()
    order = itertools.count()
    # (when, order, event, request, sent, epoch, held)
    events: list[tuple[float, int, str, int, float, int, int]] = []
    waiting = collections.deque(range(count))  # for a token
    throttles = [0] * count
    held = in_server = answered = refused = sent = 0
    start = now = last = 1000 + jitter.random()
    client = Scheduler(random.Random(seed + 1_000_003), share, cpu_slice)

    def push(when: float, event: str, request: int, at: float = 0.0, holding: int = 0) -> None:
        # Every event but the server's own happens in the client, when it is on the CPU.
        when = when if event == "served" else client.awake(when)
        heapq.heappush(events, (when, next(order), event, request, at, window.epoch, holding))

    # A request asleep on its turn is booked again when the pace is raised at once, if that
    # comes sooner (`AdaptiveLimiter.take_turn`): its "send" events are stamped, and only the
    # latest stamp of each is sent.
    stamps = [0] * count
    turns: dict[int, float] = {}  # request: the turn it is asleep on
    raises = window.raises

    def book(request: int) -> None:
        stamps[request] += 1
        turn = now + window.reserve(now=now)
        if request in turns:
            turn = min(turn, turns[request])
        if turn > now:
            turns[request] = turn
        push(turn, "send", request, holding=stamps[request])

    def book_again_if_raised() -> None:
        nonlocal raises
        if window.raises != raises:
            raises = window.raises
            for request in sorted(turns, key=turns.__getitem__):
                book(request)

    def take_tokens() -> None:
        nonlocal held
        while waiting and held < window.total_tokens:
            held += 1
            book(waiting.popleft())

    def delay() -> float:
        return jitter.expovariate(1 / load) if load else 0.0

    take_tokens()
    while events:
        now, _, event, request, at, epoch, holding = heapq.heappop(events)
        if event == "send":
            if holding != stamps[request]:
                continue  # booked again since
            turns.pop(request, None)
            if held > window.total_tokens:  # the window shrank: the token goes back, unsent
                held -= 1
                waiting.append(request)
                take_tokens()
                continue
            sent += 1
            admission.arrives(str(request), now)
            if admission.judge(server_limits, now, in_server + 1).refused:
                push(now + 0.001 + 0.002 * jitter.random() + delay(), "refused", request, now, held)
            else:
                in_server += 1
                served = now + kind.latency + 0.005 * jitter.random()
                push(served, "served", request, now, held)
        elif event == "served":  # the server's place is free; the client hears of it later
            in_server -= 1
            when = client.awake(now + delay())
            heapq.heappush(events, (when, next(order), "answer", request, at, epoch, holding))
        elif event == "answer":
            window.record(Outcome.ANSWERED, now - at, epoch, holding, now=now)
            book_again_if_raised()
            held -= 1
            answered += 1
            last = now
            take_tokens()
        elif event == "refused":
            refused += 1
            window.record(Outcome.THROTTLED, now - at, epoch, holding, now=now)
            wait = retry.delay(throttles[request], most=PACED_WAIT_MOST)
            throttles[request] += 1
            if held > window.total_tokens:  # the window shrank: wait without the token
                held -= 1
                push(now + wait, "queue", request)
                take_tokens()
            else:
                push(now + wait, "retry", request)
        elif event == "retry":
            book(request)
        else:  # "queue"
            waiting.append(request)
            take_tokens()
    return Read(count / kind.admits(last - start, ceiling), refused / sent)


def summary(reads: list[Read]) -> str:
    shares = sorted(read.share for read in reads)
    refused = sorted(read.refused for read in reads)
    tenth = len(reads) // 10
    return (
        f"{statistics.median(shares):.1%} (p10 {shares[tenth]:.1%}, least {shares[0]:.1%}) / "
        f"{statistics.median(refused):.1%} (p90 {refused[-1 - tenth]:.1%}, most {refused[-1]:.1%})"
        f" | {sum(s < 0.9 for s in shares)}+{sum(r > 0.1 for r in refused)} of {len(reads)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(REPLAYED), help="comma-separated kinds")
    parser.add_argument("--count", type=int, default=1500, help="x2 for the 480/s servers")
    parser.add_argument("--ceilings", default="32,128,256", help="comma-separated")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--load-ms", type=float, default=0.0)
    parser.add_argument("--share", type=float, default=1.0, help="of the CPU, the client's")
    parser.add_argument("--slice-ms", type=float, default=4.0)
    options = parser.parse_args(argv)
    print("| kind | ceiling | share of what it admits / refused | seeds missing |")
    print("|---|---|---|---|")
    for name in options.only.split(","):
        for ceiling in (int(c) for c in options.ceilings.split(",")):
            count = options.count * SERVERS[name].reads
            reads = [
                replay(
                    name,
                    count,
                    ceiling,
                    seed,
                    options.load_ms / 1000,
                    options.share,
                    options.slice_ms / 1000,
                )
                for seed in range(options.seeds)
            ]
            print(f"| {name} | {ceiling} | {summary(reads)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
