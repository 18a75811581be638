"""One bound on operations in flight, shared by every event loop and thread that uses a store.

A zarr store is awaited from zarr-python's loop thread, from the user's trio or asyncio program,
from the bridge's loop, and called from zarr 3.4's synchronous path in plain threads, often all
at once. An ``anyio.CapacityLimiter`` belongs to the loop that first used it, so a store that
made one per loop had ``max_concurrency`` in flight *per loop* (two loops: twice the bound), and
a caller's limiter used from a second loop failed with an opaque ``RuntimeError``.

`Limiter` is one object for all of them: its count is kept under a ``threading.Lock``; a task
that must wait queues one waiter, and whoever releases a token hands it straight to the first
waiter (FIFO across loops, no barging) and wakes that task on its own loop — directly when the
release runs on the waiter's own thread, else through ``call_soon_threadsafe`` or the trio
token. Uncontended, an acquire and release cost ~1 µs here, against ~2 µs for anyio's
limiter (lock, counter and checkpoint), so the bound costs nothing a 4 KiB read (~8 µs) would
notice. Its ``total_tokens`` can change while it is in use, which is what an adaptive window
builds on.

`ConcurrencyLimit` is what a store holds: its own `Limiter`, or the one the caller passed to
share a budget between stores, or — for callers of anyio's own limiter — that limiter, with a
clear error when a second event loop tries to use it.
"""

from __future__ import annotations

import functools
import os
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from .fork import at_fork_in_child, reset_in_child
from .loops import current_loop_key, waker

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "ConcurrencyLimit",
    "Limiter",
    "LimiterLike",
    "LimiterStatistics",
    "OneLoopLimiter",
    "adopt_copy",
]

DEFAULT_MAX_CONCURRENCY = 32


@dataclass(frozen=True)
class LimiterStatistics:
    """A snapshot of a limiter: tokens in use, the bound, and how many callers wait."""

    borrowed_tokens: int
    total_tokens: int
    tasks_waiting: int


class Waiter:
    """One task (or thread) waiting: queued for a token (``granted`` once a token was handed to
    it), or asleep on its turn under an adaptive window's pace (`AdaptiveLimiter.take_turn`)."""

    __slots__ = ("event", "given_back", "granted", "thread", "wake")

    def __init__(
        self,
        event: anyio.Event | threading.Event,
        wake: Callable[[Callable[[], object]], None] | None = None,
    ) -> None:
        self.event = event
        self.wake = wake  # for an anyio event: how to run its set() on the waiter's loop
        self.granted = False
        # A granted token whose waiter will never hold it goes back once: set by whoever gives
        # it back (the waiter abandoning it, or a releaser that could not wake it).
        self.given_back = False
        self.thread = threading.get_ident()

    def notify(self) -> bool:
        """Wake the waiter; ``False`` if its event loop has ended and it never will wake."""
        event = self.event
        if isinstance(event, threading.Event):
            event.set()
        elif threading.get_ident() == self.thread:
            # A thread runs one event loop at a time: this is the waiter's own loop, unless
            # that loop was closed with the waiter in it.
            try:
                event.set()
            except RuntimeError:  # "Event loop is closed"
                return False
        else:
            assert self.wake is not None
            try:
                self.wake(event.set)
            except RuntimeError:  # the loop is closed (trio's RunFinishedError is one too)
                return False
        return True


def _check_total(total_tokens: object) -> int:
    if not isinstance(total_tokens, int) or isinstance(total_tokens, bool):
        raise TypeError(f"max_concurrency must be an int, got {total_tokens!r}")
    if total_tokens < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {total_tokens}")
    return total_tokens


class Limiter:
    """At most ``total_tokens`` operations at once, across every event loop and thread.

    Pass one to several stores (``limiter=``) to put them on one budget. Use it like an
    ``anyio.CapacityLimiter`` (``async with limiter:``) from asyncio or trio, or with
    ``with limiter.blocking():`` from a plain thread. Waiters are served in the order they came,
    whichever loop or thread they wait in.
    """

    def __init__(self, total_tokens: int = DEFAULT_MAX_CONCURRENCY) -> None:
        self._total = _check_total(total_tokens)
        self._borrowed = 0
        self._waiters: deque[Waiter] = deque()
        self._lock = threading.Lock()
        # Who this is, for its copies in other processes (see copy_in_process).
        self._origin = os.getpid()
        self._token = uuid.uuid4().hex
        # Tokens that tasks of the forking thread held when this process was forked from the
        # one that made this limiter: given back without effect (see _after_fork_in_child).
        self._inherited = 0
        reset_in_child(self)

    # ------------------------------------------------------------------ the bound

    @property
    def total_tokens(self) -> int:
        return self._total

    @total_tokens.setter
    def total_tokens(self, value: int) -> None:
        """Change the bound now: more tokens wake waiters; fewer make new callers wait until
        enough borrowed tokens have come back (none is taken from a running operation)."""
        _check_total(value)
        with self._lock:
            self._total = value
            woken = self._grant_locked()
        self._notify(woken)

    @property
    def borrowed_tokens(self) -> int:
        return self._borrowed

    @property
    def available_tokens(self) -> int:
        return max(0, self._total - self._borrowed)

    def statistics(self) -> LimiterStatistics:
        with self._lock:
            return LimiterStatistics(self._borrowed, self._total, len(self._waiters))

    # ------------------------------------------------------------------ taking and giving

    def acquire_nowait(self) -> None:
        """Take a token now, or raise ``anyio.WouldBlock``."""
        with self._lock:
            if self._waiters or self._borrowed >= self._total:
                raise anyio.WouldBlock
            self._borrowed += 1

    async def acquire(self) -> None:
        """Take a token, waiting for one in FIFO order; a checkpoint either way."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        waiter = self._take_or_queue(lambda: Waiter(anyio.Event(), waker(current_loop_key())))
        if waiter is None:
            try:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            except BaseException:
                self.release()
                raise
            return
        event = waiter.event
        assert isinstance(event, anyio.Event)
        try:
            await event.wait()
        except BaseException:
            self._abandon(waiter)
            raise

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Hold a token for a block of blocking code in a plain thread (no event loop)."""
        waiter = self._take_or_queue(lambda: Waiter(threading.Event()))
        if waiter is not None:
            try:
                waiter.event.wait()
            except BaseException:
                # Ctrl-C in the main thread: a waiter left queued would take a token nobody
                # gives back.
                self._abandon(waiter)
                raise
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Give a token back; the first waiter, if any, gets it."""
        with self._lock:
            if self._borrowed <= 0:
                if self._inherited:
                    self._inherited -= 1
                    return
                raise RuntimeError("Limiter.release() called more often than acquire()")
            self._borrowed -= 1
            woken = self._grant_locked()
        self._notify(woken)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    # ------------------------------------------------------------------ internals

    def _take_or_queue(self, make_waiter: Callable[[], Waiter]) -> Waiter | None:
        """Take a token if one is free and nobody waits (``None``), else queue a waiter."""
        with self._lock:
            if not self._waiters and self._borrowed < self._total:
                self._borrowed += 1
                return None
            waiter = make_waiter()
            self._waiters.append(waiter)
            return waiter

    def _grant_locked(self) -> list[Waiter]:
        woken: list[Waiter] = []
        while self._waiters and self._borrowed < self._total:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self._borrowed += 1
            woken.append(waiter)
        return woken

    def _notify(self, woken: list[Waiter]) -> None:
        for waiter in woken:
            if not waiter.notify() and self._give_back(waiter):
                # Its loop is gone, so it will never run to give the token back: we do (once:
                # its coroutine may still be closed later, and abandon it).
                self.release()

    def _give_back(self, waiter: Waiter) -> bool:
        """Whether the caller is the one to release ``waiter``'s granted token."""
        with self._lock:
            if waiter.given_back:
                return False
            waiter.given_back = True
            return True

    def _abandon(self, waiter: Waiter) -> None:
        """A waiter stopped waiting (cancelled): leave the queue, or pass on its token."""
        with self._lock:
            if not waiter.granted:
                self._waiters.remove(waiter)
                return
        if self._give_back(waiter):
            self.release()

    def _after_fork_in_child(self) -> None:
        # The tokens were taken by tasks and threads of the parent; in the child only the
        # forking thread lives on, so the child starts with every token free, as a copy sent
        # to another process does (copy_in_process). The forking thread's own tasks may hold
        # some of those tokens and give them back later: that many releases are let through
        # without effect. Its waiters stay queued (their loop goes on in the child); the other
        # threads' waiters are gone. The lock may have been held by a thread that is gone.
        here = threading.get_ident()
        self._lock = threading.Lock()
        self._inherited = self._borrowed
        self._borrowed = 0
        self._waiters = deque(waiter for waiter in self._waiters if waiter.thread == here)
        woken = self._grant_locked()
        self._notify(woken)
        # This object is now the child's copy of the limiter: one pickled in the parent and
        # unpickled here (a store sent through a queue) must be this same one.
        adopt_copy(self)

    # ------------------------------------------------------------------ identity

    def __reduce__(self) -> tuple[Any, ...]:
        # Tokens and waiters belong to this process; a copy starts empty with the same bound.
        # Stores pickled together keep sharing one copy (pickle keeps object identity).
        return (
            copy_in_process,
            (self._origin, self._token, functools.partial(type(self), self._total)),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._total})"


# Copies of one limiter (or rate limit) unpickled in another process are one object there: a
# dask worker unpickles a store for every task, and a bound is meant per process
# (max_concurrency per store per worker), not per task. Weak: a copy no store holds any more is
# not kept.
_copies: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_copies_lock = threading.Lock()
Shared = TypeVar("Shared")


def adopt_copy(shared: Any) -> None:
    """Make ``shared``, inherited by fork, this process's copy of itself for `copy_in_process`.

    Called in a forked child only, whose one thread needs no lock (and whose lock may be one a
    thread of the parent held)."""
    _copies[shared._token] = shared


def _renew_copies_lock() -> None:
    global _copies_lock
    _copies_lock = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_copies_lock)


def copy_in_process(origin: int, token: str, make: Callable[[], Shared]) -> Shared:
    """The copy of shared object ``token`` (made in process ``origin``) for this process: a
    fresh one in the process that made it (as ``copy.deepcopy`` would give), else the one this
    process already holds. The copy keeps ``_origin`` and ``_token``, so copies of it do too."""
    if origin == os.getpid():
        return make()
    with _copies_lock:
        found = _copies.get(token)
        if found is None:
            found = make()
            found._origin, found._token = origin, token  # type: ignore[attr-defined]
            _copies[token] = found
        return found


class OneLoopLimiter:
    """A caller's ``anyio.CapacityLimiter``, which works only in the event loop that first used
    it: a second loop gets a clear error instead of anyio's opaque one."""

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter
        self._loop: Any = None

    def _check_loop(self) -> None:
        loop = current_loop_key()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "this store's limiter is an anyio.CapacityLimiter, which belongs to the event "
                "loop that first used it, and the store is now used from another event loop "
                "(zarr-python runs its I/O on a loop of its own). Pass zarr_anyio.Limiter(n) "
                "instead: one bound for every event loop and thread."
            )

    @property
    def total_tokens(self) -> int:
        return int(self.limiter.total_tokens)

    def acquire_nowait(self) -> None:
        self._check_loop()
        self.limiter.acquire_nowait()

    async def acquire(self) -> None:
        self._check_loop()
        await self.limiter.acquire()

    def release(self) -> None:
        self.limiter.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    @contextmanager
    def blocking(self) -> Iterator[None]:
        # An anyio limiter cannot be taken outside its loop: blocking calls are not counted.
        yield

    def statistics(self) -> LimiterStatistics:
        stats = self.limiter.statistics()
        return LimiterStatistics(
            stats.borrowed_tokens, int(stats.total_tokens), stats.tasks_waiting
        )


LimiterLike = Limiter | anyio.CapacityLimiter
"""What ``limiter=`` takes: a `Limiter` (any loop, any thread) or anyio's (one loop only)."""


class ConcurrencyLimit:
    """A store's bound: a `Limiter` of its own, or the limiter the caller passed to share."""

    def __init__(
        self, max_concurrency: int | None = None, limiter: LimiterLike | None = None
    ) -> None:
        if limiter is not None and max_concurrency is not None:
            raise ValueError("pass either max_concurrency= or limiter=, not both")
        self._shared = limiter
        self._limiter: Limiter | OneLoopLimiter
        if limiter is None:
            self._limiter = Limiter(
                DEFAULT_MAX_CONCURRENCY if max_concurrency is None else max_concurrency
            )
        elif isinstance(limiter, Limiter):
            self._limiter = limiter
        elif isinstance(limiter, anyio.CapacityLimiter):
            self._limiter = OneLoopLimiter(limiter)
        else:
            raise TypeError(
                f"limiter must be a zarr_anyio.Limiter or an anyio.CapacityLimiter, got {limiter!r}"
            )

    @property
    def shared(self) -> LimiterLike | None:
        """The caller's own limiter, if one was passed."""
        return self._shared

    @property
    def total_tokens(self) -> int:
        """How many operations may be in flight at once (across every loop and thread)."""
        return self._limiter.total_tokens

    def current(self) -> Limiter | OneLoopLimiter:
        """The limiter to hold while touching the backend (the same one on every loop)."""
        return self._limiter

    def __getstate__(self) -> dict[str, Any]:
        # A zarr_anyio Limiter pickles (as a fresh one of the same size, shared by the stores
        # pickled with it); an anyio limiter belongs to its loop, so a copy gets a bound of its
        # own, of the same size.
        if isinstance(self._limiter, Limiter):
            return {"limiter": self._limiter, "shared": self._shared is not None}
        return {"limiter": Limiter(self._limiter.total_tokens), "shared": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        limiter: Limiter = state["limiter"]
        self._limiter = limiter
        self._shared = limiter if state["shared"] else None
