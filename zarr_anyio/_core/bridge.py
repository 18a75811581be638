"""Running asyncio-only client code (s3fs, obstore's async API) on behalf of any anyio caller.

The coroutine runs on an asyncio loop in a thread: the filesystem's own loop for an fsspec
filesystem that has one, otherwise one daemon loop thread that this library starts on first use.
The caller — a trio task, an asyncio task on another loop — waits on an ``anyio.Event`` that the
bridged task sets from its loop thread when it ends (``call_soon_threadsafe`` into an asyncio
caller, the trio token's ``run_sync_soon`` into a trio one), so no worker thread is tied up per
call. Cancelling the caller cancels the bridged task and waits until it has ended before the
cancellation goes on: no orphan request keeps running. An error comes back as itself.

A caller already on the target loop awaits the coroutine directly: no hop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio

from .fork import at_fork_in_child, keep_inherited
from .loops import current_loop_key, wait_out, waker

__all__ = ["bridge_loop", "run_blocking", "run_on_loop"]

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def bridge_loop() -> asyncio.AbstractEventLoop:
    """The library's own asyncio loop, running in a daemon thread, started on first use."""
    global _loop
    if _loop is None:
        with _loop_lock:
            if _loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                threading.Thread(target=run, name="zarr_anyio-bridge", daemon=True).start()
                started.wait()
                _loop = loop
    return _loop


def _after_fork_in_child() -> None:
    # The loop's thread did not come along: every call would wait for ever on a loop nobody
    # runs. The child starts a loop of its own on first use; the parent's is kept, unclosed
    # (closing it would unregister, in the epoll instance the child shares with the parent,
    # the parent's own sockets).
    global _loop, _loop_lock
    if _loop is not None:
        keep_inherited(_loop)
    _loop = None
    _loop_lock = threading.Lock()


at_fork_in_child(_after_fork_in_child)


async def run_on_loop(
    make: Callable[[], Coroutine[Any, Any, T]], loop: asyncio.AbstractEventLoop | None = None
) -> T:
    """Await ``make()`` on ``loop`` (default: the bridge loop) from any anyio backend."""
    target = loop or bridge_loop()
    caller = current_loop_key()
    if caller is target:
        return await make()

    ended = anyio.Event()
    wake = waker(caller)
    tasks: list[asyncio.Task[T]] = []

    def start() -> None:
        # On the target loop. The caller waits for this task's end, so it is not left behind.
        # A fresh context: the caller's (a trio task's, say) must not leak into asyncio code.
        task = target.create_task(make(), context=contextvars.Context())
        task.add_done_callback(lambda _: wake(ended.set))
        tasks.append(task)

    def cancel() -> None:
        # Also on the target loop, and after start(): callbacks from one thread run in order.
        tasks[0].cancel()

    target.call_soon_threadsafe(start, context=contextvars.Context())
    try:
        await ended.wait()
    except BaseException:
        # Cancelled (or interrupted): stop the bridged task and wait for it to end, through
        # any further cancellation, so nothing of this call outlives it.
        target.call_soon_threadsafe(cancel, context=contextvars.Context())
        await wait_out(ended)
        raise
    task = tasks[0]
    if task.cancelled():
        raise RuntimeError("the bridged task was cancelled by someone else")
    error = task.exception()
    if error is not None:
        raise error
    return task.result()


def run_blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``make()`` on the bridge loop from plain blocking code, and wait for its result."""
    target = bridge_loop()
    if threading.current_thread().name == "zarr_anyio-bridge":
        raise RuntimeError("a blocking call cannot be made from the bridge's own loop")
    done = threading.Event()
    tasks: list[asyncio.Task[T]] = []

    def start() -> None:
        # A fresh context, so that a trio or asyncio caller in this thread does not leak in.
        task = target.create_task(make(), context=contextvars.Context())
        task.add_done_callback(lambda _: done.set())
        tasks.append(task)

    target.call_soon_threadsafe(start, context=contextvars.Context())
    done.wait()
    return tasks[0].result()
