"""An adaptive window of requests in flight: a `Limiter` whose bound follows the server.

A fixed window is wrong both ways: too small leaves a fast server idle, too large hammers a
throttled one (measured: 128 in flight against a server admitting 300 requests/s got
80% of that rate with 59% of requests throttled). `AdaptiveLimiter` keeps a window between 1 and
``ceiling`` and feeds it the outcome and latency of every request:

* **Start**: ``initial`` tokens (32, the fixed window of old), growing by one per answered
  request while the window is in use (TCP's slow start: the window doubles per round trip,
  but beyond 32 at most every 0.2 s of wall clock, so a 20 ms server is not sent 256 at once
  before its first refusal can arrive), so a fast server is reached within a few round trips;
  it ends at the first throttling signal.
* **Throttled** (429, 503, S3's ``SlowDown`` and kin) **or timed out**: the window shrinks
  multiplicatively, x ``beta`` (0.9) for the first signal of an episode; the answers to
  requests sent *before* that decrease each take a little more off (x 0.95), so the
  decrease grows with how far over the limit the window was. **Never below what the server
  was seen to admit**: the latencies of the last second's answers, summed, over that second
  (Little's law: how many it held at once without refusing). A window limiter (300 requests
  in any second, or in each second of the clock) refuses everything once its count is spent,
  however few are sent; without the floor a burst of such refusals took the window to 1-3,
  where it stayed after the server admitted again.
* **Paced after a throttle**: a window bounds requests in flight, not requests a second, and a
  server that counts per second and refuses at once (in a millisecond) is sent the window
  again every millisecond. So the first throttle of a run also paces attempts at the rate of
  the last second's answers (none before a second of answers: less is no rate, and meanwhile
  a spent count is only probed, at 3% of the answers a second or 10 a second, until it
  answers; nor before a second after a slow start that ended within its first second, whose
  burst a fixed window reset in the middle of admits twice over; and, once two seconds of
  answers are behind, no more than half of those two seconds' answers, or the rate that held
  if more: a second that holds a fixed window's reset can hold two of its counts; the AWS
  SDKs' adaptive mode paces its sending rate the same way), each further throttle with no
  answer between halves that pace (down to 3%: the server's count is spent, and probing backs
  off), the first answer restores it (after a spent count early in a read, no higher than the
  second before it answered: that second ends at a fixed window's reset, and holds one of its
  counts), and
  every answer raises it by a tenth of an attempt a second (10% a
  second) right after a throttle, that growth doubling for every 0.3 s without one (a limit
  that holds is probed gently, one that has risen is found in seconds); beyond the rate that
  held (below) it grows only while under 1.1 times the last second's answers, so a second in
  which the pace did not bind (a fixed window's count left unspent, its tokens asleep in
  their backoffs) does not run the growth on. Throttled requests go again under the same
  pace, spread, not as one burst at the start of the next second. While the pace binds with
  room to spare (the window over twice what the pace keeps in flight), the window does not
  grow (its requests wait their turns holding tokens, which proves nothing); pacing ends once
  twice the throttled rate is answered cleanly (or twice the rate that held, below). A
  throttle that finds the window full of requests the server held (`WINDOW_BOUND`: a cap on
  requests in flight, not a rate) paces no lower than what the window sends after its decrease
  and does not step the pace down: the window's decrease is the step. The pace is a rate, not
  a gap between each two sends: turns a client busy elsewhere could not take (its answers
  heard in a bunch, after its process waited for the CPU) are taken late, up to
  `PACE_CREDIT`'s worth (0.02 s of turns), where each of the bunch's requests waited a turn
  holding a token (against 48 in flight at load 2: 76-79% of what the server admitted, where
  a fixed window of 48 got 90-92%). A pace raised at once (a spent count's first answer, the
  first answer after a run of throttles, pacing's end) books again the turns attempts are
  asleep on (`take_turn`): booked a tenth of a second apart while a spent count was probed,
  they held the window's tokens for up to 2.5 s after the server admitted again.
* **Return to the rate that held**: a server that lowers its limit for a while and raises it
  again (300 requests/s, 100, 300) leaves the pace at the low rate, and probing up from it took
  seconds. So the pace remembers the rate that held (the highest answered over a second when a
  run of throttles began, as CUBIC remembers the window that was throttled: a rate answered,
  never a pace stepped down from), and once it is below 80% of it and answers have run clean
  for 0.2 s it returns there along a concave curve in 0.3 s (most of the way in the first
  tenth), the window following it one per answer; beyond it the doubling growth probes on, as
  far as answers keep up. A return the server refuses makes the next wait twice as long (up to
  2.4 s; the second refused in a row keeps the first's 0.4 s: a limit lowered for two seconds
  refuses two, the second often just before it comes back), and each one after the first also
  aims a tenth lower, so a limit that fell for good is forgotten in a few returns. A throttle
  within a second of a return's start takes the pace to the rate answered since it began, and
  one after answers ran clean for 0.2 s a step down from where it was (x ``beta``), rather than
  to the last second's rate, which lags a pace that was climbing.
* **Retry-After**: a throttle that says when to come back costs its request that long (one
  refused in a read's last second holds the whole read), so refusals are made seldom: the pace
  starts a step below the rate answered (x 0.97) and does not probe upward until the wait and
  four seconds more have passed (it returns to the rate that held once the wait has passed);
  its request waits without its token and without its bulk call's worker (the store's part),
  so the pace, not a window of sleeping requests, sets the rate meanwhile.
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

Measured (``benchmarks/throttling.py --only ...``, servers in their own processes, 2 shared cores,
1,500 reads of 4 KiB; medians of two runs (one for the last two servers), both stores, ceilings 32,
128 and 256, load 3.6-5.6): against a sliding window of 300 requests a second at 20 ms, 90-94% of
that rate with 6-11% of requests throttled (the rules before the floor and the pace, interleaved
with these in one session at load 6-11: 74-79%, 7-16%; zarr.storage.ObjectStore 100%, 7%); against
a fixed window reset on the second, 96-112% with 6-11% throttled (before: 77-85%, 8-15%; zarr's
106%, 5%); against a token bucket of 300/s, 95-99% with 2-3% throttled (zarr's 98%, 10%); against
48 in flight at 100 ms, 82-90% of 480/s at ceilings 128 and 256 with at most 1% throttled (a fixed
window of 48, known in advance: 93%); against an unthrottled 200 ms server, 89% of a fixed window
of 128. FsspecStore at ceiling 128 is throttled 11% against both window servers: what is left is
slow start's first burst, the requests in flight when the first refusal of a spent second arrives.
With the return to the rate that held and the Retry-After rules (three runs of the drop and
Retry-After servers, both stores, the three ceilings, load 3-7): against a token bucket that
drops from 300 to 100 requests/s for two seconds, 67-92% of what it admitted (median per cell
80-91%) with 6-9% throttled, where the rules before got 72-75% on a quiet machine and 60-69%
at load 2.5 (a fake-clock replay of that server: 97% of its rate in the 2.5 s after the return,
against 56%); against 429s with ``Retry-After: 1``, FsspecStore 75-98% (median 86-97%),
before 78-85% (the loss is a refused request's second at the end of the read, and whether one
falls there is luck). Against the fixed window, interleaved with the rules before at load 4-7,
7-23% throttled where those got 6-14%: not told apart from the load in the time there was.
With the step below the rate and the quiet after a ``Retry-After`` (and the store's waiting
requests lending their workers), FsspecStore against 429s with ``Retry-After: 1``: 97-99% with
2% throttled at every ceiling over three runs at load 0.6-3.2, its refusals all in a read's
first 1.4 s (traced), where the rules before got 84-86% in the same session. Traced against the
fixed window (docs/remote.md, "The fixed window and the drop, traced"), a read that started late
in a clock second was paced at, and remembered as the rate that held, 440-650 requests/s
against 300; with the rate measured a second after a short slow start, the rate that held only
a rate answered, and the rate after a return counted from its start, a fake-clock replay is
refused 98-111 times in the 4 s after the first two (267-323 before), interleaved reads at
ceiling 128 a median 140 times (155 before), and the drop's reads are as before (median
6.87 s against 6.83 s). With a throttle's rate checked against two seconds' answers and the
pace's growth held to answers that keep up (both beyond the rate that held), thirteen pairs of
fixed-window runs interleaved with the rules before (load 0.4-2.6, 78 cells a side): refused a
median 7.3% of requests (7.6%), 9.5% at the 90th percentile (11.6%), 4 cells over 10% (19).
With the window-bound rule and the store's throttled requests waiting at most 1 s, replayed
on a fake clock (``benchmarks/throttling_replay.py``, 40 seeds, docs/remote.md): the sliding
window 93.5% of its rate where it was 91.7% (14 seeds of 40 under 90%, 1 now), the 48-place
server 92.7% (92.1%). With a spent count probed before there is a rate, the pace's floor at 3%
of the rate (a tenth before), what the window sends checked as the rate answered is, and the
pace checked after a spent count (the replay, 40 seeds at ceiling 128, docs/remote.md): the
fixed window refused 5.5% (p90 6.3%) where it was 6.6% (p90 9.5%, 3 seeds over 10%), the
sliding window 95.0% of its rate (least 93.0%) where it was 93.5% (least 89.8%); with a slow
client (``--load-ms 15``) the fixed window's seeds over 10% went from 16 of 40 to 1.
"""

from __future__ import annotations

import collections
import enum
import functools
import math
import threading
import time
from typing import Any

import anyio

from .limit import Limiter, Waiter, copy_in_process
from .loops import current_loop_key, waker

__all__ = ["DEFAULT_CEILING", "AdaptiveLimiter", "Outcome"]

DEFAULT_CEILING = 128
INITIAL_WINDOW = 32
SEEN_HORIZON = 1.0
"""Seconds of answers the floor of a decrease is measured over: the period rate limits are
counted in (per second, whether by token bucket, sliding or fixed window)."""
PACE_GROWTH = 0.1
"""How much each answer raises the pace (attempts a second) right after a throttle: 10% of the
pace per second, doubling for every `PACE_DOUBLING` seconds without one."""
PACE_DOUBLING = 0.3
"""Seconds without a throttle after which the pace's growth doubles."""
PACE_FLOOR = 0.03
"""The least share of the last second's answers a run of throttles backs the pace off to: the
rate a spent count is probed at (a fake-clock replay of the fixed window's reads at ceiling 128,
a spent count probed before there is a rate: refused at the 90th percentile 7.7% at a tenth,
6.3% at 3%; the sliding window's least share 90.6% and 93.0%)."""
PROBE_LEAST = 10.0
"""Before there is a rate (less than a second of answers), a spent count is probed at
`PACE_FLOOR` of the answers so far a second, and no less often than this a second: a handful of
answers is no rate to probe by."""
SPENT_GAP = 0.1
"""Seconds without an answer that say the server's count was spent, if it refused until just
before (within twice this of sending the answered request) and for less than a second: the
first answer after them came at its reset (`_speed_up`)."""
RATE_CHECK = 2.0
"""Seconds of answers a throttle's rate is checked against, once there are that many: a fixed
window (a count reset on the clock's second) admits up to two counts in a second that holds its
reset."""
PACE_LEAD = 1.1
"""Beyond the rate that held, the pace grows only while under this share of the last second's
answers (botocore's adaptive mode keeps its rate under twice the rate it measures itself
sending)."""
SLOW_START_DOUBLING = 0.2
"""Slow start doubles the window at most this often (seconds), however fast the answers."""
RETURN_BELOW = 0.8
"""A pace below this share of the rate that held returns to it (`RETURN_TIME`) once clean."""
RETURN_AFTER = 0.2
"""Seconds without a throttle before the pace returns to the rate that held; doubled by the
first return the server refuses and by each after the second, up to `RETURN_AFTER_MOST`."""
RETURN_AFTER_MOST = 2.4
RETRY_AFTER_STEP = 0.97
"""A throttle told when to come back (``Retry-After``) paces at this share of the rate answered."""
RETRY_AFTER_QUIET = 4.0
"""Seconds past a ``Retry-After``'s wait before the pace probes upward again."""
RETURN_TIME = 0.3
"""Seconds a return takes from its start to the rate that held (a concave curve: most of the
way in the first tenth of a second, then gently up to it)."""
PACE_CREDIT = 0.02
"""Seconds of turns the pace keeps for a client that could not take them in time: the pace is a
rate, not a gap between each two sends. A client sharing its cores hears answers in bunches
(its process waited for the CPU while they came), and paced one turn apart the bunch's next
requests waited their turns holding the window's tokens: against a cap of 48 in flight, 75% of
requests waited, 10-13 ms each (traced, load 2 on 2 cores: 76-79% of what the server admitted,
a fixed window of 48 got 90-92%). While a pace holds, no second sends more than the pace and
this many seconds' turns; the credit does not outlive a pace (`_book`)."""
WINDOW_BOUND = 0.8
"""A throttle found the window bound (its requests, not a rate, the limit: a cap on requests in
flight) when the server was seen to hold at least this share of it (`admitted`)."""


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
        self._first_answer: float | None = None  # when slow start began
        self._w_max = float(ceiling)
        self._k = 0.0
        self._last_decrease = time.monotonic()
        self._epoch = 0
        self._short_latency: float | None = None
        self._long_latency: float | None = None
        # The answers of the last SEEN_HORIZON seconds, (time, latency), and their latencies'
        # sum: the floor of a decrease (`admitted`).
        self._answers: collections.deque[tuple[float, float]] = collections.deque()
        self._answered_time = 0.0
        # When the answers of the last `RATE_CHECK` seconds came: the check on a throttle's rate.
        self._answered_at: collections.deque[float] = collections.deque()
        # After a throttle, attempts are paced at the rate the server was seen to admit
        # (`pace`); None while not pacing. `_next_send` is the next free slot.
        self._pace: float | None = None
        self._next_send = 0.0
        # The pace is only a probe's, before there is a rate: the first answer ends it.
        self._probing = False
        # Attempts asleep on their turns (`take_turn`), each with its turn (a one-item list:
        # booked again in place when the pace is raised at once, `_book_again`); `_raises`
        # counts those raises.
        self._turn_waiters: dict[Waiter, list[float]] = {}
        self._raises = 0
        # The rate answered when the current run of throttles began (None: answers came since
        # the last throttle): the least the pace backs off to.
        self._streak_rate: float | None = None
        self._pace_floor = 1.0
        self._paced_from = 0.0  # the pace a run of throttles began at
        self._first_sent: float | None = None  # when the first answered request was sent
        # The highest rate answered when a run of throttles began: the rate that held before
        # the server dropped its limit, which the pace returns to once answers run clean.
        self._held = 0.0
        # The rate that held before the current run of throttles raised it, whether the run's
        # pace was what the window sends (`_window_sends`), and whether its rate had less than
        # `RATE_CHECK` to be checked by: the check of both once the server admits again after
        # a spent count (`_speed_up`).
        self._held_before = 0.0
        self._streak_bound = False
        self._streak_unchecked = False
        # When the last throttle came.
        self._last_throttle = -math.inf
        # Returns refused in a row, since the last that reached its rate: how long the next
        # waits (`_return_wait`).
        self._refused_returns = 0
        # When a slow start shorter than a second ended (-inf: none did): its answers, bunched
        # by a fixed window's reset, are no rate for a second after it.
        self._slow_start_ended = -math.inf
        # When the last return began: for a second after, the last second's rate lags it.
        self._return_began = -math.inf
        # The return under way: (when it began, the pace it began from); None: none.
        self._returning: tuple[float, float] | None = None
        # The pace does not grow before this (a Retry-After's wait).
        self._hold_until = -math.inf
        # Nor probe upward before this (a Retry-After's wait, and `RETRY_AFTER_QUIET` more).
        self._quiet_until = -math.inf
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

    def admitted(self, now: float | None = None) -> float:
        """How many requests the server was seen to hold at once without refusing any: the
        latencies of the answers of the second before ``now``, summed, over that second
        (Little's law: answered requests per second x their mean latency). No decrease goes
        below it."""
        with self._state:
            self._forget_answers(time.monotonic() if now is None else now)
            return self._answered_time / SEEN_HORIZON

    @property
    def pace(self) -> float | None:
        """Attempts a second while pacing after a throttle, or ``None`` while not pacing."""
        return self._pace

    @property
    def raises(self) -> int:
        """How many times the pace was raised at once (the server admits again): a turn booked
        before one is booked again (`take_turn`)."""
        return self._raises

    def reserve(self, now: float | None = None) -> float:
        """Book the next attempt's turn under the pace: seconds to wait before sending it
        (0 while not pacing). Turns are reservations, so no attempt overtakes another."""
        with self._state:
            return self._reserve(time.monotonic() if now is None else now)

    def _reserve(self, now: float) -> float:
        if self._pace is None:
            return 0.0
        # Turns not taken while the client was busy elsewhere are taken late, up to
        # `PACE_CREDIT` of them (`_book`).
        start = max(self._next_send, now - PACE_CREDIT)
        self._next_send = start + 1 / self._pace
        return max(0.0, start - now)

    async def take_turn(self, not_after: float | None = None) -> bool:
        """Book the next attempt's turn under the pace (`reserve`) and wait for it; ``False``,
        having waited nothing, if it falls after ``not_after`` (`time.monotonic`).

        A pace raised at once while it waits (the first answer after a spent count or after a
        run of throttles, or pacing's end) books its turn again under the new pace, if that
        comes sooner: turns booked while a spent count was probed (10 a second) held their
        tokens asleep for up to 2.5 s after the server admitted again (traced: a window of 26,
        8-47 answers a tenth of a second where it could answer 100)."""
        with self._state:
            now = time.monotonic()
            turn = [now + self._reserve(now)]
            raises = self._raises
        if not_after is not None and turn[0] > not_after:
            return False
        if turn[0] <= now:
            return True
        # Waited for on the event loop's own clock, which a test's clock may move faster than
        # `time.monotonic` (trio's MockClock): waited for on the monotonic one, each wait ended
        # at once and the loop spun until real time reached the turn.
        deadline = anyio.current_time() + (turn[0] - now)
        while True:
            booked = turn[0]
            event = anyio.Event()
            waiter = Waiter(event, waker(current_loop_key()))
            with self._state:
                asleep = raises == self._raises
                if asleep:
                    self._turn_waiters[waiter] = turn
                else:
                    # Raised between its booking and its sleep: booked again here.
                    self._book_sooner(turn, time.monotonic())
                    raises = self._raises
            if asleep:
                try:
                    with anyio.move_on_at(deadline) as sleep:
                        await event.wait()
                finally:
                    with self._state:
                        self._turn_waiters.pop(waiter, None)
                        raises = self._raises
                if sleep.cancelled_caught:
                    return True
            # Booked again, no later than it was.
            deadline -= booked - turn[0]
            if deadline <= anyio.current_time():
                return True

    def record(
        self,
        outcome: Outcome,
        latency: float,
        epoch: int,
        in_flight: int,
        *,
        now: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Feed the window one request's outcome: its latency (seconds), the `epoch` it started
        in and how many requests were in flight with it; ``now`` is when it ended on the
        `time.monotonic` clock (default: now); ``retry_after``: the seconds a throttling
        answer asked to wait (its ``Retry-After``), if it said."""
        with self._state:
            if now is None:
                now = time.monotonic()
            raises = self._raises
            tokens = self._record(outcome, latency, epoch, in_flight, now, retry_after)
            woken = self._book_again(now) if self._raises != raises else []
        for waiter in woken:
            waiter.notify()
        if tokens is not None and tokens != self.total_tokens:
            self.total_tokens = tokens

    def _record(
        self,
        outcome: Outcome,
        latency: float,
        epoch: int,
        in_flight: int,
        now: float,
        retry_after: float | None,
    ) -> int | None:
        """`record`, under the lock: the window's new token count (``None``: unchanged)."""
        self._forget_answers(now)
        if outcome in (Outcome.THROTTLED, Outcome.TIMED_OUT):
            if outcome is Outcome.THROTTLED:
                self._last_throttle = now
            new_episode = epoch == self._epoch
            clean = now - self._last_decrease
            self._decrease(now, new_episode=new_episode)
            told = retry_after is not None and retry_after > 0
            if new_episode:
                self._slow_to_admitted(now, clean, told=told)
            if retry_after is not None and told:
                self._told_to_wait(now, retry_after)
        elif outcome is Outcome.ANSWERED:
            self._note_latency(latency)
            self._note_answer(now, latency)
            self._speed_up(now)
            if in_flight * 2 < self._window or self._queueing() or self._paced():
                return None
            if self._returning is not None:
                # On the way back to the rate that held, the pace bounds the rate: the
                # window follows it one per answer, where CUBIC would regrow it from what
                # the low rate taught it (2-3 in flight at 20 ms is 100-150 requests/s,
                # and it capped the return).
                self._window = min(float(self._ceiling), self._window + 1)
            else:
                self._grow(now)
        else:
            return None
        return max(1, min(self._ceiling, round(self._window)))

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
        # Never below what the server was just seen to admit: a burst of refusals from a window
        # limiter (every request of the rest of its second refused, however few are sent)
        # otherwise takes the window down to 1-3, where it stayed for a second after the server
        # admitted again and CUBIC regrew from that tiny peak (measured: 73-80% of a sliding
        # window's rate). A floor above the window does not raise it.
        floor = min(self._window, self._answered_time / SEEN_HORIZON)
        self._window = max(1.0, floor, self._window * beta)
        self._k = (max(0.0, self._w_max - self._window) / self._scale) ** (1 / 3)
        self._last_decrease = now
        first = self._first_sent
        if self._slow_start and first is not None and now - first < SEEN_HORIZON:
            # Slow start's answers come in a burst: against a fixed window whose second
            # resets during it, the burst spends two seconds' counts in a few tenths of a
            # second, and a second of answers that holds it counts both (measured: a pace,
            # and a rate that held, of 450-650 requests/s against 300).
            self._slow_start_ended = now
        self._slow_start = False
        self.decreases += 1

    def _slow_to_admitted(self, now: float, clean: float, *, told: bool = False) -> None:
        # A window bounds requests in flight, not requests a second: against a server that
        # counts per second and refuses at once, the window that answers in 20 ms sends many
        # times the server's rate. So a throttle also paces attempts at the rate the server
        # was just seen to answer, which smooths a burst into the server's rate and spreads
        # throttled requests' retries (they come back paced, not as one burst at the start of
        # the next second, which a fixed window refuses again).
        if self._streak_rate is None:
            first = self._first_sent
            if (
                first is None
                or now - max(first, self._slow_start_ended) < SEEN_HORIZON
                or not self._answers
            ):
                # Less than a second of answers is no rate: counted over the second it
                # underrates the server (measured: a pace of 30/s against 300/s admitted,
                # kept for the whole read), counted over their span it is our own backoff's
                # rate as much as the server's (measured: 45-70% of a token bucket's rate).
                # Nor is a second that holds a slow start shorter than a second (above).
                # But a count spent is probed gently meanwhile (`PACE_FLOOR`), until the first
                # answer: the window's tokens, each on its own backoff, probed the rest of a
                # fixed window's first spent second 25-40 times, as many as its first burst
                # refused (a fake-clock replay; docs/remote.md, "Replayed again").
                if self._answers and (self._pace is None or self._probing):
                    answered = len(self._answers) / SEEN_HORIZON
                    self._pace = max(PROBE_LEAST, PACE_FLOOR * answered)
                    self._probing = True
                    self._book(now)
                return
            rate = answered = self._answered_rate(now, first)
            # Against a cap on requests in flight (48 at 100 ms) the window binds, not a rate:
            # the last second's answers, counted while the window grew, put the pace below what
            # the window sent (386 requests/s where it sent 450), and each later throttle,
            # stepping the pace down a tenth, held it below (a fake-clock replay: 89.6% of the
            # server's 480, the window at the cap). So a throttle that finds the window full of
            # requests the server held paces no lower than what the window sends after its
            # decrease, and does not step the pace down: the window's decrease is the step.
            # (Not when told when to come back: a refusal there costs a second.)
            # What the window sends is checked as the rate answered is (`_checked`): against
            # a fixed window, a run of new-episode throttles (each refused in a millisecond,
            # sent after the decrease before) brings the window down to what the last second
            # held, which then looks bound, and that second, holding a reset, holds two
            # counts: paced at 490-570 requests/s against 300, each later second's count went
            # in half a second and the rest of it was refused (a fake-clock replay: the seeds
            # refused over 10% at ceiling 128, 3 of 40 before, 1 after).
            sending = None if told else self._window_sends()
            if sending is not None:
                sending = self._checked(sending, now, first)
                rate = max(rate, sending)
            if self._returning is not None and self._pace is not None:
                # Refused on the way back: the server has not (yet) come back to the rate
                # that held. The next return waits twice as long, and aims a step lower (as
                # CUBIC's fast convergence lowers W_max): a limit that dropped for good is
                # forgotten in a few returns, each costing a few refusals.
                # The first refused return only waits longer: a server that lowers its limit
                # for two seconds refuses the return made once the pace has come down, and a
                # step lower there left the pace short of the rate once it came back.
                # The second refused return waits no longer than the first: a limit lowered
                # for two seconds refuses two returns, the second often just before it comes
                # back, and doubled again the third waited 0.8 s past it (the drop server's
                # reads at 87-89%, one in 14; a fake-clock replay, 100 seeds: 5 under 90%, and
                # 22 with a loaded client, where this leaves 0 and 3). It costs a limit that
                # fell for good one more refused return (the replay, loaded: 9.7% of its
                # requests refused, 9.3% before).
                if self._refused_returns:
                    self._held *= self._beta
                self._refused_returns += 1
                self._returning = None
            elif self._pace is not None and now - self._return_began < SEEN_HORIZON:
                # Refused within a second of a return's start: the last second still counts
                # the low rate before it (after a return from 100 to 300 requests/s, refusals
                # with answers between took the pace to 140-200 for a third of a second), so
                # the rate is what was answered since the return began.
                since = self._return_began
                recent = sum(1 for when, _ in self._answers if when > since)
                rate = max(rate, recent / (now - since))
            elif self._pace is not None and clean >= RETURN_AFTER:
                # Refused after answers ran clean: a step down from the pace (x beta), not
                # down to the last second's rate, which lags a pace that was climbing (after a
                # return from 100 to 300 requests/s the second still counts the low rate, and
                # a stray refusal there took the pace back to 200).
                rate = max(rate, (1.0 if sending is not None else self._beta) * self._pace)
            # The rate that held is a rate answered, not a pace stepped down from: a pace
            # probing upward, stepped down at each refusal, ratcheted it up against a fixed
            # window (300, 400, 425, 443, 454 requests/s, one a second, against 300), and
            # each return then went back there.
            if clean >= RETURN_AFTER:
                self._held_before = self._held
            self._held = max(self._held, answered)
            if told:
                # Told when to come back: at the rate just answered the server refuses again
                # within a fraction of a second (see `_told_to_wait`).
                rate *= RETRY_AFTER_STEP
            self._streak_bound = sending is not None and sending >= rate
            self._streak_unchecked = now - first < RATE_CHECK
            self._streak_rate = rate
            self._pace = rate
            self._probing = False
            self._paced_from = rate
            # The least the pace backs off to: `PACE_FLOOR` of what the last second admitted.
            self._pace_floor = max(1.0, PACE_FLOOR * rate)
        elif self._pace is not None:
            # Refused again with no answer since: the server's count is spent (a window
            # limiter refuses the rest of its second however few are sent), so probing backs
            # off, halving the pace down to its floor, and the first answer restores it.
            self._pace = max(self._pace / 2, self._pace_floor)
        self._book(now)

    def _book(self, now: float) -> None:
        """The next turn under a pace just set: at most a turn away (a turn booked at a pace
        since lowered does not hold back the next), and not before now. No credit for turns not
        taken (`PACE_CREDIT`) outlives a pace: they were turns of another (or of none, before
        pacing began), and a throttle or a spent count's first answer is no time for a burst."""
        if self._pace is not None:
            self._next_send = min(max(self._next_send, now), now + 1 / self._pace)

    def _raise_pace(self) -> None:
        # Turns booked under the pace that was are booked again under this one (`record`).
        self._raises += 1

    def _book_again(self, now: float) -> list[Waiter]:
        """Book again the turns attempts are asleep on (`take_turn`), in their order: each
        keeps the earlier of its turn and the next free one. In the order their tasks happened
        to wake, a turn due soon could be booked after later ones, and the old schedule and the
        new were sent together (2.2 times the pace in the first tenth of a second). Gives the
        waiters, to be woken once the lock is let go."""
        asleep = sorted(self._turn_waiters.items(), key=lambda item: item[1][0])
        for _, turn in asleep:
            self._book_sooner(turn, now)
        self._turn_waiters.clear()
        return [waiter for waiter, _ in asleep]

    def _book_sooner(self, turn: list[float], now: float) -> None:
        # The earlier of the turn booked and the next free one (which is taken either way: the
        # pace is never exceeded by a turn booked again).
        turn[0] = min(turn[0], now + self._reserve(now))

    def _window_sends(self) -> float | None:
        """What the window sends a second, if a throttle found it bound (`WINDOW_BOUND`)."""
        latency = self._short_latency
        if not latency or self._answered_time / SEEN_HORIZON < WINDOW_BOUND * self._w_max:
            return None
        return self._window / latency

    def _answered_rate(self, now: float, first: float) -> float:
        return self._checked(len(self._answers) / SEEN_HORIZON, now, first)

    def _checked(self, rate: float, now: float, first: float) -> float:
        if now - first >= RATE_CHECK:
            # A fixed window admits its count again at its reset: a second of answers that
            # holds a reset counts the end of one count, left unspent (its tokens asleep in
            # their backoffs), and the next count, spent early: 470-550 requests/s against 300
            # (a fake-clock replay with the store's backoffs; traced in the benchmark, 440-550).
            # Paced there, and returned to as the rate that held, each later second's count
            # went early. Two seconds hold the same overshoot over twice the time (the replay:
            # 280 where the last second said 546). The check holds a rate only beyond the rate
            # that held: a second at 300 requests/s after a drop to 100 is over two seconds'
            # answers because the rate rose (the replay of the drop: 1 point less of what the
            # server admitted, checked below the rate that held too).
            rate = min(rate, max(self._held, len(self._answered_at) / RATE_CHECK))
        return rate

    def _after_spent_count(self) -> bool:
        """Whether the answer just noted ends a spent count: none for `SPENT_GAP` but less than
        a second (a fixed window resets within one: a longer gap is an outage, and its last
        second holds next to nothing), the server refusing until just before the answered
        request went (a gap our own pace made, probing a slow server at a request a second,
        says nothing of a reset). Read from the last second's answers: an answer before the
        one before it within that second is a gap under a second."""
        answers = self._answers
        if len(answers) < 2:
            return False
        (before, _), (answered, latency) = answers[-2], answers[-1]
        return (
            answered - before >= SPENT_GAP
            and answered - latency - self._last_throttle <= 2 * SPENT_GAP
        )

    def _speed_up(self, now: float) -> None:
        pace = self._pace
        if pace is None:
            return
        if self._probing:
            # The server admits again: a probe's pace was no rate (`_slow_to_admitted`).
            self._pace = None
            self._probing = False
            self._raise_pace()
            return
        if self._streak_rate is not None:
            # The first answer after a run of throttles: the server admits again.
            streak_rate = self._streak_rate
            if self._streak_unchecked and self._after_spent_count():
                # After a spent count this first answer came at the count's reset, so the last
                # second holds one count of a fixed window (and no more than a sliding
                # window's): what the run of throttles took for the rate that held, and paces
                # at, is checked against it. Measured over a second that held a reset, before
                # two seconds of answers were behind to check it (`RATE_CHECK`), they were 503
                # requests/s against 300, and every later second's count went early: 148
                # refused in 4 s on the fake clock, 52 checked. A second holds at most two
                # counts, so neither is taken below half of what it was. Later, the two
                # seconds' check does this (and a 503 storm of half a second in a long read,
                # its last second half empty, halved an app-limited client's rate for good).
                period = len(self._answers) / SEEN_HORIZON
                held = min(self._held, max(period, self._held / 2))
                self._held = max(self._held_before, held)
                if not self._streak_bound:
                    streak_rate = min(streak_rate, max(period, self._held, streak_rate / 2))
            self._streak_rate = None
            if streak_rate > pace:
                pace = self._pace = streak_rate
                self._raise_pace()
            self._book(now)
        # Probe upward by PACE_GROWTH of the pace per second of answers; twice the rate that
        # was throttled, answered cleanly, says that limit is gone: pacing ends. (Not "once
        # the window could not send that fast anyway": a client whose own CPU is the
        # bottleneck sees latencies that grow with its window, and ended pacing within a
        # second, to grow its window into the next burst of refusals.)
        # The growth itself doubles with every PACE_DOUBLING seconds without a throttle: near
        # a limit that holds, probing stays gentle (it is refused within a fraction of a
        # second); a limit that has risen (a server back from 100 to 300 requests/s) is found
        # in seconds, where a steady 10% a second took 11 s to triple (measured: 60% of what
        # a server that dropped its rate for 2 s admitted over the read).
        if now < self._hold_until:
            self._pace = pace  # the server said when to come back: no probing before then
            return
        clean = max(0.0, now - max(self._last_decrease, self._hold_until))
        # Beyond the rate that held, probing needs answers that keep up with the pace: after a
        # fixed window's second whose count went unspent (its tokens asleep in their backoffs
        # at the reset, and no refusal to stop the growth), the pace's growth doubled on for a
        # second and a half, the pace ran to twice the rate and pacing ended, and the next
        # second's count went in under half a second (50-80 refused, in a fake-clock replay
        # with the store's backoffs). Up to the rate that held it grows as before: answers
        # that lag a pace coming back from a drop say nothing of the server. The cost: a limit
        # that has gone for good ends pacing in 2.9 s, where it took 1.2 s.
        lead = self._held <= pace and pace >= PACE_LEAD * len(self._answers) / SEEN_HORIZON
        if now >= self._quiet_until and not lead:
            # Past a Retry-After's quiet, probing starts gently again, as after a throttle.
            probing = max(0.0, now - max(self._last_decrease, self._quiet_until))
            pace += PACE_GROWTH * 2 ** min(probing / PACE_DOUBLING, 16.0)
        # The return to the rate that held is no probing: the quiet does not hold it.
        pace = self._return(now, pace, clean)
        # Twice the rate throttled, or twice the rate that held, whichever is more: a return
        # to 300 requests/s from a pace throttled at 100 is no sign that the limit is gone.
        if pace > 2 * max(self._paced_from, self._held):
            self._pace = self._returning = None
            self._raise_pace()
        else:
            self._pace = pace

    def _return(self, now: float, pace: float, clean: float) -> float:
        # A server that dropped its limit for a while and came back (300 requests/s, 100, 300
        # again) left the pace at the low rate, and growing 10% a second (doubling every 0.3 s)
        # took 1.5-2 s to find the old one, any stray refusal on the way starting it over
        # (measured: 72-75% of what such a server admitted). CUBIC remembers the window that
        # was throttled and returns to it fast, then probes beyond; the pace remembers the
        # rate that held (the highest answered when a run of throttles began) and, once
        # answers have run clean for `_return_wait` seconds, returns to it along a concave
        # curve in `RETURN_TIME`; beyond it the doubling growth probes on, as far as answers
        # keep up (`PACE_LEAD`).
        held = self._held
        if self._returning is None:
            if pace >= RETURN_BELOW * held or clean < self._return_wait():
                return pace
            self._returning = (now, pace)
            self._return_began = now
        began, start = self._returning
        progress = min(1.0, (now - began) / RETURN_TIME)
        target = held - (held - start) * (1 - progress) ** 3
        if progress >= 1:
            self._returning = None
            self._refused_returns = 0
        return max(pace, target)

    def _return_wait(self) -> float:
        """Seconds clean before a return: `RETURN_AFTER`, twice that after the first refused
        return in a row and after the second, doubling after each later one, up to
        `RETURN_AFTER_MOST` (the doublings bounded: a server refusing every return for 41
        minutes would otherwise overflow the float)."""
        refused = self._refused_returns
        doublings = 0 if not refused else max(1, refused - 1)
        return min(RETURN_AFTER * 2.0 ** min(doublings, 16), RETURN_AFTER_MOST)

    def _told_to_wait(self, now: float, seconds: float) -> None:
        # A refusal that says when to come back costs its request that long: one in a read's
        # last second held the whole read for it, the rest done (measured: 78-85% of a token
        # bucket's rate, the read's last answer a second after its last refusal). So such a
        # refusal starts the pace a step below the rate answered (`_slow_to_admitted`), and
        # the pace does not probe upward until the wait and `RETRY_AFTER_QUIET` more have
        # passed: refusals that cost a second each are made seldom. (Probing as soon as the
        # wait had passed, from the rate answered, a 5 s read against 300 requests/s and
        # ``Retry-After: 1`` was refused every 1-1.5 s, in its last second in most runs:
        # 80-88%. With the step and the quiet, refused only in its first 1.4 s: 97-99%.
        # A step of x beta, 0.9, cost more than it saved: 80-86%, at 250 requests/s.)
        # (The quiet holds probing only, not the return to the rate that held: a server that
        # lowered its limit for two seconds, refusing with Retry-After: 1, and raised it again
        # was read at 52-57% of what it admitted with the return held too, 79-80% before.)
        self._hold_until = max(self._hold_until, now + seconds)
        self._quiet_until = max(self._quiet_until, now + seconds + RETRY_AFTER_QUIET)

    def _paced(self) -> bool:
        # While the pace binds (the window holds more than the pace keeps in flight), the
        # window's requests wait their turn holding tokens, so a window in use proves nothing:
        # it does not grow, and stays near what the server admits for when pacing ends.
        # It binds only with room to spare: a window at just what the pace keeps in flight is
        # as much the limit as the pace, and held there it kept the pace from ever being
        # answered faster (measured: a window of 2-3 for a second after a server went back
        # from 100 to 300 requests/s, 60-74% of what it admitted).
        pace, latency = self._pace, self._short_latency
        return pace is not None and latency is not None and self._window >= 2 * pace * latency

    def _grow(self, now: float) -> None:
        if self._slow_start:
            # One more per answer doubles the window per round trip: at 20 ms, 32 to 256 in
            # 60 ms, and a server that counts per second has refused everything in flight by
            # the time its first refusal arrives (measured: ~200 requests refused at once by a
            # window limiter of 300/s). In time, as CUBIC probes, it doubles at most every
            # SLOW_START_DOUBLING seconds from the default initial window (below it, as fast
            # as answers prove it: a window that small sends no burst worth holding back).
            first = now if self._first_answer is None else self._first_answer
            doublings = (now - first) / SLOW_START_DOUBLING
            cap = max(self._initial, INITIAL_WINDOW) * 2 ** min(doublings, 64.0)
            target = min(self._window + 1, max(self._window, cap))
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

    def _note_answer(self, now: float, latency: float) -> None:
        if not math.isfinite(latency) or latency < 0:
            return
        # Only the part of its time inside the horizon: a 30 s answer says nothing of the
        # last second's capacity beyond that second.
        latency = min(latency, SEEN_HORIZON)
        if self._first_answer is None:
            self._first_answer = now
            self._first_sent = now - latency
        self._answers.append((now, latency))
        self._answered_time += latency
        self._answered_at.append(now)

    def _forget_answers(self, now: float) -> None:
        answers = self._answers
        while answers and answers[0][0] <= now - SEEN_HORIZON:
            self._answered_time -= answers.popleft()[1]
        if not answers:
            self._answered_time = 0.0  # no drift from float sums
        answered_at = self._answered_at
        while answered_at and answered_at[0] <= now - RATE_CHECK:
            answered_at.popleft()

    def _queueing(self) -> bool:
        short, long = self._short_latency, self._long_latency
        return short is not None and long is not None and short > 2 * long

    def _after_fork_in_child(self) -> None:
        # The window is knowledge of the server, kept; the lock may have been held by a thread
        # the child does not have.
        self._state = threading.Lock()
        # The attempts asleep on their turns in the forking thread's event loop go on in the
        # child (as the tokens' own waiters do, `Limiter`); the other threads' are gone.
        here = threading.get_ident()
        self._turn_waiters = {
            waiter: turn for waiter, turn in self._turn_waiters.items() if waiter.thread == here
        }
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
