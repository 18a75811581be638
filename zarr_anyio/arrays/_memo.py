"""Things worked out once per key (a chunk spec, a shard's box) and kept for the calls after."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Memo"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Values made once per key and kept, at most ``most`` keys (all dropped when there are more:
    an irregular grid makes a spec per chunk, and keeping each would grow without end).

    Shared by worker threads: a value is made outside the lock (two threads may both make one,
    and either is right), stored under it, and read-only once made. A key that does not hash (a
    spec with an odd fill value) has its value made every time."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._values: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K, make: Callable[[], V]) -> V:
        try:
            found = self._values.get(key)
        except TypeError:
            return make()
        if found is None:
            found = make()
            with self._lock:
                if len(self._values) > self._most:
                    self._values.clear()
                self._values[key] = found
        return found
