"""Running zarr's asyncio coroutines from any anyio backend, each call ending with its work.

* under asyncio (uvloop included), on the caller's own loop, in a task of its own (so that a
  cancellation reaches zarr's work once, however often anyio repeats it): no hop, no thread;
* under trio, on the bridge's asyncio loop (`zarr_anyio._core.bridge.run_on_loop`): the trio
  task waits on an event, holding no thread, and cancelling it cancels the zarr task and waits
  for its end.

Either way the call ends only when every store operation made for it has ended
(`zarr_anyio._core.api_scope`): no chunk read or write of a returned, failed or cancelled call is
left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import zarr

from zarr_anyio._core.api_scope import CURRENT, ApiScope
from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio._core.fork import at_fork_in_child
from zarr_anyio._core.loops import current_loop_key
from zarr_anyio.storage import AnyioStore

__all__ = ["raise_zarr_concurrency", "run_zarr"]

T = TypeVar("T")


async def run_zarr(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Await the zarr coroutine ``make()`` from any anyio backend (see the module docstring)."""
    if isinstance(current_loop_key(), asyncio.AbstractEventLoop):
        return await _in_a_task_of_its_own(lambda: _as_api_call(make))
    return await run_on_loop(lambda: _as_api_call(make))


async def _in_a_task_of_its_own(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # On the caller's loop, but in a task of its own, so that zarr's work is cancelled exactly
    # once, as the bridge does it under trio. An anyio cancel scope cancels its task again on
    # every turn of the loop, and through zarr's nested gathers each time reaches every chunk
    # task again, cutting short whatever they await while winding down (before the stores'
    # waits for their threads were made proof against it, reads outlived the call this way).
    # The task is awaited to its end on every path, as the bridge's are.
    task = asyncio.get_running_loop().create_task(make())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        with anyio.CancelScope(shield=True):
            while not task.done():
                # Asked again (native double cancellation): still wait for the end.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: what it raised is superseded by the cancellation
        raise


async def _as_api_call(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # zarr's tasks inherit the mark, so their store operations count as this call's, and the
    # call ends only when none is running (zarr's gather does not wait for them: see
    # zarr_anyio._core.api_scope).
    call = ApiScope()
    token = CURRENT.set(call)
    try:
        result = await make()
    except BaseException:
        await call.settle(cancel=True)
        raise
    finally:
        CURRENT.reset(token)
    await call.settle(cancel=False)
    return result


_concurrency_lock = threading.Lock()


def _renew_concurrency_lock() -> None:
    global _concurrency_lock
    _concurrency_lock = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_concurrency_lock)


def raise_zarr_concurrency(store: object) -> None:
    """Raise zarr's ``async.concurrency`` to ``store``'s bound, so that zarr's cap is not lower."""
    if not isinstance(store, AnyioStore):
        return
    wanted = store.max_concurrency
    with _concurrency_lock:
        current = zarr.config.get("async.concurrency")
        if current is not None and current < wanted:
            zarr.config.set({"async.concurrency": wanted})
