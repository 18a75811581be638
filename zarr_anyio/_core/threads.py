"""Blocking calls in worker threads, several to a hop when the calls are short.

Handing a call to a worker thread costs ~100 µs here; reading a 4 KiB chunk from the page cache
costs ~8 µs. So when many short blocking calls are waiting at once (zarr reading an array, a bulk
read), running each in its own hop makes the hop the whole cost. `HopCoalescer` queues the calls
of one event loop and lets one waiting task (the "leader") take a batch of them to a worker thread
under one limiter token, while later arrivals form the next batch. How many calls a hop takes
follows how much CPU time the calls have been taking: short calls are batched, calls much longer
than a hop go one per hop and get every token of parallelism. A call that mostly waits on a slow
device costs little CPU and is batched like a fast one: the price of not mistaking a busy GIL
for slow I/O.

Calls that move many bytes (`note_bytes`: a mean of at least `LARGE_CALL_BYTES`) go one per hop
whatever their CPU time, and so do calls that are slow: those skip the queue and go straight to a
thread (a call through the queue cost ~60 µs of the loop's time here, the hop alone ~25 µs). The
CPU time of a 1 MiB read is no guide: ~130 µs into memory already mapped, ~500 µs into fresh
memory (page faults), on either side of the batching threshold, which made the batch size, and
the speed of zarr's ``arr[:]``, change from run to run.

Only idempotent calls (reads) belong in a batch: a task cancelled while its call is in a batch
stops waiting, but the call itself still completes in the thread and its result is dropped.

`run_in_worker` is the one hop itself, on a thread pool of this library's. Under asyncio it is
the loop's ``run_in_executor``: anyio's own worker threads look for the loop's root task on every
hop, and on a loop that has none — zarr's own loop thread, where most zarr I/O runs — that scans
every task of the loop and starts a new thread per call (measured: 5x slower reads of 4 KiB
chunks). Under trio the pool's future wakes the caller through the trio token (~30 µs a hop
here, against ~100 µs for ``anyio.to_thread.run_sync``). Either way, cancelling the caller
asks the call to stop at its next check and waits until it has returned: no call outlives the
task that made it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, NamedTuple, TypeVar

import anyio

from .fork import at_fork_in_child
from .limit import ConcurrencyLimit
from .loops import LoopLocal, current_loop_key, wait_out, waker

__all__ = ["CheckCancelled", "HopCoalescer", "Timed", "run_in_worker", "timed"]

T = TypeVar("T")

CheckCancelled = Callable[[], None]
"""Called by a blocking function between steps; raises once its caller has been cancelled."""

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
# Threads are started only as calls need them, so this is a ceiling, not a cost.
_EXECUTOR_THREADS = 256


class _StopRequested(Exception):
    """Raised in a worker thread whose asyncio caller was cancelled."""


def _shared_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="zarr_anyio")
    return _executor


def _after_fork_in_child() -> None:
    # The pool's threads did not come along: it would queue new calls for idle workers the
    # child does not have. The child makes a pool of its own on first use.
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


at_fork_in_child(_after_fork_in_child)


async def run_in_worker(function: Callable[[CheckCancelled], T]) -> T:
    """Run ``function(check_cancelled)`` in a worker thread and return what it returns."""
    loop = current_loop_key()
    stop = threading.Event()

    def check_cancelled() -> None:
        if stop.is_set():
            raise _StopRequested

    # The result comes back in a box that the caller empties, not as the pool future's result:
    # the worker thread holds its future until it next runs, which may be after the caller has
    # let go of the result (a part of a copy, a slot of the read pool: its slot would count as
    # in use while the next part is read).
    box: list[T] = []

    def call(check: CheckCancelled) -> None:
        box.append(function(check))

    if not isinstance(loop, asyncio.AbstractEventLoop):
        await _run_in_worker_trio(call, check_cancelled, stop, waker(loop))
        return box.pop()

    future = loop.run_in_executor(_shared_executor(), call, check_cancelled)
    try:
        # shield: a cancelled caller must not cancel the future, which would stop our waiting
        # for the thread without stopping the thread.
        await asyncio.shield(future)
        return box.pop()
    except asyncio.CancelledError:
        stop.set()
        ended = anyio.Event()
        future.add_done_callback(lambda _: ended.set())
        await wait_out(ended)
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not log it as never retrieved
        raise


async def _run_in_worker_trio(
    function: Callable[[CheckCancelled], None],
    check_cancelled: CheckCancelled,
    stop: threading.Event,
    wake: Callable[[Callable[[], object]], None],
) -> None:
    # The same pool as under asyncio, its end signalled through the trio token: ~30 µs a hop
    # here, against ~100 µs for trio's own thread hand-off (anyio.to_thread).
    ended = anyio.Event()
    future = _shared_executor().submit(function, check_cancelled)
    future.add_done_callback(lambda _: wake(ended.set))
    try:
        await ended.wait()
    except BaseException:
        stop.set()
        await wait_out(ended)
        raise
    future.result()  # raises what the call raised


# What a hop to a worker thread costs on a small machine, and how much of a hop's time we allow
# it to be: a batch is sized so that its calls take about HOP_COST / HOP_SHARE.
HOP_COST = 100e-6
HOP_SHARE = 0.25
MAX_BATCH = 32
FIRST_GUESS = 1e-3
# A call that moves at least this many bytes goes in a hop of its own (see `HopCoalescer`).
LARGE_CALL_BYTES = 256 << 10
# Cheap calls run in this many hops at once; a hop whose wall time is this many times its CPU
# time is taken as waiting for I/O (GIL contention alone was seen at 3-10x here).
CPU_BOUND_HOPS = 2
IO_BOUND_RATIO = 20.0


class _Call(Generic[T]):
    __slots__ = ("error", "finished", "fn", "result", "taken", "wakeup")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.taken = False  # in some leader's batch
        self.finished = False
        self.result: T | None = None
        self.error: BaseException | None = None
        self.wakeup: anyio.Event | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:
            self.error = exc
        self.finished = True

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()


class _Queue:
    """The calls of one event loop waiting for a hop, and whether a leader is gathering them."""

    __slots__ = ("gathering", "pending")

    def __init__(self) -> None:
        self.pending: deque[_Call[Any]] = deque()
        self.gathering = False


class Timed(NamedTuple, Generic[T]):
    result: T
    cpu_seconds: float
    wall_seconds: float


def timed(function: Callable[[], T]) -> Timed[T]:
    """``function()``, with the CPU time this thread spent in it and the time it took."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = function()
    return Timed(result, time.thread_time() - cpu, time.perf_counter() - wall)


def _run_batch(batch: list[_Call[Any]]) -> Timed[None]:
    # CPU time of this thread, not wall time: a worker thread that returns from a syscall waits
    # for the GIL while the event loop is busy, and counting that wait as the call's cost makes
    # busy moments look like slow I/O, which shrinks batches, which makes more hops and more
    # waiting (seen here: 4 KiB reads stuck at 1-2 per hop and 5x slower).
    def run_all() -> None:
        for call in batch:
            call.run()

    return timed(run_all)


class HopCoalescer:
    """Runs short blocking calls in worker threads, batched, one limiter token per hop."""

    def __init__(self, limit: ConcurrencyLimit) -> None:
        self._limit = limit
        self._queues = LoopLocal(_Queue)
        # Mean seconds per call over recent batches. It starts as "slow", one call per hop, so
        # slow I/O never queues behind itself; a few hops of short calls bring it down.
        self._call_seconds = FIRST_GUESS
        # Mean wall time over CPU time per hop: high when calls wait for the device.
        self._wait_ratio = 1.0
        # Mean bytes per call, as the calls report them (`note_bytes`).
        self._call_bytes = 0.0

    def batch_size(self, waiting: int = MAX_BATCH) -> int:
        """How many calls one hop should take, given the calls seen so far."""
        if self._wait_ratio > IO_BOUND_RATIO:
            return 1  # calls that wait for the device wait in parallel, not in a queue
        if self._call_bytes >= LARGE_CALL_BYTES:
            # Large reads are copies that keep a core busy: each gets its own hop, so that they
            # spread over threads. Their CPU time alone (~130 µs per MiB here, 3x that when the
            # memory is fresh) sat either side of the batching threshold from run to run.
            return 1
        wanted = math.ceil(HOP_COST / HOP_SHARE / max(self._call_seconds, 1e-9))
        return max(1, min(wanted, MAX_BATCH, waiting))

    def mean_bytes(self) -> float:
        """How many bytes calls have been moving, as `note_bytes` heard."""
        return self._call_bytes

    def note_bytes(self, size: int) -> None:
        """Take the size of what one call read into the estimates (called from any thread: a
        lost update between two threads costs nothing)."""
        self._call_bytes = 0.5 * self._call_bytes + 0.5 * size

    def record(self, hop: Timed[Any], calls: int) -> None:
        """Take the times of ``calls`` calls made in one hop into the estimates."""
        self._call_seconds = 0.5 * self._call_seconds + 0.5 * (hop.cpu_seconds / calls)
        waiting = hop.wall_seconds / max(hop.cpu_seconds, 1e-6)
        self._wait_ratio = 0.5 * self._wait_ratio + 0.5 * waiting

    def parallel_hops(self, tokens: int) -> int:
        """How many hops a bulk operation should keep running at once.

        Python threads that make short syscalls contend for the GIL: 8,192 reads of 4 KiB from
        the page cache took 8 µs each from one thread, 16 µs from 8 and 38 µs from 32 (measured
        here). So calls that are cheap and do not wait on the device run in a few hops of big
        batches; calls that are costly, or whose time is mostly waiting for I/O (a cold disk,
        a network filesystem), get every token.
        """
        if self.batch_size() == 1 or self._wait_ratio > IO_BOUND_RATIO:
            return tokens
        return min(tokens, CPU_BOUND_HOPS)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in a worker thread, possibly in one hop with other waiting calls."""
        if self.batch_size() == 1:
            # Calls go one per hop anyway: skip the queue and its hand-overs between waiting
            # tasks, which cost ~35 µs of the loop's time per call (measured here: ~60 µs a call
            # through the queue, ~25 µs for the hop alone).
            # The result comes back through a box, not as the hop's return value: the futures
            # that carry a return value outlive the call by a turn of the loop, and a read's
            # buffer must be free again as soon as its caller lets go of it (see
            # `zarr_anyio.storage._buffers`).
            box: list[Timed[T]] = []
            async with self._limit.current():
                await run_in_worker(lambda _: box.append(timed(fn)))
            hop = box.pop()
            self.record(hop, 1)
            return hop.result
        queue = self._queues.get()
        call: _Call[T] = _Call(fn)
        queue.pending.append(call)
        while not call.finished:
            if not call.taken and not queue.gathering:
                await self._lead(queue, call)
                continue
            call.wakeup = anyio.Event()
            try:
                await call.wakeup.wait()
            except BaseException:
                # Cancelled while waiting: leave the queue, and if we had been woken to lead,
                # hand that on to the next waiting call.
                if not call.taken:
                    queue.pending.remove(call)
                self._promote(queue)
                raise
        return call.outcome()

    @staticmethod
    def _promote(queue: _Queue) -> None:
        if not queue.gathering and queue.pending:
            queue.pending[0].wake()

    async def _lead(self, queue: _Queue, own: _Call[Any]) -> None:
        queue.gathering = True
        gathering = True
        batch: list[_Call[Any]] = []
        try:
            # Acquiring the token is also the checkpoint that lets other calls join this batch.
            async with self._limit.current():
                queue.pending.remove(own)
                batch.append(own)
                for _ in range(self.batch_size(len(queue.pending) + 1) - 1):
                    batch.append(queue.pending.popleft())
                for call in batch:
                    call.taken = True
                queue.gathering = gathering = False
                self._promote(queue)
                self.record(await run_in_worker(lambda _: _run_batch(batch)), len(batch))
        finally:
            if gathering:
                # Cancelled before taking a batch: someone else must gather the rest.
                queue.gathering = False
                queue.pending.remove(own)
                self._promote(queue)
            for call in batch:
                call.wake()
