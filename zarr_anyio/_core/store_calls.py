"""Calls in flight on a store, so that closing it can wait for them.

A store whose ``close()`` writes (a zip's directory) must not close under a call that is still
running: the call would then reopen the file and leave it without a directory (seen: a closed
ZipStore whose in-flight writes reopened it). So each call is counted from its start to its end,
and close waits until none is left. Calls are counted per thread: a ``close()`` made on an event
loop's thread cannot wait for calls of that same loop (they need the loop it blocks), so it
refuses instead of hanging.

Counting is on every read's path (a page-cache read costs ~8 µs), so it takes no lock: each
thread changes only its own entry of a dict, which is safe without one, and a waiting close
polls (every 50 ms, or at once when woken by the last call out). ~0.3 µs a call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .fork import reset_in_child

__all__ = ["StoreCalls"]


class StoreCalls:
    """Counts the calls in flight, per thread that made them: ``with in_flight: ...``.

    A call enters and exits in the same thread (a task's loop thread, or a blocking caller's).
    """

    def __init__(self) -> None:
        self._by_thread: dict[int, int] = {}
        self._idle = threading.Condition(threading.Lock())
        self._waiters = 0
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        # Calls of the parent's other threads will never end here: a close() in the child
        # would wait for them for ever. The forking thread's own calls go on in the child.
        here = threading.get_ident()
        self._by_thread = {here: self._by_thread[here]} if here in self._by_thread else {}
        self._idle = threading.Condition(threading.Lock())
        self._waiters = 0

    def __enter__(self) -> None:
        thread = threading.get_ident()
        self._by_thread[thread] = self._by_thread.get(thread, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        thread = threading.get_ident()
        left = self._by_thread[thread] - 1
        if left:
            self._by_thread[thread] = left
            return
        del self._by_thread[thread]
        if self._waiters and not self._by_thread:
            with self._idle:
                self._idle.notify_all()

    def wait_until_idle(self, what: str, check_cancelled: Callable[[], None]) -> None:
        """Return once no call is in flight; ``check_cancelled`` is called while waiting.

        Raises ``RuntimeError`` if calls made in this very thread are in flight: they run on
        this thread's event loop, which cannot run them while we wait here."""
        own = self._by_thread.get(threading.get_ident(), 0)
        if own:
            raise RuntimeError(
                f"{what} was called on an event loop that has {own} call(s) to this store "
                "in flight: they cannot finish while it blocks the loop. Await them first, "
                "or use `await store.aclose()`, which waits for them."
            )
        with self._idle:
            self._waiters += 1
            try:
                while self._by_thread:
                    self._idle.wait(0.05)
                    check_cancelled()
            finally:
                self._waiters -= 1
