"""The loop-agnostic limiter: one bound for every event loop and thread, FIFO, cancellation-safe.

Counts are taken at the disk (a test double of LocalStore's blocking read) or at the limiter's
own statistics, never as durations.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

from support.doubles import ConcurrencyProbe
from support.stores import fill_keys as _fill
from zarr_anyio import Limiter, LocalStore, MemoryStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


@pytest.mark.parametrize("other_backend", ["asyncio", "trio"])
async def test_one_store_from_two_event_loops_holds_one_bound(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe], other_backend: str
) -> None:
    # The same store read at once from this test's loop and from a loop in another thread:
    # together they never have more than max_concurrency reads at the disk.
    store = LocalStore(tmp_path, max_concurrency=3)
    keys = await _fill(store, 80)
    double = reads(3)

    async def read_all() -> None:
        results = await store.get_partial_values(PROTO, [(key, None) for key in keys])
        assert all(result is not None for result in results)

    def other_loop() -> None:
        anyio.run(read_all, backend=other_backend)

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, other_loop)
        tg.start_soon(read_all)
    assert double.calls == 160
    assert double.most == 3
    assert store.limiter.statistics().borrowed_tokens == 0


async def test_zarr_and_the_caller_share_the_bound(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe]
) -> None:
    # zarr-python's sync API runs on zarr's own loop thread; the caller awaits on its own loop.
    import zarr

    store = LocalStore(tmp_path, max_concurrency=2)

    def create() -> zarr.Array[Any]:  # zarr's sync API, in a thread as a trio program must call it
        array = zarr.create_array(store=store, shape=(64,), chunks=(1,), dtype="uint8")
        array[:] = 7
        return array

    array = await anyio.to_thread.run_sync(create)
    keys = [f"c/{i}" for i in range(64)]
    double = reads(2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, lambda: array[:])
        tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in keys])
    assert double.calls == 128
    assert double.most == 2


async def test_an_anyio_limiter_used_from_a_second_loop_says_so(tmp_path: Path) -> None:
    shared = anyio.CapacityLimiter(2)
    store = LocalStore(tmp_path, limiter=shared)
    await store.set("k", cpu.Buffer.from_bytes(b"v"))

    def other_loop() -> None:
        anyio.run(store.get, "k", PROTO)

    with pytest.raises(RuntimeError, match=r"zarr_anyio\.Limiter"):
        await anyio.to_thread.run_sync(other_loop)
    assert await store.get("k", PROTO) is not None  # still fine on its own loop


async def test_waiters_are_served_first_come_first_served_across_loops() -> None:
    limiter = Limiter(1)
    order: list[str] = []
    await limiter.acquire()
    queued = threading.Event()

    def other_loop() -> None:
        async def wait() -> None:
            async def mark_queued() -> None:
                while limiter.statistics().tasks_waiting < 1:
                    await anyio.sleep(0.001)
                queued.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(mark_queued)
                async with limiter:
                    order.append("other loop")

        anyio.run(wait, backend="trio")

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, other_loop)
        await anyio.to_thread.run_sync(queued.wait)

        async def here() -> None:
            async with limiter:
                order.append("this loop")

        tg.start_soon(here)
        while limiter.statistics().tasks_waiting < 2:
            await anyio.sleep(0.001)
        limiter.release()
    assert order == ["other loop", "this loop"]
    assert limiter.statistics().borrowed_tokens == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_token() -> None:
    limiter = Limiter(1)
    await limiter.acquire()
    with anyio.move_on_after(0.05) as scope:
        await limiter.acquire()
    assert scope.cancelled_caught
    assert limiter.statistics().tasks_waiting == 0
    limiter.release()
    assert limiter.statistics().borrowed_tokens == 0
    limiter.acquire_nowait()  # the token came back
    limiter.release()


async def test_a_token_granted_to_a_cancelled_waiter_is_passed_on() -> None:
    # The token is handed over, then the waiter is cancelled before it runs: it must give the
    # token to the next waiter (or, where the wake-up won the race, use it and give it back).
    limiter = Limiter(1)
    await limiter.acquire()
    got: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def wait(name: str) -> None:
        with anyio.CancelScope() as scopes[name]:
            async with limiter:
                got.append(name)

    async with anyio.create_task_group() as tg:
        for queued, name in enumerate(["first", "second"], start=1):
            tg.start_soon(wait, name)
            while limiter.statistics().tasks_waiting < queued:
                await anyio.sleep(0.001)
        limiter.release()  # handed to "first"...
        scopes["first"].cancel()  # ...which is cancelled before it runs
    assert got in (["second"], ["first", "second"])
    assert limiter.statistics().borrowed_tokens == 0


async def test_changing_total_tokens_wakes_waiters_and_bounds_new_callers() -> None:
    limiter = Limiter(1)
    await limiter.acquire()
    entered = 0

    async def enter() -> None:
        nonlocal entered
        async with limiter:
            entered += 1
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(enter)
        while limiter.statistics().tasks_waiting < 3:
            await anyio.sleep(0.001)
        limiter.total_tokens = 4  # three more tokens: all three waiters go in
        while entered < 3:
            await anyio.sleep(0.001)
        assert limiter.statistics().borrowed_tokens == 4
    limiter.total_tokens = 1
    limiter.release()
    assert limiter.statistics().borrowed_tokens == 0
    with pytest.raises(ValueError, match="at least 1"):
        limiter.total_tokens = 0


async def test_lowering_total_tokens_holds_new_callers_back() -> None:
    limiter = Limiter(3)
    for _ in range(3):
        await limiter.acquire()
    limiter.total_tokens = 1
    limiter.release()
    limiter.release()
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()  # still one borrowed, and the bound is now one
    limiter.release()
    limiter.acquire_nowait()
    limiter.release()


def test_threads_hold_tokens_with_blocking() -> None:
    limiter = Limiter(2)
    now = most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal now, most
        with limiter.blocking():
            with lock:
                now += 1
                most = max(most, now)
            threading.Event().wait(0.005)
            with lock:
                now -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 2
    assert limiter.statistics().borrowed_tokens == 0


def test_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="release"):
        Limiter(1).release()


def test_stores_pickled_together_keep_sharing_a_limiter(tmp_path: Path) -> None:
    shared = Limiter(5)
    first, second = MemoryStore(limiter=shared), LocalStore(tmp_path, limiter=shared)
    first_copy, second_copy = pickle.loads(pickle.dumps((first, second)))
    assert first_copy.limiter is second_copy.limiter
    assert first_copy.limiter is not shared
    assert first_copy.limiter.total_tokens == 5
    alone = pickle.loads(pickle.dumps(LocalStore(tmp_path, max_concurrency=7)))
    assert alone.max_concurrency == 7


# ------------------------------------------------------------ native asyncio double cancellation
# These run their own asyncio loops: a native ``task.cancel()`` is asyncio's alone.


def _loops() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    import uvloop

    return [asyncio.new_event_loop, uvloop.new_event_loop]


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    return _loops()[0 if request.param == "asyncio" else 1]


def test_a_worker_call_is_waited_for_through_a_double_native_cancel(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    from zarr_anyio._core.threads import run_in_worker

    running = threading.Event()
    finished = threading.Event()

    def slow(check: Callable[[], None]) -> None:
        running.set()
        # Ignores the stop request for a while, as a write in the middle of a syscall does.
        threading.Event().wait(0.2)
        finished.set()

    async def main() -> bool:
        task = asyncio.ensure_future(run_in_worker(slow))
        await asyncio.get_running_loop().run_in_executor(None, running.wait)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()  # again, while the first cancellation waits for the thread
        with pytest.raises(asyncio.CancelledError):
            await task
        return finished.is_set()

    loop = new_loop()
    try:
        assert loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_bridged_task_is_waited_for_through_a_double_native_cancel(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    from zarr_anyio._core.bridge import run_on_loop

    events: list[str] = []

    async def bridged() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.2)  # cleanup that takes a while
            events.append("ended")

    async def main() -> list[str]:
        task = asyncio.ensure_future(run_on_loop(bridged))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(events)

    loop = new_loop()
    try:
        assert loop.run_until_complete(main()) == ["ended"]
    finally:
        loop.close()


def test_a_local_write_is_waited_for_under_asyncio_timeouts(
    tmp_path: Path, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    # asyncio.timeout inside a TaskGroup: the write's thread has ended when the call returns,
    # and the key holds the old value or the new one.
    import zarr_anyio.storage._localfs

    store = LocalStore(tmp_path)
    lock = threading.Lock()
    pieces_in_flight = 0
    pieces_written = 0
    real_write = zarr_anyio.storage._localfs._write_piece

    def slow_write(fd: int, data: memoryview) -> int:
        nonlocal pieces_in_flight, pieces_written
        with lock:
            pieces_in_flight += 1
        threading.Event().wait(0.02)
        try:
            return real_write(fd, data)
        finally:
            with lock:
                pieces_in_flight -= 1
                pieces_written += 1

    async def main() -> None:
        await store.set("k", cpu.Buffer.from_bytes(b"old"))
        zarr_anyio.storage._localfs._write_piece = slow_write
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.01):
                    async with asyncio.TaskGroup() as tg:
                        task = tg.create_task(
                            store.set("k", cpu.Buffer.from_bytes(b"n" * (4 << 20)))
                        )
                        await asyncio.sleep(0.005)
                        task.cancel()  # a second cancel, beside the timeout's
            # The call has returned: its thread is not writing any more.
            assert pieces_in_flight == 0
            assert pieces_written >= 1
        finally:
            zarr_anyio.storage._localfs._write_piece = real_write
        value = await store.get("k", PROTO)
        assert value is not None
        assert value.to_bytes() in (b"old", b"n" * (4 << 20))

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
