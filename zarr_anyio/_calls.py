"""Calls in flight on a store, so that closing it can wait for them.

A store whose ``close()`` writes (a zip's directory) must not close under a call that is still
running: the call would then reopen the file and leave it without a directory (seen: a closed
ZipStore whose in-flight writes reopened it). So each call is counted from its start to its end,
and close waits until none is left. Calls are counted per thread: a ``close()`` made on an event
loop's thread cannot wait for calls of that same loop (they need the loop it blocks), so it
refuses instead of hanging. Counting costs two uncontended lock round trips per call (~0.3 µs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["InFlight"]


class InFlight:
    """Counts the calls in flight, per thread that made them."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._by_thread: dict[int, int] = {}

    @contextmanager
    def call(self) -> Iterator[None]:
        """Count the body as a call in flight."""
        thread = threading.get_ident()
        with self._changed:
            self._by_thread[thread] = self._by_thread.get(thread, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                left = self._by_thread[thread] - 1
                if left:
                    self._by_thread[thread] = left
                else:
                    del self._by_thread[thread]
                    if not self._by_thread:
                        self._changed.notify_all()

    def wait_until_idle(self, what: str, check_cancelled: Callable[[], None]) -> None:
        """Return once no call is in flight; ``check_cancelled`` is called while waiting.

        Raises ``RuntimeError`` if calls made in this very thread are in flight: they run on
        this thread's event loop, which cannot run them while we wait here."""
        with self._changed:
            own = self._by_thread.get(threading.get_ident(), 0)
            if own:
                raise RuntimeError(
                    f"{what} was called on an event loop that has {own} call(s) to this store "
                    "in flight: they cannot finish while it blocks the loop. Await them first, "
                    "or use `await store.aclose()`, which waits for them."
                )
            while self._by_thread:
                self._changed.wait(0.05)
                check_cancelled()
