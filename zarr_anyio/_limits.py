"""Concurrency limits that follow a store from one event loop to the next.

An ``anyio.CapacityLimiter`` belongs to the event loop that first used it. A zarr store, though,
is awaited from zarr-python's own loop thread, from the user's trio or asyncio program, and again
after pickling. So a store does not hold a limiter; it holds a `ConcurrencyLimit`, which makes one
limiter per event loop, lazily, with the same number of tokens. A caller who wants several stores
to draw on one budget passes a limiter of their own, and that one is used everywhere as it is.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "ConcurrencyLimit",
    "LoopLocal",
    "current_loop_key",
]

DEFAULT_MAX_CONCURRENCY = 32

T = TypeVar("T")


def current_loop_key() -> Any:
    """An object that identifies the running event loop (asyncio's loop, trio's token)."""
    token = anyio.lowlevel.current_token()
    # anyio >= 4.11 wraps the native token; older releases return it bare.
    return getattr(token, "native_token", token)


class LoopLocal(Generic[T]):
    """One value per running event loop, made by ``factory`` on first use in that loop.

    Entries go when their loop is garbage-collected, so a store that outlives many short
    ``anyio.run`` calls does not collect limiters.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[Any, T] = weakref.WeakKeyDictionary()
        # Two loops in two threads may ask for their value at the same moment.
        self._lock = threading.Lock()

    def get(self) -> T:
        key = current_loop_key()
        value = self._values.get(key)
        if value is None:
            with self._lock:
                value = self._values.get(key)
                if value is None:
                    value = self._values[key] = self._factory()
        return value


class ConcurrencyLimit:
    """``max_concurrency`` tokens per event loop, or one caller-owned limiter shared by all."""

    def __init__(
        self, max_concurrency: int | None = None, limiter: anyio.CapacityLimiter | None = None
    ) -> None:
        if limiter is not None and max_concurrency is not None:
            raise ValueError("pass either max_concurrency= or limiter=, not both")
        if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
            raise TypeError(f"limiter must be an anyio.CapacityLimiter, got {limiter!r}")
        if max_concurrency is None:
            max_concurrency = DEFAULT_MAX_CONCURRENCY
        if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool):
            raise TypeError(f"max_concurrency must be an int, got {max_concurrency!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._shared = limiter
        self._total = max_concurrency
        self._per_loop = LoopLocal(lambda: anyio.CapacityLimiter(max_concurrency))

    @property
    def shared(self) -> anyio.CapacityLimiter | None:
        """The caller's own limiter, if one was passed."""
        return self._shared

    @property
    def total_tokens(self) -> int:
        """How many operations may be in flight at once (per event loop, unless shared)."""
        if self._shared is not None:
            return int(self._shared.total_tokens)
        return self._total

    def current(self) -> anyio.CapacityLimiter:
        """The limiter for the running event loop, made on first use."""
        if self._shared is not None:
            return self._shared
        return self._per_loop.get()

    def __getstate__(self) -> dict[str, Any]:
        # Limiters and locks do not pickle; a caller's shared limiter belongs to its own process.
        return {"total": self.total_tokens}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(max_concurrency=state["total"])  # type: ignore[misc]
