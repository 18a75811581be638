"""Advisory locks on whole files: the one place that knows how this system takes them.

A ZipStore that writes holds one on its archive, so that a second writer (another process, or
another store on the same file in this one) is refused at once instead of both appending and
losing half the keys. ``flock`` rather than ``fcntl``'s record locks: a record lock belongs to
the process and is dropped when *any* descriptor of the file closes (ZipStore's reads open and
close descriptors of the archive all the time), where ``flock`` belongs to one open file and
lasts until it is unlocked or closed. Advisory: it keeps out writers that ask (ours), not
others. A port to Windows swaps this module (``msvcrt.locking`` or ``LockFileEx``).
"""

from __future__ import annotations

import errno
import os
from typing import Literal

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no locks (yet)
    fcntl = None  # type: ignore[assignment]

__all__ = ["same_file", "try_lock", "unlock"]

Taken = Literal["taken", "held", "unsupported"]

# Errors that mean "this file system has no such locks" (some network and FUSE file systems):
# the file is used unlocked, as before locks existed, rather than refused.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def try_lock(fd: int) -> Taken:
    """Take an exclusive lock on the open file ``fd`` without waiting: ``"taken"``, ``"held"``
    (someone else has it) or ``"unsupported"`` (no locks here)."""
    if fcntl is None:
        return "unsupported"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError as error:
        if error.errno in _NO_LOCKS:
            return "unsupported"
        raise
    return "taken"


def unlock(fd: int) -> None:
    """Give the lock up now, even while duplicates of ``fd`` (reads in flight) stay open."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as error:
            if error.errno not in _NO_LOCKS and error.errno != errno.EBADF:
                raise


def same_file(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a lock taken on a file that was
    replaced since it was opened guards nothing)."""
    try:
        named = os.stat(path)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
