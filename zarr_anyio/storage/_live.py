"""The stores alive in this process, by ``str()``: how ``open_store(str(store))`` finds the data
of a store whose name alone cannot reach it (a dict in memory, a filesystem or obstore client
with its own endpoint and credentials, a zip file this process holds open for writing).

Weak references only: registering a store never keeps it, or its data, alive.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from zarr_anyio._core.fork import at_fork_in_child

__all__ = ["find", "remember"]

_stores: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_lock)


def remember(name: str, store: Any) -> None:
    """Make ``store`` the one that ``name`` reaches (the latest store of a name wins: every store
    of one name holds the same data)."""
    with _lock:
        _stores[name] = store


def find(name: str) -> Any | None:
    """The live store that ``name`` reaches in this process, if any."""
    with _lock:
        return _stores.get(name)
