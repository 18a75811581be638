"""A clean stop: SIGINT and SIGTERM turned into a cancellation that the command cleans up after
(closing a zip writes its central directory, also after Ctrl-C)."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

from zarr_anyio._core.errors import single_error

__all__ = ["STOP_SIGNALS", "Interrupt", "interruptible"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt:
    """Cancels ``scope`` on the first SIGINT or SIGTERM and remembers which it was.

    Signals are received for as long as `watch` runs, so a second Ctrl-C while the command
    cleans up (closing a zip writes its central directory) does not cut the cleanup short.
    """

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.signal: int | None = None

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as received:
            task_status.started()
            async for number in received:
                if self.signal is None:
                    self.signal = int(number)
                    self.scope.cancel()

    @property
    def exit_code(self) -> int:
        assert self.signal is not None
        return 128 + self.signal

    @property
    def name(self) -> str:
        assert self.signal is not None
        return signal.Signals(self.signal).name


async def interruptible(work: Callable[[Interrupt], Awaitable[int]]) -> int:
    """Run ``work`` with SIGINT/SIGTERM turned into a cancellation of ``interrupt.scope``."""
    interrupt = Interrupt()
    code = 0
    with single_error():
        async with anyio.create_task_group() as tg:
            await tg.start(interrupt.watch)
            try:
                code = await work(interrupt)
            finally:
                tg.cancel_scope.cancel()
    return code
