"""The operating system's optional file calls, each chosen by what this Python has, with the
portable call that stands in where it is missing.

Linux has all of them; macOS lacks ``O_PATH`` and ``RWF_NOWAIT`` (and ``openat2``, see
`._beneath`); Windows lacks ``pread``/``preadv``/``pwrite``, folder handles (``dir_fd=``,
``O_DIRECTORY``, ``O_NOFOLLOW``), ``fcntl`` and ``fchmod``, and cannot replace a file another
program holds open. Each is detected here, at import, by looking for the call itself rather than
guessing from ``sys.platform``, so a system that grows a call gets the faster path with no change.

What stands in, and what it costs:

- Positional reads and writes (``pread``, ``preadv``, ``pwrite``): a seek and a read or write,
  serialised per file by a lock, so concurrent readers of one zip file (and their ``dup``-ed
  descriptors, which share a position) never see each other's positions. Readers of one file
  then take turns instead of overlapping.
- Folder handles (``dir_fd=``): a folder is named by its resolved path (`DirRef` is an ``int``
  or a ``str``), and every call takes the joined path. `._beneath` resolves links itself, so a
  link that leads out of the root is refused as before, but a folder swapped for a link between
  the check and the use is no longer caught (see `._beneath`).
- File locks (``fcntl.flock``): ``msvcrt.locking`` on one byte where it exists (Windows), else
  none. With none, `try_lock` says so (``None``) and callers decide by a file's age instead; a
  lock file would add nothing, as a dead writer's lock file needs the same age rule to be told
  from a live one.
- ``RWF_NOWAIT``: absent, so no read is tried on the event loop; every read goes to a thread.
- Unnamed files (Linux's ``O_TMPFILE``, named once written through ``/proc/self/fd``): absent,
  so a write goes through a named temporary file and a rename (three more system calls, and
  every writer's files made in the one temporary folder).
- ``os.replace`` onto a file another program holds open fails on Windows (``PermissionError``):
  `replace` retries a few times, then raises a ``PermissionError`` that says why.

``ZARR_ANYIO_PORTABLE=1`` in the environment when the package is imported makes the detection
find none of the optional calls, so the portable paths run (and are tested) on Linux. It is for
tests; nothing else should set it.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
import time
from collections.abc import Callable
from types import ModuleType

__all__ = [
    "DIRECTORY",
    "DIR_FD",
    "FILE_LOCKS",
    "LISTABLE",
    "OPEN_FILES_MOVE",
    "O_BINARY",
    "O_CLOEXEC",
    "O_NOCTTY",
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "O_PATH",
    "PORTABLE",
    "RWF_NOWAIT",
    "DirRef",
    "close_dir",
    "dup_dir",
    "fchmod",
    "link_at",
    "list_folder",
    "lstat_at",
    "mkdir_at",
    "name_unnamed_at",
    "open_at",
    "open_folder_at",
    "open_unnamed_at",
    "pread",
    "pwrite",
    "read_into",
    "replace",
    "replace_at",
    "rmdir_at",
    "stat_dir",
    "try_lock",
    "unlink_at",
]

PORTABLE = os.environ.get("ZARR_ANYIO_PORTABLE", "") not in ("", "0")
"""Whether the tests asked for the portable paths (see the module docstring)."""


def _optional(module: object, name: str) -> bool:
    return not PORTABLE and hasattr(module, name)


def _flag(name: str, *, optional: bool = True) -> int:
    """The flag ``os.<name>``, or 0 where this system has none. Flags that only make a call
    safer or stricter count as optional calls; ``O_NONBLOCK``, ``O_NOCTTY`` and ``O_CLOEXEC``
    do not (a FIFO opened without ``O_NONBLOCK`` on Linux would wait for ever), and the path
    walk checks what it opens anyway (`._beneath`)."""
    if optional and PORTABLE:
        return 0
    value: int = getattr(os, name, 0)
    return value


O_NONBLOCK = _flag("O_NONBLOCK", optional=False)
O_NOCTTY = _flag("O_NOCTTY", optional=False)
# Descriptors are not inherited by child processes anyway (PEP 446); the flag makes it atomic.
O_CLOEXEC = _flag("O_CLOEXEC", optional=False)
# Windows opens files in text mode (CR LF translated) unless told otherwise.
O_BINARY = _flag("O_BINARY", optional=False)
O_NOFOLLOW = _flag("O_NOFOLLOW")
O_DIRECTORY = _flag("O_DIRECTORY")
# A handle that only names a file (no read, no side effect of opening a FIFO or a device);
# where the system has none, a non-blocking read-only open stands in.
O_PATH: int = _flag("O_PATH") or os.O_RDONLY | O_NONBLOCK
DIRECTORY = O_PATH | O_DIRECTORY | O_CLOEXEC
"""Flags to open a folder only to resolve and create names in it."""
LISTABLE = os.O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC
"""Flags to open a folder that scandir can list (never waiting, whatever it turns out to be)."""

RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if not PORTABLE else None
"""Linux's "read only what is in the page cache, else fail at once" flag; ``None`` elsewhere."""

# Folders opened relative to one another: every call of the walk and the writes takes dir_fd=.
DIR_FD = (
    not PORTABLE
    and {
        os.open,
        os.stat,
        os.mkdir,
        os.rmdir,
        os.unlink,
        os.link,
        os.rename,
        os.readlink,
    }
    <= os.supports_dir_fd
    and os.scandir in os.supports_fd
)

UNNAMED_FILES = DIR_FD and _flag("O_TMPFILE") != 0 and os.path.isdir("/proc/self/fd")
"""Whether a file can be made in a folder with no name, and named once written (`open_unnamed_at`,
`name_unnamed_at`): Linux's ``O_TMPFILE``. Some file systems refuse it (see
`UNNAMED_REFUSED`)."""
UNNAMED_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
"""What opening an unnamed file raises where the file system or the kernel has none."""

DirRef = int | str
"""A folder: an open descriptor where the system has ``dir_fd=`` calls (`DIR_FD`), else its path."""


def _import(name: str) -> ModuleType | None:
    if PORTABLE:
        return None
    try:
        return __import__(name)
    except ImportError:
        return None


_fcntl = _import("fcntl")
_msvcrt = _import("msvcrt")
FILE_LOCKS = _fcntl is not None or _msvcrt is not None
"""Whether `try_lock` can lock at all here (a file system may still refuse: then ``None``)."""


# ---------------------------------------------------------------- positional reads and writes


class _PositionLocks:
    """One lock per file (device and inode), for the seek-then-read stand-ins. Per file, not
    per descriptor: a descriptor and its ``dup`` share one position. Costs an ``fstat`` per
    call; descriptors of one file take turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[tuple[int, int], threading.Lock] = {}

    def __call__(self, fd: int) -> threading.Lock:
        info = os.fstat(fd)
        file = (info.st_dev, info.st_ino)
        lock = self._locks.get(file)
        if lock is None:
            with self._lock:
                lock = self._locks.setdefault(file, threading.Lock())
        return lock


_position_lock = _PositionLocks()


# Each calls ``os.<name>`` at call time, so a test can stand in for it with monkeypatch.
if _optional(os, "pread"):

    def pread(fd: int, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (``os.pread``)."""
        return os.pread(fd, length, offset)

else:

    def pread(fd: int, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset``: a seek and a read, one at a time per handle."""
        with _position_lock(fd):
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, length)


if _optional(os, "preadv"):

    def read_into(fd: int, buffer: memoryview | bytearray, offset: int, flags: int = 0) -> int:
        """Fill ``buffer`` from ``offset`` in one call; how many bytes came (``os.preadv``)."""
        return os.preadv(fd, [buffer], offset, flags)

else:

    def read_into(fd: int, buffer: memoryview | bytearray, offset: int, flags: int = 0) -> int:
        """Fill ``buffer`` from ``offset``: a seek and a ``readinto`` (no copy), one at a time
        per handle. ``flags`` must be 0: no ``RWF_*`` flag exists here."""
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no preadv flags on this system")
        with _position_lock(fd), io.FileIO(fd, "r", closefd=False) as file:
            os.lseek(fd, offset, os.SEEK_SET)
            return file.readinto(buffer) or 0


if _optional(os, "pwrite"):

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; how many bytes went (``os.pwrite``)."""
        return os.pwrite(fd, data, offset)

else:

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``: a seek and a write, one at a time per handle."""
        with _position_lock(fd):
            os.lseek(fd, offset, os.SEEK_SET)
            return os.write(fd, data)


def fchmod(fd: int, path: str | os.PathLike[str], mode: int) -> None:
    """Set the permission bits of the open file ``fd``, by ``path`` where there is no fchmod."""
    if _optional(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


# ---------------------------------------------------------------- file locks


def try_lock(fd: int, *, shared: bool = False) -> bool | None:
    """Take a lock on the open file ``fd`` without waiting, exclusive or ``shared``: ``True``
    if taken, ``False`` if another holds it, ``None`` if this system or file system has no such
    locks (``msvcrt`` has no shared ones). The lock goes with the descriptor: closing it lets go."""
    if _fcntl is not None:
        try:
            _fcntl.flock(fd, (_fcntl.LOCK_SH if shared else _fcntl.LOCK_EX) | _fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return None  # no locks on this file system (some network ones)
        return True
    if _msvcrt is not None and not shared:
        # A lock on the first byte (it may lie past the end). Windows' locks are mandatory: the
        # holder's own descriptor still writes there, other handles cannot.
        position = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            _msvcrt.locking(fd, _msvcrt.LK_NBLCK, 1)
        except OSError as error:
            return False if error.errno in (errno.EACCES, errno.EDEADLK) else None
        finally:
            os.lseek(fd, position, os.SEEK_SET)
        return True
    return None


# ---------------------------------------------------------------- replacing a file

OPEN_FILES_MOVE = os.name != "nt" and not PORTABLE
"""Whether a file that is open can be renamed, replaced or removed. No call tells, so this one
is named by system: Windows refuses (a file opened without ``FILE_SHARE_DELETE``, as Python's
``open`` and ``os.open`` do), every POSIX system allows it. Where it cannot, a writer closes its
file before moving it."""

# A file open in another program cannot be replaced on Windows; it is usually closed within
# milliseconds (a reader of one chunk), so a few tries over ~0.3 s ride it out.
REPLACE_TRIES = 6
REPLACE_FIRST_WAIT = 0.01
# The call itself; a module attribute so tests can stand in for Windows.
_os_replace: Callable[[str, str], None] = os.replace


def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """``os.replace``. Where open files cannot move (`OPEN_FILES_MOVE`: Windows), retried while
    the target is held open elsewhere, then a ``PermissionError`` that names the cause; on
    Linux and macOS a ``PermissionError`` is never transient, so it is raised at once, as is."""
    tries = 1 if OPEN_FILES_MOVE else REPLACE_TRIES
    wait = REPLACE_FIRST_WAIT
    for attempt in range(tries):
        try:
            _os_replace(os.fspath(source), os.fspath(target))
        except PermissionError as error:
            if OPEN_FILES_MOVE:
                raise
            if attempt == tries - 1:
                raise PermissionError(
                    error.errno,
                    f"cannot replace {os.fspath(target)!r}: permission denied, or another "
                    f"program holds it open; tried {tries} times",
                    os.fspath(target),
                ) from error
        else:
            return
        time.sleep(wait)
        wait *= 2


# ---------------------------------------------------------------- calls within a folder


def _join(folder: DirRef, name: str) -> str:
    assert isinstance(folder, str)
    return os.path.join(folder, name)


def close_dir(folder: DirRef) -> None:
    if isinstance(folder, int):
        os.close(folder)


def dup_dir(folder: DirRef) -> DirRef:
    return os.dup(folder) if isinstance(folder, int) else folder


def stat_dir(folder: DirRef) -> os.stat_result:
    return os.fstat(folder) if isinstance(folder, int) else os.stat(folder)


def list_folder(folder: DirRef) -> list[os.DirEntry[str]]:
    """The entries of ``folder``. A folder removed since it was opened has none: by handle,
    the kernel says so; by path, the removal is caught here, to answer the same."""
    try:
        with os.scandir(folder) as listing:
            return list(listing)
    except (FileNotFoundError, NotADirectoryError):
        if isinstance(folder, int):
            raise
        return []


def lstat_at(name: str, folder: DirRef) -> os.stat_result:
    """The status of ``name`` in ``folder``, a link itself rather than what it points to."""
    if isinstance(folder, int):
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    return os.lstat(_join(folder, name))


def unlink_at(name: str, folder: DirRef) -> None:
    if isinstance(folder, int):
        os.unlink(name, dir_fd=folder)
    else:
        os.unlink(_join(folder, name))


def rmdir_at(name: str, folder: DirRef) -> None:
    if isinstance(folder, int):
        os.rmdir(name, dir_fd=folder)
    else:
        os.rmdir(_join(folder, name))


def mkdir_at(name: str, folder: DirRef) -> None:
    if isinstance(folder, int):
        os.mkdir(name, dir_fd=folder)
    else:
        os.mkdir(_join(folder, name))


def _refuse_link(path: str) -> os.stat_result:
    """What ``O_NOFOLLOW`` says of a link, for the path calls (checked, then opened: a link
    swapped in between is followed)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    return info


def open_at(name: str, flags: int, folder: DirRef, mode: int = 0o777) -> int:
    """Open ``name`` in ``folder``, never through a link (``O_NOFOLLOW``): a link raises
    ``OSError(ELOOP)``."""
    if isinstance(folder, int):
        return os.open(name, flags | O_NOFOLLOW, mode, dir_fd=folder)
    path = _join(folder, name)
    if not (flags & os.O_CREAT and flags & os.O_EXCL):  # O_EXCL never follows a link
        _refuse_link(path)
    return os.open(path, flags | O_NOFOLLOW | O_BINARY, mode)


def open_folder_at(name: str, folder: DirRef, *, listable: bool = False) -> DirRef:
    """The folder ``name`` in ``folder``, never through a link (``OSError(ELOOP)``), or
    ``NotADirectoryError``; ``listable``: one that scandir can list."""
    if isinstance(folder, int):
        return os.open(name, (LISTABLE if listable else DIRECTORY) | O_NOFOLLOW, dir_fd=folder)
    path = _join(folder, name)
    if not stat.S_ISDIR(_refuse_link(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return path


def link_at(source: str, source_folder: DirRef, target: str, target_folder: DirRef) -> None:
    """A hard link ``target`` to ``source`` (a file, never followed); fails if ``target`` exists."""
    if isinstance(source_folder, int) and isinstance(target_folder, int):
        os.link(
            source,
            target,
            src_dir_fd=source_folder,
            dst_dir_fd=target_folder,
            follow_symlinks=False,
        )
    else:
        os.link(_join(source_folder, source), _join(target_folder, target))


def open_unnamed_at(folder: int, mode: int = 0o666) -> int:
    """A new file with no name in ``folder``, open for writing (`UNNAMED_FILES`). Nothing of it
    outlives its descriptor unless `name_unnamed_at` names it."""
    return os.open(".", os.O_WRONLY | _flag("O_TMPFILE") | O_CLOEXEC, mode, dir_fd=folder)


def name_unnamed_at(fd: int, target: str, target_folder: int) -> None:
    """Name the unnamed file ``fd`` ``target`` in ``target_folder`` (on its file system);
    ``FileExistsError`` if that name is taken, never replaced. Through ``/proc``: naming the
    descriptor itself (``AT_EMPTY_PATH``) needs a privilege."""
    os.link(f"/proc/self/fd/{fd}", target, dst_dir_fd=target_folder, follow_symlinks=True)


def replace_at(source: str, source_folder: DirRef, target: str, target_folder: DirRef) -> None:
    if isinstance(source_folder, int) and isinstance(target_folder, int):
        os.replace(source, target, src_dir_fd=source_folder, dst_dir_fd=target_folder)
    else:
        replace(_join(source_folder, source), _join(target_folder, target))
