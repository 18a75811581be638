"""What a forked child must not keep of its parent: threads it does not have.

``fork`` copies a process's memory but only the thread that called it. Everything else this
library keeps about threads then describes threads the child does not have: the worker-thread
pool believes its idle workers will pick up new calls (the child's first read that needs a worker
queued for ever), the bridge's loop is "running" in a thread that is gone (every remote call
waited for ever, ``timeout=`` included: the timer runs on that loop too), a `Limiter` counts the
tokens of tasks that no longer exist (a child of a busy parent started with none free), and a lock
that another thread held at the fork stays held. multiprocessing forks by default on Linux
before Python 3.14, and dask's and the user's workers are made that way, so the child resets each
of these, in the fork call itself (``os.register_at_fork``), before any code of the child runs.

Module state resets itself with its own ``os.register_at_fork`` hook; objects with such state
(limiters, calls in flight) register here with `reset_in_child` and get their
``_after_fork_in_child()`` called in the child. The registry holds them weakly: registering costs
a set insertion (~0.3 µs) when the object is made, nothing on its hot path.

What is not reset is kept, never closed: an asyncio loop or network session of the parent shares
its file descriptions (the epoll instance, the sockets) with the parent, and closing them from the
child would unregister the parent's own sockets (see `keep_inherited`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["ResetsAfterFork", "at_fork_in_child", "keep_inherited", "reset_in_child"]


class ResetsAfterFork(Protocol):
    def _after_fork_in_child(self) -> None:
        """Called in a forked child, in its only thread, before the child's code runs."""


_registered: weakref.WeakSet[Any] = weakref.WeakSet()
# What the child inherited and must neither use nor close (see the module's docstring).
_inherited: list[object] = []


def at_fork_in_child(hook: Callable[[], object]) -> None:
    """``os.register_at_fork(after_in_child=hook)`` where the system forks; nothing where it
    does not (Windows has neither ``fork`` nor ``os.register_at_fork``)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=hook)


def reset_in_child(obj: ResetsAfterFork) -> None:
    """Have ``obj._after_fork_in_child()`` called in every child this process forks."""
    _registered.add(obj)


def keep_inherited(obj: object) -> None:
    """Keep ``obj`` (a loop, a session of the parent) alive and untouched in this child: its
    finaliser would close file descriptions that the parent is still using."""
    _inherited.append(obj)


def _after_fork_in_child() -> None:
    for obj in list(_registered):
        obj._after_fork_in_child()


at_fork_in_child(_after_fork_in_child)
