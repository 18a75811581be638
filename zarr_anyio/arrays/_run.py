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
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
import zarr
import zarr.core.config

from zarr_anyio._core.api_scope import CURRENT, ApiScope
from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio._core.fork import at_fork_in_child
from zarr_anyio._core.loops import current_loop_key
from zarr_anyio.storage import AnyioStore

__all__ = ["concurrency_floor", "run_zarr"]

T = TypeVar("T")


async def run_zarr(make: Callable[[], Coroutine[Any, Any, T]], floor: int = 0) -> T:
    """Await the zarr coroutine ``make()`` from any anyio backend (see the module docstring),
    with zarr's ``async.concurrency`` at least ``floor`` inside it (`concurrency_floor`)."""
    if isinstance(current_loop_key(), asyncio.AbstractEventLoop):
        return await _in_a_task_of_its_own(lambda: _as_api_call(make, floor))
    return await run_on_loop(lambda: _as_api_call(make, floor))


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


async def _as_api_call(make: Callable[[], Coroutine[Any, Any, T]], floor: int) -> T:
    # zarr's tasks inherit the mark, so their store operations count as this call's, and the
    # call ends only when none is running (zarr's gather does not wait for them: see
    # zarr_anyio._core.api_scope). They inherit the concurrency floor the same way.
    call = ApiScope()
    token = CURRENT.set(call)
    floor_token = _FLOOR.set(max(floor, _FLOOR.get()))
    try:
        result = await make()
    except BaseException:
        await call.settle(cancel=True)
        raise
    finally:
        _FLOOR.reset(floor_token)
        CURRENT.reset(token)
    await call.settle(cancel=False)
    return result


# zarr caps the chunk requests of one call at its ``async.concurrency`` setting (default 10):
# below a store's own bound, zarr's cap would silently win. Setting zarr's config would change it
# for the whole process (donfig's ``config.set`` is one shared dict, even as a context manager:
# overlapping calls would see each other's value and, leaving out of order, restore the wrong
# one). So inside our calls only, zarr reads the setting through a floor kept in a context
# variable that zarr's tasks inherit: zarr's code, its sync API and every other caller read
# the setting as it is.
_FLOOR: ContextVar[int] = ContextVar("zarr_anyio_concurrency_floor", default=0)
_install_lock = threading.Lock()


def _renew_install_lock() -> None:
    global _install_lock
    _install_lock = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_install_lock)


def concurrency_floor(store: object) -> int:
    """What zarr's ``async.concurrency`` must be at least inside a call on ``store``: a
    zarr_anyio store's bound (0, no floor, for any other store)."""
    if isinstance(store, AnyioStore):
        _install_floor()
        return store.max_concurrency
    return 0


def _install_floor() -> None:
    config = zarr.core.config.config
    with _install_lock:
        if getattr(config.get, "_zarr_anyio_floor", False):
            return
        plain_get = config.get

        def get(key: str, *args: Any, **kwargs: Any) -> Any:
            value = plain_get(key, *args, **kwargs)
            floor = _FLOOR.get()
            if floor and key == "async.concurrency" and isinstance(value, int) and value < floor:
                return floor
            return value

        get._zarr_anyio_floor = True  # type: ignore[attr-defined]
        config.get = get
