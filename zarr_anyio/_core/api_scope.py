"""What one call of `zarr_anyio.api` has running at the stores, so that it ends with the call.

zarr fans a read out into tasks with ``asyncio.gather``, which does not wait for them: the first
task to end cancelled (or failed) ends the gather, while the others are still winding down, a
thread still reading, a request still open (seen here: 8 reads still running when a cancelled
``getitem`` returned). So a call of the API runs with an `ApiScope` in a context variable, which
zarr's tasks inherit; every store operation made under it is counted, and when the call ends —
returned, failed or cancelled — it waits until none is running. After a failure or cancellation
the operations still running are cancelled first: their results are wanted by no one.

The same mark tells a store that zarr must not take its blocking fast path (zarr >= 3.4's fused
codec pipeline reads and writes in threads of its own, outside the store's limit and beyond the
reach of cancellation): `in_api_call`.

Counting happens on the event loop that runs zarr's coroutines (the caller's asyncio loop, or
the bridge's loop under trio), which is where zarr's tasks call the store.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

import anyio

__all__ = ["ApiScope", "in_api_call", "tracked"]

P = ParamSpec("P")
T = TypeVar("T")


class ApiScope:
    """The store operations one API call has running, by the task running each."""

    def __init__(self) -> None:
        self._running: dict[asyncio.Task[object] | None, int] = {}
        self._idle: asyncio.Event | None = None

    def started(self) -> None:
        task = _current_task()
        self._running[task] = self._running.get(task, 0) + 1

    def ended(self) -> None:
        task = _current_task()
        left = self._running[task] - 1
        if left:
            self._running[task] = left
        else:
            del self._running[task]
            if not self._running and self._idle is not None:
                self._idle.set()

    async def settle(self, *, cancel: bool) -> None:
        """Wait until no operation of this call is running; with ``cancel``, cancel them first.

        Shielded, and deaf to repeated cancellation while it waits (which it re-raises after).
        """
        if cancel:
            me = _current_task()
            for task in self._running:
                # Once is enough: a task asked twice may stop waiting for what it started.
                if task is not None and task is not me and not task.cancelling():
                    task.cancel()
        interrupted: BaseException | None = None
        with anyio.CancelScope(shield=True):
            while self._running:
                self._idle = asyncio.Event()
                try:
                    await self._idle.wait()
                except asyncio.CancelledError as error:  # native cancellation, past the shield
                    interrupted = error
        if interrupted is not None:
            raise interrupted


CURRENT: ContextVar[ApiScope | None] = ContextVar("zarr_anyio_api_call", default=None)


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def in_api_call() -> bool:
    """Whether this runs on behalf of a `zarr_anyio.api` call."""
    return CURRENT.get() is not None


def tracked(operation: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A store operation that an API call waits for (see the module docstring)."""

    @functools.wraps(operation)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        call = CURRENT.get()
        if call is None:
            return await operation(*args, **kwargs)
        call.started()
        try:
            return await operation(*args, **kwargs)
        finally:
            call.ended()

    return run
