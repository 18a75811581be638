"""The network sessions of the filesystems a store makes: closed when the store is done.

fsspec closes the sessions of its blocking filesystem instances when they are collected, but
leaves those of ``asynchronous=True`` instances to their owner, and `FsspecStore.from_url` makes
those (a session belongs to the loop that made it, the bridge's). Left open, aiohttp prints
"Unclosed client session" and "Unclosed connector" on stderr at exit. So a store that made its
filesystem closes its session on `close`/`aclose`, when it is collected, and at exit
(``weakref.finalize`` does the last two); copies of it (``with_read_only``) keep it alive while
they read through its filesystem. A filesystem the caller passed is the caller's to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from typing import Any

from zarr_anyio._core.bridge import bridge_loop

__all__ = ["close_session", "close_when_collected"]

# How long exit (or a collection) waits for a session to close on the bridge loop: closing is
# a few callbacks; a loop that cannot run them in this long is stuck, and exit must not hang.
_CLOSE_WAIT = 2.0


async def close_session(fs: Any) -> None:
    """Close the network session of an ``asynchronous=True`` filesystem, on the loop it uses.

    Only two shapes are known here: s3fs's aiobotocore client context and the aiohttp session
    of fsspec's HTTP filesystem. Each is reset to ``None`` first, so the filesystem makes a new
    one if it is used again.
    """
    creator = getattr(fs, "_s3creator", None)
    if creator is not None and getattr(fs, "_s3", None) is not None:
        fs._s3 = None
        await creator.__aexit__(None, None, None)
    session = getattr(fs, "_session", None)
    if session is not None and hasattr(session, "close") and hasattr(session, "closed"):
        fs._session = None
        await session.close()


def _has_session(fs: Any) -> bool:
    return getattr(fs, "_session", None) is not None or getattr(fs, "_s3", None) is not None


def _close_on_bridge(fs: Any, pid: int) -> None:
    """Close ``fs``'s session on the bridge loop from wherever a finalizer runs: wait (a little)
    from any other thread, only schedule it from the bridge's own. Never in a forked child: the
    session and its sockets are the parent's (closing them there would unregister the parent's
    sockets from the epoll instance the two processes share)."""
    if os.getpid() != pid or not _has_session(fs):
        return  # a child's copy; or never used, or closed already: no loop to start
    loop = bridge_loop()
    if loop.is_closed() or not loop.is_running():
        return
    future = asyncio.run_coroutine_threadsafe(close_session(fs), loop)
    if threading.current_thread().name == "zarr_anyio-bridge":
        return
    with contextlib.suppress(Exception):
        future.result(timeout=_CLOSE_WAIT)


def close_when_collected(owner: object, fs: Any) -> None:
    """Close ``fs``'s session when ``owner`` is collected, or at exit if it is still alive."""
    weakref.finalize(owner, _close_on_bridge, fs, os.getpid())
