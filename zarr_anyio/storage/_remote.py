"""The base of the stores that talk to a server (`FsspecStore`, `ObjectStore`): how one request
is made.

Each attempt holds a token of the store's window while it is on the wire, waits its turn under
the rate limit and its turn under the window's pace (after a throttle), and has ``timeout``
seconds to answer; a throttled request keeps its token while it waits (in an adaptive window at
most `PACED_WAIT_MOST`) and goes again under it (so the window bounds what a server that refuses
at once is sent) unless the window has shrunk below the tokens held, a failed one gives it back.
Its outcome feeds the adaptive window (`AdaptiveLimiter`) and the store's counters (`stats()`).

Two kinds of refusal are retried, differently. A **throttle** (429, 503, S3's ``SlowDown``) is
pacing: the window shrinks, the request waits (backoff with jitter, or the server's
``Retry-After``) and goes again, for as long as the store's ``deadline`` allows, and never draws
on the retry budget nor counts against ``Retry.attempts`` (measured: a sliding-window server
admitting 300 requests/s ran a budget of 500 dry in 0.28 s, and a bulk read it was merely pacing
failed). A **failure** that says nothing of load (another 5xx, a reset, a timeout) is retried
while attempts remain and the budget allows. Past the deadline a request raises
`DeadlineExceeded`, saying how long and how often it was refused. A bulk call runs its requests
in one task group and raises its first failure as itself (``_base.single_error``).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, Self, TypedDict, TypeVar, Unpack

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from zarr_anyio._core.adaptive import DEFAULT_CEILING, AdaptiveLimiter, Outcome
from zarr_anyio._core.errors import single_error
from zarr_anyio._core.fork import reset_in_child
from zarr_anyio._core.limit import Limiter, LimiterLike, OneLoopLimiter
from zarr_anyio._core.loops import running_asyncio_loop

from ._base import AnyioStore
from ._redact import redact, scrub
from ._retry import (
    DEFAULT_DEADLINE,
    DeadlineExceeded,
    Failure,
    RateLimit,
    Retry,
    RetryBudget,
    describe,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "RemoteOptions",
    "RemoteStore",
    "RequestStats",
    "check_http_root",
]

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
"""Seconds an attempt may take before it is abandoned (and retried): far beyond any healthy
answer of an object store, short enough that a server that stopped answering is noticed."""

PACED_WAIT_MOST = 1.0
"""The longest a throttled request of an adaptive window waits before going again (unless told
``Retry-After``), whatever `Retry.max_delay`: it waits holding its token, and after a window
limiter's spent second the tokens of its refused requests, asleep up to 2 s, held the window shut
when the server admitted again (a sliding window's first second: 7 tokens asleep, 170 requests
of the 300 it admitted in the second after; a fake-clock replay of the benchmark's servers read
14 sliding windows in 40 under 90% of their rate). Hammering is kept off by the window's pace,
which halves with each throttle that no answer follows. Not shorter: at 0.5 s FsspecStore's
reads of the real fixed window at ceilings 128 and 256 were refused 10-12% of their requests in
every run (7-11% at 1 s, 8-10% at 2 s), the tokens probing a spent count more often."""


@dataclass(frozen=True)
class RequestStats:
    """A snapshot of what a remote store has sent and received since it was made.

    ``requests`` counts attempts (retries included); ``retries`` the attempts that were
    retries; ``throttled`` the answers asking to slow down (429, 503, ``SlowDown``);
    ``timeouts`` the attempts abandoned after ``timeout`` seconds; ``errors`` the requests given
    up on (transient failures, not retried again); a server's answer such as a 404 is none of
    these. ``window`` is how many requests may be in flight now (the adaptive
    window, or the fixed bound), ``ceiling`` the most it may grow to, ``in_flight`` how many
    are. ``retry_budget`` is what is left of the retry budget.
    """

    requests: int
    retries: int
    throttled: int
    timeouts: int
    errors: int
    bytes_received: int
    bytes_sent: int
    window: int
    ceiling: int
    in_flight: int
    retry_budget: float
    elapsed: float


class _Counters:
    """The counts behind `RequestStats`, updated from any event loop or thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.values = dict.fromkeys(
            ("requests", "retries", "throttled", "timeouts", "errors", "received", "sent"), 0
        )
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it as it forked

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                self.values[name] += count


def _size(result: object) -> int:
    """Bytes in a request's result: a buffer, or a list of them (``get_ranges``)."""
    if isinstance(result, list):
        return sum(_size(part) for part in result)
    if isinstance(result, bytes | bytearray | memoryview) or hasattr(result, "__buffer__"):
        try:
            return memoryview(result).nbytes
        except TypeError:
            return 0
    return 0


class RemoteOptions(TypedDict, total=False):
    """The keyword arguments every remote store takes (`RemoteStore` says what each does),
    declared once: `FsspecStore` and `ObjectStore` pass them on as they are."""

    max_concurrency: int | None
    limiter: LimiterLike | None
    adaptive: bool
    retry: Retry | int | None
    retry_budget: RetryBudget | None
    timeout: float | None
    rate_limit: RateLimit | float | None
    deadline: float | None


class RemoteStore(AnyioStore):
    """A store that talks to a server: the base of `FsspecStore` and `ObjectStore`, and of a
    custom store whose hooks make each request with ``self._request(make)``.

    Parameters
    ----------
    max_concurrency
        The most requests in flight at once (default 128). With ``adaptive`` (the default) this
        is the ceiling of a window that adapts to the server; without, a fixed window.
    limiter
        A `Limiter` (or `AdaptiveLimiter`) shared with other stores that hit the same server:
        they share one window.
    adaptive
        ``False`` keeps a fixed window of ``max_concurrency`` (default 32 then).
    retry
        A `Retry`, or an int (the number of attempts), or ``None`` for the default
        (``Retry()``: 4 attempts). ``NO_RETRY`` turns this layer off.
    retry_budget
        A `RetryBudget` (shareable), or ``None`` for one of the store's own.
    timeout
        Seconds each attempt may take (default 30); a timed-out attempt is retried. ``None``:
        no timeout.
    rate_limit
        A `RateLimit` (shareable between stores), or requests per second, or ``None``.
    deadline
        Seconds a request may take to be sent and retried, counted from when it was made, its
        wait for a token included (default 120, `DEFAULT_DEADLINE`): what ends a request that
        the server keeps throttling, since throttles are retried without limit otherwise. No
        attempt is sent past it, nor a retry started whose backoff would end past it; the
        request then raises `DeadlineExceeded`. ``None``: no deadline (a server that
        throttles forever is waited on forever). To bound a whole call instead, wrap it in
        ``anyio.fail_after``.
    """

    # A response read a part at a time holds the client's buffers beside the part: its read
    # buffer and the piece in hand (hyper's pieces are ~400 KiB; aiohttp's 64 KiB, with botocore
    # and aiohttp's state for the response). Measured as what each value streamed at once added
    # to a copy's peak beyond its part (64 values of 8 MiB from moto, parts of 1 MiB, two
    # values at once against four, malloc arenas capped as the command does): ~1.1 MiB with
    # obstore, ~0.9 with s3fs.
    _stream_overhead = 1 << 20

    def __init__(self, *, read_only: bool = False, **options: Unpack[RemoteOptions]) -> None:
        unknown = sorted(set(options) - set(RemoteOptions.__annotations__))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {unknown}")
        max_concurrency = options.get("max_concurrency")
        limiter = options.get("limiter")
        adaptive = options.get("adaptive", True)
        retry = options.get("retry")
        retry_budget = options.get("retry_budget")
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        rate_limit = options.get("rate_limit")
        deadline = options.get("deadline", DEFAULT_DEADLINE)
        if limiter is None and adaptive:
            ceiling = DEFAULT_CEILING if max_concurrency is None else max_concurrency
            if not isinstance(ceiling, int) or isinstance(ceiling, bool):
                raise TypeError(f"max_concurrency must be an int, got {ceiling!r}")
            if ceiling < 1:
                raise ValueError(f"max_concurrency must be at least 1, got {ceiling}")
            limiter, max_concurrency = AdaptiveLimiter(ceiling), None
        elif isinstance(limiter, AdaptiveLimiter) and not adaptive:
            raise ValueError("adaptive=False with an AdaptiveLimiter: pass a Limiter instead")
        super().__init__(read_only=read_only, max_concurrency=max_concurrency, limiter=limiter)
        if retry is None:
            retry = Retry()
        elif isinstance(retry, int) and not isinstance(retry, bool):
            retry = Retry(attempts=retry)
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry, an int or None, got {retry!r}")
        if retry_budget is not None and not isinstance(retry_budget, RetryBudget):
            raise TypeError(f"retry_budget must be a RetryBudget, got {retry_budget!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            rate_limit = RateLimit(rate_limit)
        if deadline is not None and not deadline > 0:
            raise ValueError(f"deadline must be positive or None, got {deadline!r}")
        self.retry = retry
        self.retry_budget = RetryBudget() if retry_budget is None else retry_budget
        self.timeout = timeout
        self.rate_limit = rate_limit
        self.deadline = deadline
        self._counters = _Counters()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_counters"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._counters = _Counters()

    def _store_kwargs(self) -> dict[str, Any]:
        # A copy (``with_read_only``) talks to the same server: it shares an adaptive window
        # (ours or the caller's); a fixed one of its own is as big as ours.
        shared = self._limit.shared
        options = RemoteOptions(
            retry=self.retry,
            retry_budget=self.retry_budget,
            timeout=self.timeout,
            rate_limit=self.rate_limit,
            deadline=self.deadline,
        )
        if shared is not None:
            options["limiter"] = shared
        else:
            options["max_concurrency"] = self._limit.total_tokens
            options["adaptive"] = False
        return dict(options)

    def with_read_only(self, read_only: bool = False) -> Self:
        copy = self._over_same_data(read_only, {})
        # zarr reads through a copy (it opens with mode="r"): its requests are this store's, so
        # stats() counts them.
        copy._counters = self._counters
        return copy

    def _over_same_data(self, read_only: bool, options: dict[str, Any]) -> Self:
        return self._with_options(read_only, options or self._store_kwargs())

    def _with_options(self, read_only: bool, options: dict[str, Any]) -> Self:
        """A store of this class over the same data, with these remote options."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the window

    @property
    def adaptive(self) -> bool:
        return isinstance(self._limit.current(), AdaptiveLimiter)

    @property
    def max_concurrency(self) -> int:
        """The most requests in flight at once: the ceiling of an adaptive window."""
        limiter = self._limit.current()
        if isinstance(limiter, AdaptiveLimiter):
            return limiter.ceiling
        return limiter.total_tokens

    async def _for_each(
        self,
        items: Iterable[T],
        action: Callable[[T], Awaitable[None]],
        workers: int | None = None,
    ) -> None:
        # As many workers as the window may grow to: the window, not the pool, bounds requests.
        # A request waiting out a retry without its token lends its worker (`_Pool`).
        await _Pool(iter(items), action, workers or self.max_concurrency).run()

    def _read_parallelism(self) -> int:
        return self.max_concurrency

    # ----------------------------------------------------------------- observing

    def stats(self) -> RequestStats:
        """What this store has sent and received so far, and its window now."""
        limiter = self._limit.current()
        window = limiter.statistics()
        values = self._counters.values
        return RequestStats(
            requests=values["requests"],
            retries=values["retries"],
            throttled=values["throttled"],
            timeouts=values["timeouts"],
            errors=values["errors"],
            bytes_received=values["received"],
            bytes_sent=values["sent"],
            window=window.total_tokens,
            ceiling=self.max_concurrency,
            in_flight=window.borrowed_tokens,
            retry_budget=self.retry_budget.available,
            elapsed=time.monotonic() - self._counters.started,
        )

    async def watch(self, interval: float = 1.0) -> AsyncIterator[RequestStats]:
        """`stats()` every ``interval`` seconds, for as long as the caller iterates.

        For example::

            async with anyio.create_task_group() as tg:
                tg.start_soon(store.get_partial_values, prototype, requests)
                async for stats in store.watch(0.5):
                    print(stats.window, stats.throttled)
                    if stats.in_flight == 0: break
        """
        while True:
            yield self.stats()
            await anyio.sleep(interval)

    async def _streamed_parts(
        self,
        key: str,
        start: int,
        size: int,
        part: int,
        next_piece: Callable[[int], Awaitable[memoryview | None]],
        version: str | None = None,
        current_version: Callable[[], Awaitable[str | None]] | None = None,
    ) -> AsyncGenerator[memoryview, None]:
        """`_backend_read_parts` over one streamed response: ``next_piece(wanted)`` gives its
        next piece (``None`` or empty at its end), each one request that is never retried (a
        repeat would skip bytes). A piece that fails as a retry would be worth it goes on with
        ranged reads from where the stream broke, each retried, and each given only while
        ``current_version()`` is still the response's ``version`` (its ETag): an object
        replaced after the break ends the parts short (the caller says the value changed)
        instead of a value torn between two objects. The response is read to its end: a
        value that grew gives its bytes past ``size`` (no request of its own)."""
        while True:
            try:
                # Past ``size``, one byte: the response's end, or a value that grew.
                data = await next_piece(min(part, size - start) if start < size else 1)
            except Exception as error:
                if not describe(error).transient:
                    raise
                rest = AnyioStore._backend_read_parts(self, key, start, size, part)
                async with aclosing(rest):
                    async for data in rest:
                        if (
                            version is not None
                            and current_version is not None
                            and await current_version() != version
                        ):
                            return
                        yield data
                        del data  # see `AnyioStore._read_parts`
                return
            if not data:
                return
            start += len(data)
            yield data
            del data

    # ----------------------------------------------------------------- one request

    async def _request(self, make: Callable[[], Awaitable[T]], *, sent: int = 0) -> T:
        """One request to the server: attempts under the window, retried while worth it.

        Its error is raised as itself, with any credentials of the URL in its text redacted
        (the clients name the URL they requested)."""
        try:
            return await self._attempts(make, sent)
        except Exception as error:
            scrub(error)
            raise

    async def _request_once(
        self, make: Callable[[], Awaitable[T]], *, sent: int = 0, patient: bool = False
    ) -> T:
        """One request, never retried: for a step of a stateful write (obstore's writer) that a
        repeat would get wrong. It still holds a token and feeds the window. A ``patient`` one
        has no timeout: completing a multipart upload takes S3 minutes for a large object
        (moto: over 30 s for 1 GiB), and the caller can still cancel it."""
        try:
            while True:
                limiter = self._limit.current()
                async with limiter:
                    try:
                        return await self._attempt(
                            limiter, make, sent, None if patient else self.timeout
                        )
                    except _WindowShrank:
                        pass  # nothing was sent: it waits for a token again
        except Exception as error:
            self._counters.add(errors=1)
            scrub(error)
            raise

    async def _attempts(self, make: Callable[[], Awaitable[T]], sent: int) -> T:
        started = time.monotonic()
        failed = 0  # retries after failures: bounded by attempts and the budget
        throttled = 0  # retries after throttles: bounded by the deadline only
        last_cost: int | None = None
        retrying: Exception | None = None  # the error the next attempt retries
        while True:
            limiter = self._limit.current()
            adaptive = isinstance(limiter, AdaptiveLimiter)
            shrank = False
            async with _Held(limiter):
                # A throttled request retries under the token it holds (see below); a failed
                # one leaves this loop, and the token, to wait.
                while True:
                    # A request that waited for its token, or would wait for its turn under
                    # the pace, past the deadline is not sent: the deadline's check before a
                    # backoff cannot know how long those waits will be, and a first attempt
                    # queued behind a throttled window (independent callers, each a task of
                    # its own) waited a minute for a deadline of 2 s.
                    not_after = None if self.deadline is None else started + self.deadline
                    try:
                        result = await self._attempt(
                            limiter, make, sent, self.timeout, not_after=not_after
                        )
                    except _WindowShrank:
                        shrank = True  # nothing was sent: it waits for a token again
                        break
                    except _PastDeadline:
                        assert self.deadline is not None
                        if (
                            retrying is not None
                            and last_cost is not None
                            and not describe(retrying).throttled
                        ):
                            self.retry_budget.refund(last_cost)  # the retry it paid for: not made
                        self._counters.add(errors=1)
                        raise DeadlineExceeded(
                            time.monotonic() - started, throttled, failed, self.deadline
                        ) from retrying
                    except Exception as error:
                        retrying = error
                        failure = describe(error)
                        timed_out = isinstance(error, TimeoutError)
                        if not (failure.transient or timed_out):
                            # An answer (a 404, a 412): the server is well, the budget gets
                            # its token.
                            self.retry_budget.refund(last_cost)
                            raise
                        if self.retry.attempts == 1:  # NO_RETRY: this layer is off
                            self._counters.add(errors=1)
                            raise
                        throttle = failure.throttled and not timed_out
                        if throttle:
                            # Under an adaptive window the pace spaces the retries: a long
                            # backoff only keeps its token asleep (see `PACED_WAIT_MOST`).
                            most = PACED_WAIT_MOST if adaptive else None
                            wait = self.retry.delay(throttled, failure.retry_after, most=most)
                            throttled += 1
                        else:
                            retry = self._retry_wait(error, failure, failed)
                            if retry is None:
                                self._counters.add(errors=1)
                                raise
                            wait, last_cost = retry
                            failed += 1
                        elapsed = time.monotonic() - started
                        if self.deadline is not None and elapsed + wait > self.deadline:
                            if not throttle and last_cost is not None:
                                # The retry it paid for: not made.
                                self.retry_budget.refund(last_cost)
                            self._counters.add(errors=1)
                            raise DeadlineExceeded(
                                elapsed, throttled, failed, self.deadline
                            ) from error
                        self._counters.add(retries=1)
                        window = limiter.statistics()
                        if (
                            not throttle
                            or failure.retry_after is not None
                            or window.borrowed_tokens > window.total_tokens
                        ):
                            # A failure, a throttle told when to come back, or a throttle above
                            # a window that has since shrunk: wait without the token, and
                            # queue for one again. (Held through a Retry-After, a second for
                            # a server that answers in 20 ms, the tokens of a burst of refused
                            # requests left the window a few to send with, at a third of the
                            # pace: 78-85% of a token bucket's rate. The pace, not the window,
                            # keeps such a server from being sent the window again at once.)
                            break
                        # A throttled request waits holding its token and goes again under it:
                        # a server that refuses at once would otherwise see every freed token
                        # spent on another refused request within a millisecond, whatever the
                        # window (measured: 53-69% of requests refused by a sliding-window
                        # server). Given back and taken again, the token went to the next
                        # request in line, fresh, whose first backoff is the shortest: the
                        # window kept refused requests probing every ~25 ms however long the
                        # server refused (22% of requests refused); kept, each token's
                        # probes back off exponentially.
                        await anyio.sleep(wait)
                    else:
                        self.retry_budget.refund(last_cost)
                        return result
            # A failure waits without its token: it says nothing of load. Nor does it keep its
            # bulk call's worker meanwhile (`_Pool`), nor does a throttle told when to come
            # back in an adaptive window, whose pace keeps the server from being sent the
            # freed place at once. In a fixed window there is no pace: lent, the place went
            # to another request refused while the server's count was spent (a fixed window
            # of 7 against a token bucket of 300/s answering Retry-After: 1 had 8 requests at
            # a time waiting out a second, 32 refused in a read where 4 were). A throttle
            # above a window that has shrunk keeps it too: the window is smaller now.
            if shrank:
                continue
            lent = not throttle or (adaptive and failure.retry_after is not None)
            with _Pool.lend(lent):
                await anyio.sleep(wait)

    async def _attempt(
        self,
        limiter: object,
        make: Callable[[], Awaitable[T]],
        sent: int,
        allowed: float | None,
        *,
        not_after: float | None = None,
    ) -> T:
        """One attempt, holding a token of ``limiter``, given ``allowed`` seconds (``None``:
        no limit): its outcome feeds the window. Raises `_PastDeadline`, sending nothing, if it
        could not be sent by ``not_after`` (`time.monotonic`), and `_WindowShrank`, sending
        nothing, if the window shrank below the tokens out while it waited its turn."""
        if self.rate_limit is not None:
            await self.rate_limit.acquire()
        adaptive = limiter if isinstance(limiter, AdaptiveLimiter) else None
        if adaptive is not None:
            if not await adaptive.take_turn(not_after):
                raise _PastDeadline
            if adaptive.borrowed_tokens > adaptive.total_tokens:
                # The window shrank while this request waited its turn (or a throttle's backoff
                # under its token): more tokens are out than it holds now, so it is not sent,
                # as TCP sends nothing while more is in flight than its window. Sent anyway,
                # against a server that holds 48 at a time, the requests asleep on a probe's
                # turns when slow start's refusals shrank the window found it still full,
                # were refused, and each began an episode of its own: CUBIC's W_max came
                # down to 22-25 and the window stayed there for a second (about one read in 16
                # at 75-85% of what the server admitted; 40 interleaved reads a side at
                # ceilings 128 and 256: 3 under 90% before, none under 91.5% with the rule).
                # Its turn, and its `rate_limit` token, are spent all the same.
                raise _WindowShrank
        elif not_after is not None and time.monotonic() > not_after:
            raise _PastDeadline
        epoch = adaptive.epoch if adaptive is not None else 0
        in_flight = adaptive.borrowed_tokens if adaptive is not None else 0
        self._counters.add(requests=1, sent=sent)
        started = time.monotonic()
        try:
            if allowed is None:
                result = await make()
            else:
                result = await _within(allowed, make)
        except Exception as error:
            latency = time.monotonic() - started
            outcome = self._outcome(error)
            if adaptive is not None:
                # A throttle's Retry-After is the server saying how long it is full.
                retry_after = describe(error).retry_after if outcome is Outcome.THROTTLED else None
                adaptive.record(outcome, latency, epoch, in_flight, retry_after=retry_after)
            raise
        if adaptive is not None:
            adaptive.record(Outcome.ANSWERED, time.monotonic() - started, epoch, in_flight)
        self._counters.add(received=_size(result))
        return result

    def _outcome(self, error: Exception) -> Outcome:
        if isinstance(error, TimeoutError):
            self._counters.add(timeouts=1)
            return Outcome.TIMED_OUT
        failure = describe(error)
        if failure.throttled:
            self._counters.add(throttled=1)
            return Outcome.THROTTLED
        # A 404, 403 or 416 is the server answering: it says nothing of load.
        return Outcome.FAILED if failure.transient else Outcome.ANSWERED

    def _retry_wait(
        self, error: Exception, failure: Failure, retry_number: int
    ) -> tuple[float, int] | None:
        """How long to wait before retrying ``error`` and what the retry cost; ``None`` if it
        is not to be retried."""
        if retry_number + 1 >= self.retry.attempts:
            return None
        cost = self.retry_budget.take(timed_out=isinstance(error, TimeoutError))
        if cost is None:
            error.add_note(
                "Not retried: this store's retry budget is spent (most recent requests failed; "
                "it refills as requests succeed). See RetryBudget."
            )
            return None
        return self.retry.delay(retry_number, failure.retry_after), cost


async def _within(seconds: float, make: Callable[[], Awaitable[T]]) -> T:
    """``await make()``, or `TimeoutError` after ``seconds``, as ``anyio.fail_after`` does.

    Under asyncio, asyncio's own ``timeout``: one timer and the task's cancel count, where an
    anyio cancel scope with a deadline (its task's state looked up, registered, its timer)
    was a sixth of the Python a request cost on the loop (py-spy, 2,000 x 64 KiB over HTTP);
    a cancellation from outside still goes through as itself (asyncio tells it apart by that
    count, as anyio's scopes do). Under trio, a scope that no one else holds, which nothing
    but the deadline cancels."""
    if running_asyncio_loop() is not None:
        async with asyncio.timeout(seconds):
            return await make()
    with anyio.CancelScope(deadline=anyio.current_time() + seconds):
        return await make()
    raise TimeoutError


class _Held:
    """A token of ``limiter`` held for a request's attempts (``async with``): taken at once
    when one is free, with no turn of the event loop (``Limiter.acquire`` is a checkpoint
    either way, as anyio's limiters are: a turn of the loop a request, ≈8 µs of ≈45 of our
    Python around one); queued behind the waiters otherwise. A cancelled caller is stopped
    here all the same: no request is started for it."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: Limiter | OneLoopLimiter) -> None:
        self.limiter = limiter

    async def __aenter__(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            self.limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self.limiter.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.limiter.release()


class _Pool:
    """The workers of a remote store's bulk call (`RemoteStore._for_each`): ``workers`` of them
    pull items from one iterator, as `AnyioStore._for_each`'s do, and a request that waits out a
    retry without its token lends its worker meanwhile (`lend`): another starts, so ``workers``
    keep sending while it waits, and the first one back to pull an item while more than
    ``workers`` are at work leaves. At most twice ``workers`` run at once.

    Without the loan, requests told ``Retry-After: 1`` kept their workers asleep for that second
    and the window went as many tokens short: measured against a token bucket of 300
    requests/s answering 429 with ``Retry-After: 1``, an adaptive window at ceiling 32 whose
    first round trip had 26 requests refused sent 264 requests/s for the read's first second
    (6 workers left), where lending them it sent 300.
    """

    _current: contextvars.ContextVar[_Pool | None] = contextvars.ContextVar(
        "zarr_anyio_pool", default=None
    )

    def __init__(
        self, items: Iterator[T], action: Callable[[T], Awaitable[None]], workers: int
    ) -> None:
        self._items: Iterator[Any] = items
        self._action: Callable[[Any], Awaitable[None]] = action
        self._workers = max(1, workers)
        self._running = 0  # worker tasks started and not yet ended
        self._lent = 0  # of them, waiting out a retry without a token
        self._done = False  # the items have run out
        self._group: TaskGroup | None = None
        # Its event loop's thread: a request made in another thread (a context copied into a
        # worker thread, a blocking call there) is no request of this call's workers.
        self._thread = threading.get_ident()

    async def run(self) -> None:
        with single_error():
            async with anyio.create_task_group() as group:
                self._group = group
                token = _Pool._current.set(self)
                try:
                    # Started as they find items: a call of three items starts three.
                    for _ in range(self._workers):
                        item = self._next()
                        if item is _NONE:
                            break
                        self._start(item)
                finally:
                    _Pool._current.reset(token)

    def _start(self, item: Any) -> None:
        """Start a worker on ``item`` (`_NONE`: on the next item it pulls)."""
        assert self._group is not None
        self._running += 1
        self._group.start_soon(self._work, item)

    def _next(self) -> Any:
        if self._done:
            return _NONE
        item = next(self._items, _NONE)
        self._done = item is _NONE
        return item

    async def _work(self, item: Any) -> None:
        try:
            while True:
                if item is _NONE:
                    item = self._next()
                    if item is _NONE:
                        return
                await self._action(item)
                item = _NONE
                if self._running - self._lent > self._workers:
                    return  # more at work than the pool's size: a retry's wait has ended
        finally:
            self._running -= 1

    @staticmethod
    @contextmanager
    def lend(lent: bool = True) -> Iterator[None]:
        """While a request of the current bulk call waits without its token: another worker
        takes its place (none outside a bulk call, nor unless ``lent``)."""
        pool = _Pool._current.get()
        if pool is None or not lent or pool._thread != threading.get_ident():
            yield
            return
        pool._lent += 1
        try:
            if (
                not pool._done
                and pool._running - pool._lent < pool._workers
                and pool._running < 2 * pool._workers
            ):
                pool._start(_NONE)  # it pulls its item itself: an error there is its own
            yield
        finally:
            pool._lent -= 1


_NONE: Any = object()


class _WindowShrank(Exception):
    """A request whose turn came with more tokens out than the adaptive window now holds: it
    gives its token back and waits for one again (nothing was sent)."""


class _PastDeadline(Exception):
    """A request that could not be sent before the store's deadline (nothing was sent)."""


def check_http_root(url: str) -> None:
    """Refuse an http(s) root URL with a query or a fragment.

    Keys go after the root's path; after a query or a fragment they would be part of it
    (``…/a.zarr?token=1/zarr.json``): fsspec's listing then recursed until ``RecursionError``
    and obstore asked for URLs that name nothing.
    """
    if url.partition("://")[0].lower() in ("http", "https") and ("?" in url or "#" in url):
        raise ValueError(
            f"the root URL {redact(url)!r} has a query or a fragment: a store's keys are "
            "appended to its path, so its root cannot carry one (pass headers or tokens "
            "through storage_options, e.g. client_kwargs={'headers': {...}} for fsspec)"
        )
