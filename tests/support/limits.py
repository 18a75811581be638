"""How a loopback server limits its clients: one policy, shared by the tests' threaded server
(`servers.HTTPServer`) and the benchmarks' asyncio one (`benchmarks/throttle_http.py`, in a
process of its own), so that both meet a client with the same kinds of limiter.

Servers limit in different ways, and a client tuned against one can break against another: a
token bucket, a sliding or a fixed one-second window, a cap on requests in flight (refusing, or
queueing: latency grows, nothing is refused), a rate that changes while a read runs, and a
refusal that says when to come back (``Retry-After``). `Admission` holds a server's state and
judges each request; it does no I/O and takes no lock (its caller holds one, or runs on one
event loop), and it gives a queued request the seconds to wait rather than waiting itself, so
threads and coroutines sleep their own way.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import math
from dataclasses import dataclass, field

__all__ = ["Admission", "Limits", "Verdict"]


@dataclass(frozen=True)
class Limits:
    """What a server admits; ``None``: no such limit. Refused requests count against none."""

    rate: float | None = None  # requests a second (a token bucket, GCRA)
    burst: int = 1  # how many may come at once within the rate
    # The rate changes while the server runs: (seconds after its first request, requests a
    # second), in order. ``rate`` holds before the first change.
    rate_changes: tuple[tuple[float, float], ...] = ()
    concurrency: int | None = None  # requests in flight (counting the one arriving)
    # Beyond ``concurrency``, wait for a place (each held ``service`` seconds) instead of
    # being refused: a server with a pool of workers and a backlog. Nothing is refused.
    queue: bool = False
    service: float = 0.0
    window: int | None = None  # requests in any one second ("sliding") or each second of the clock
    window_kind: str = "sliding"  # or "fixed": the count resets on the second


@dataclass(frozen=True)
class Verdict:
    refused: bool
    wait: float = 0.0  # seconds to queue before serving (`Limits.queue`)


@dataclass
class Admission:
    """One server's limiter state and its counts (the server's own)."""

    started: float | None = None  # when the first request came: the clock of `rate_changes`
    # Per phase of the rate (before the first change, after each): [admitted, refused].
    phases: list[list[int]] = field(default_factory=lambda: [[0, 0]])
    queued: int = 0  # requests that waited for a place
    early: int = 0  # requests that came back sooner than a Retry-After asked
    _next_slot: float = 0.0
    _slot_rate: float | None = None  # the rate `_next_slot` was booked at
    _window: collections.deque[float] = field(default_factory=collections.deque)
    _places: list[float] = field(default_factory=list)  # when each busy place comes free
    _not_before: dict[str, float] = field(default_factory=dict)

    def arrives(self, key: str, now: float) -> bool:
        """Count a request for ``key`` arriving ``now``; whether it came back early."""
        if self.started is None:
            self.started = now
        early = now < self._not_before.pop(key, -math.inf)
        self.early += early
        return early

    def judge(self, limits: Limits, now: float, in_flight: int) -> Verdict:
        """Admit or refuse a request that `arrives` ``now`` with ``in_flight`` requests (this
        one included) in the server."""
        assert self.started is not None, "arrives() first"
        phase = self._phase(limits, now)
        while len(self.phases) <= phase:
            self.phases.append([0, 0])
        refused = self._refuses(limits, now, in_flight, phase)
        self.phases[phase][refused] += 1
        if refused:
            return Verdict(True)
        return Verdict(False, self._queue(limits, now) if limits.queue else 0.0)

    def told_retry_after(self, key: str, now: float, seconds: float) -> None:
        """The answer for ``key`` asked to come back in ``seconds``: sooner is early."""
        self._not_before[key] = now + seconds

    def _phase(self, limits: Limits, now: float) -> int:
        assert self.started is not None
        changes = [after for after, _ in limits.rate_changes]
        return bisect.bisect_right(changes, now - self.started)

    def _refuses(self, limits: Limits, now: float, in_flight: int, phase: int) -> bool:
        if not limits.queue and limits.concurrency is not None and in_flight > limits.concurrency:
            return True
        rate = limits.rate_changes[phase - 1][1] if phase else limits.rate
        if rate is not None:
            # A token bucket (GCRA): admitted if its slot is within the burst.
            interval = 1.0 / rate
            if self._slot_rate is not None and self._slot_rate != rate:
                # The rate changed: the tokens the bucket is short refill at the new rate
                # (kept as a time booked ahead at the old rate, a bucket whose rate rose from
                # 100 to 300 a second refused for the 60 ms of the slow refill it had booked).
                ahead = max(0.0, self._next_slot - now)
                self._next_slot = now + ahead * self._slot_rate / rate
            self._slot_rate = rate
            slot = max(self._next_slot, now)
            if slot - now > (limits.burst - 1) * interval:
                return True
            self._next_slot = slot + interval
        if limits.window is not None:
            admitted = self._window
            if limits.window_kind == "fixed":
                while admitted and math.floor(admitted[0]) != math.floor(now):
                    admitted.popleft()
            else:
                while admitted and admitted[0] <= now - 1.0:
                    admitted.popleft()
            if len(admitted) >= limits.window:
                return True
            admitted.append(now)
        return False

    def _queue(self, limits: Limits, now: float) -> float:
        """Seconds until a place is free for a request arriving ``now``; takes the place."""
        places = self._places
        assert limits.concurrency is not None, "a queue needs its number of places"
        while places and places[0] <= now:
            heapq.heappop(places)
        start = now if len(places) < limits.concurrency else heapq.heappop(places)
        heapq.heappush(places, start + limits.service)
        self.queued += start > now
        return start - now
