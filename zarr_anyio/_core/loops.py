"""Which event loop is running, and how to run a callback on it from another thread.

A store is awaited from zarr-python's loop thread, from the user's asyncio or trio program, from
the bridge's loop and from worker threads, often at once. The few places that must tell those
apart (the limiter waking a waiter, a worker thread or the bridge ending a call) use these two
functions, so that only this module knows what an asyncio loop and a trio token look like.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import sniffio

from .fork import reset_in_child

__all__ = ["LoopLocal", "current_loop_key", "running_asyncio_loop", "wait_out", "waker"]

T = TypeVar("T")


def current_loop_key() -> Any:
    """An object that identifies the running event loop (asyncio's loop, trio's token)."""
    token = anyio.lowlevel.current_token()
    # anyio >= 4.11 wraps the native token; older releases return it bare.
    return getattr(token, "native_token", token)


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop if the caller is an asyncio task, else ``None`` (trio, in guest
    mode too): what `current_loop_key` tells apart, without anyio's and sniffio's look-ups
    when no other library has said it runs (≈0.3 µs a call against ≈2.5), for the paths taken
    once a request."""
    if sniffio.thread_local.name is None and sniffio.current_async_library_cvar.get() is None:
        return asyncio._get_running_loop()
    key = current_loop_key()
    return key if isinstance(key, asyncio.AbstractEventLoop) else None


def waker(caller: Any) -> Callable[[Callable[[], object]], None]:
    """A thread-safe way to run a callback on the loop that ``caller`` (a loop key) names.

    The callback runs soon on that loop. If the loop has ended, the returned function raises
    ``RuntimeError`` (asyncio's "Event loop is closed", trio's ``RunFinishedError``).
    """
    if isinstance(caller, asyncio.AbstractEventLoop):
        loop: asyncio.AbstractEventLoop = caller

        def wake_asyncio(callback: Callable[[], object]) -> None:
            loop.call_soon_threadsafe(callback)

        return wake_asyncio
    # trio: its token runs callbacks on the trio loop from any thread.
    run_sync_soon: Callable[[Callable[[], object]], None] = caller.run_sync_soon
    return run_sync_soon


class LoopLocal(Generic[T]):
    """One value per running event loop, made by ``factory`` on first use in that loop.

    Entries go when their loop is garbage-collected, so a store that outlives many short
    ``anyio.run`` calls does not collect values.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()
        # Two loops in two threads may ask for their value at the same moment.
        self._lock = threading.Lock()
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it as it forked

    def get(self) -> T:
        key = current_loop_key()
        value = self._values.get(key)
        if value is None:
            with self._lock:
                value = self._values.get(key)
                if value is None:
                    value = self._values[key] = self._factory()
        return value


async def wait_out(event: anyio.Event) -> None:
    """Wait until ``event`` is set, however often the caller is cancelled meanwhile.

    For a caller that was cancelled and must still wait for work it started (a worker thread,
    a bridged task) before it may go on. anyio's shield keeps anyio's own cancellation out, but
    not a native ``task.cancel()``, which asyncio's ``TaskGroup`` and ``timeout`` call, sometimes
    twice: those are caught here and the wait goes on. The caller re-raises its cancellation
    once the work has ended.
    """
    with anyio.CancelScope(shield=True):
        while not event.is_set():
            # Under trio nothing gets through the shield; under asyncio only a native cancel.
            with contextlib.suppress(anyio.get_cancelled_exc_class()):
                await event.wait()
