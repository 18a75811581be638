"""Test doubles that stand in for a store's blocking calls and count how many run at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class ConcurrencyProbe:
    """Wraps a blocking function; counts calls running at once, and can hold them at a gate.

    A held call waits until ``hold_until`` calls are running together (or a safety timeout),
    so the most-seen count says what the store allowed, not how fast threads happened to run.
    It then spends a couple of milliseconds of CPU, like a read that decompresses, which the
    store's batching sees as too long to put several such calls in one thread hop.
    """

    def __init__(self, function: Callable[..., Any], hold_until: int = 0) -> None:
        self.function = function
        self.hold_until = hold_until
        self.now = 0
        self.most = 0
        self.calls = 0
        self.release = threading.Event()
        self._changed = threading.Condition()

    def __call__(self, *args: Any) -> Any:
        with self._changed:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
            self._changed.notify_all()
            if self.hold_until:
                self._changed.wait_for(
                    lambda: self.now >= self.hold_until or self.release.is_set(), timeout=0.5
                )
        if self.hold_until:
            busy_until = time.thread_time() + 0.002
            while time.thread_time() < busy_until:
                pass
        try:
            return self.function(*args)
        finally:
            with self._changed:
                self.now -= 1
                self._changed.notify_all()

    def wait_for_running(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.now >= count, timeout=10)
