"""An adaptive window of requests in flight: a `Limiter` whose bound follows the server.

A fixed window is wrong both ways: too small leaves a fast server idle, too large hammers a
throttled one (measured: 128 in flight against a server admitting 300 requests/s got
80% of that rate with 59% of requests throttled). `AdaptiveLimiter` keeps a window between 1 and
``ceiling`` and feeds it the outcome and latency of every request:

* **Start**: ``initial`` tokens (32, the fixed window of old), growing by one per answered
  request while the window is in use (TCP's slow start: the window doubles per round trip), so
  a fast server is reached within a few round trips; it ends at the first throttling signal.
* **Throttled** (429, 503, S3's ``SlowDown`` and kin) **or timed out**: the window shrinks
  multiplicatively, x ``beta`` (0.9) for the first signal of an episode; the answers to
  requests sent *before* that decrease each take a little more off (x 0.95), so the
  decrease grows with how far over the limit the window was.
* **Growth after a decrease** follows CUBIC (the curve the AWS SDKs' adaptive retry mode uses for
  its sending rate), in wall-clock seconds: W(t) = W_max + C (t - K)^3, back to the window that
  was throttled (W_max) quickly, then flat around it, then probing beyond. Throttling by request
  rate (S3's per-prefix limit) is a limit in *time*, so the probing is paced in time, not in
  round trips: a 20 ms server is not probed fifty times more often than a 1 s one.
* **Latency**: no growth while the recent latency (a short average) exceeds twice the long-run
  one: a server that queues instead of refusing shows its overload as latency (Netflix's
  Gradient2 idea).
* **App-limited**: no growth unless at least half the window is in use, so a caller making one
  request at a time does not open a window nobody tested.

Why not the others: AIMD (+1 per round trip, x0.9) probes per round trip, so at 20 ms it
overshoots a rate limit every few tens of milliseconds; Vegas and Gradient2 read only latency,
and S3 answers throttled requests at once with a 503 instead of queuing them, so their latency
signal never moves. The AWS SDKs adapt a *rate* (a token bucket) where we adapt a *window*: a
window bounds the server's work in flight whatever its latency, and it is what the limiter the
stores share already is.

Measured (``benchmarks/throttling.py``, servers in their own processes, 2 shared cores at load
3.5-7.8): against a server admitting 300 requests/s at 20 ms, 87-94% of that rate with 3% of
requests throttled at any ceiling from 32 to 256, where a fixed window at the server's limit,
known in advance, got 88-93% and zarr.storage.ObjectStore 94% with 9% throttled; against one
admitting 48 in flight at 100 ms, 66-85% of 480/s with 1% throttled (that oracle: 78-89%);
against an unthrottled 200 ms server, 94-105% of a fixed window of 128.
"""

from __future__ import annotations

import enum
import functools
import math
import threading
import time
from typing import Any

from .limit import Limiter, copy_in_process

__all__ = ["DEFAULT_CEILING", "AdaptiveLimiter", "Outcome"]

DEFAULT_CEILING = 128
INITIAL_WINDOW = 32


class Outcome(enum.Enum):
    """What became of one request, as the window sees it."""

    ANSWERED = "answered"  # the server answered normally (a 404 is an answer too)
    THROTTLED = "throttled"  # it asked us to slow down
    TIMED_OUT = "timed out"  # no answer within the timeout
    FAILED = "failed"  # another failure (a dropped connection, a 500): says nothing of load


class AdaptiveLimiter(Limiter):
    """A `Limiter` whose ``total_tokens`` (the window) adapts between 1 and ``ceiling``.

    Share one between stores that hit the same bucket (``limiter=``): they then share one window.
    ``beta`` is the factor of a decrease, ``scale`` CUBIC's C (tokens per second cubed).
    """

    def __init__(
        self,
        ceiling: int = DEFAULT_CEILING,
        *,
        initial: int = INITIAL_WINDOW,
        beta: float = 0.9,
        scale: float = 10.0,
    ) -> None:
        if not isinstance(ceiling, int) or isinstance(ceiling, bool) or ceiling < 1:
            raise ValueError(f"ceiling must be an int of at least 1, got {ceiling!r}")
        if not 0 < beta < 1:
            raise ValueError(f"beta must be between 0 and 1, got {beta}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        initial = max(1, min(ceiling, initial))
        super().__init__(initial)
        self._ceiling = ceiling
        self._initial = initial
        self._beta = beta
        self._scale = scale
        self._state = threading.Lock()
        self._window = float(initial)
        self._slow_start = True
        self._w_max = float(ceiling)
        self._k = 0.0
        self._last_decrease = time.monotonic()
        self._epoch = 0
        self._short_latency: float | None = None
        self._long_latency: float | None = None
        self.decreases = 0

    @property
    def ceiling(self) -> int:
        """The most tokens the window may grow to (a store's ``max_concurrency``)."""
        return self._ceiling

    @property
    def window(self) -> float:
        """The window, unrounded; ``total_tokens`` is it rounded."""
        return self._window

    @property
    def epoch(self) -> int:
        """How many decreases so far: a request notes it when it starts, and its throttling
        answer counts only if no decrease happened since (one decrease per round trip)."""
        return self._epoch

    def record(self, outcome: Outcome, latency: float, epoch: int, in_flight: int) -> None:
        """Feed the window one request's outcome: its latency (seconds), the `epoch` it started
        in and how many requests were in flight with it."""
        with self._state:
            now = time.monotonic()
            if outcome in (Outcome.THROTTLED, Outcome.TIMED_OUT):
                self._decrease(now, new_episode=epoch == self._epoch)
            elif outcome is Outcome.ANSWERED:
                self._note_latency(latency)
                if in_flight * 2 < self._window or self._queueing():
                    return
                self._grow(now)
            else:
                return
            tokens = max(1, min(self._ceiling, round(self._window)))
        if tokens != self.total_tokens:
            self.total_tokens = tokens

    # ------------------------------------------------------------------ the control law

    def _decrease(self, now: float, *, new_episode: bool) -> None:
        if new_episode:
            # The first signal of an episode: the window that was too much is W_max.
            self._w_max = self._window
            self._epoch += 1
            beta = self._beta
        else:
            # More signals of the same episode (requests sent before its first decrease): how
            # many there are says how far over the limit the window was, so each takes a
            # little more off, and a big overshoot (slow start's can be twice the limit, or
            # far more from the initial window) comes down in one round trip, where TCP's
            # halving would leave a small one at half the server's capacity.
            beta = (1 + self._beta) / 2
        self._window = max(1.0, self._window * beta)
        self._k = (max(0.0, self._w_max - self._window) / self._scale) ** (1 / 3)
        self._last_decrease = now
        self._slow_start = False
        self.decreases += 1

    def _grow(self, now: float) -> None:
        if self._slow_start:
            target = self._window + 1
        else:
            elapsed = now - self._last_decrease
            target = self._w_max + self._scale * (elapsed - self._k) ** 3
            # One answer opens at most one more token: after a quiet spell the curve may be far
            # ahead, and the window should still grow only as answers prove it.
            target = min(target, self._window + 1)
        self._window = min(float(self._ceiling), max(self._window, target))

    def _note_latency(self, latency: float) -> None:
        if not math.isfinite(latency) or latency < 0:
            return
        if self._short_latency is None or self._long_latency is None:
            self._short_latency = self._long_latency = latency
            return
        self._short_latency += 0.1 * (latency - self._short_latency)
        self._long_latency += 0.01 * (latency - self._long_latency)

    def _queueing(self) -> bool:
        short, long = self._short_latency, self._long_latency
        return short is not None and long is not None and short > 2 * long

    def _after_fork_in_child(self) -> None:
        # The window is knowledge of the server, kept; the lock may have been held by a thread
        # the child does not have.
        self._state = threading.Lock()
        super()._after_fork_in_child()

    # ------------------------------------------------------------------ identity

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process starts afresh with the same settings.
        rebuild = functools.partial(
            _rebuild, type(self), self._ceiling, self._initial, self._beta, self._scale
        )
        return (copy_in_process, (self._origin, self._token, rebuild))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ceiling={self._ceiling}, window={self._window:.1f}, "
            f"in use={self.borrowed_tokens})"
        )


def _rebuild(
    cls: type[AdaptiveLimiter], ceiling: int, initial: int, beta: float, scale: float
) -> AdaptiveLimiter:
    return cls(ceiling, initial=initial, beta=beta, scale=scale)
