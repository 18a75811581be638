"""Opening a path beneath a root folder, never through a symbolic link that leads out of it.

A key is checked as a string (`._keys`), but a folder or file in the root can be a symbolic link
planted by whoever else writes there, and a link can point anywhere. `open_beneath` resolves a
path relative to a root folder's file descriptor the way the kernel would, except that it refuses
(`LeavesRoot`) any resolution that would leave the root: a link whose target is absolute, or
whose ``..`` climbs above the root. A relative link that stays inside the root is followed, as
zarr follows links; absolute links are refused even when they happen to point inside the root
(they name the place by a path that stops being right when the folder moves).

On Linux >= 5.6 the kernel does this in one call, ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS)`` (reached through ``syscall``, as Python has no wrapper), which is also
safe against a folder being swapped for a link while we resolve. Elsewhere, a walk opens one
component at a time with ``O_NOFOLLOW`` relative to the directory before it, reading links itself
(as safe against swaps, since each step holds the directory it came from). Measured here, the
blocking part of a read of a 4 KiB file at ``c/0/<n>`` (open, fstat, pread, close): by path 3.2 µs,
opening the root and then ``openat2`` 4.2 µs (the call, through ctypes, ~1.1 µs against ~0.9 µs for
``os.open``), opening the root and then the walk 5.7 µs.

Where the system has no folder handles (Windows: no ``dir_fd=``, no ``O_NOFOLLOW``; see
`._oscalls`), the root is its resolved path and the same walk runs on paths, ``lstat`` and
``readlink``: a link that leads out of the root is still refused, but the guarantee is weaker.
Each step checks a name and then uses its path, so a folder of the root swapped for a link to
elsewhere between the check and the use (by someone racing the store on purpose) is followed.
Only the handle-based resolution closes that window.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from zarr_anyio._core.fork import at_fork_in_child

from ._oscalls import DIR_FD, DIRECTORY, LISTABLE, O_BINARY, O_PATH, PORTABLE, DirRef

__all__ = [
    "DIRECTORY",
    "O_PATH",
    "LeavesRoot",
    "cached_lookups_available",
    "open_beneath",
    "open_cached",
    "open_folder",
    "open_root",
    "openat2_available",
    "stat_beneath",
]

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_RESOLVE_CACHED = 0x20
_BENEATH = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS
_AT_FDCWD = -100
# One number on every Linux architecture since 5.1 unified new system calls (alpha aside).
_SYS_OPENAT2 = 437
# As the kernel: more links than this in one resolution is a loop.
_MAX_LINKS = 40


class LeavesRoot(PermissionError):
    """The path resolves, through a symbolic link, to somewhere outside the root."""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def _load_syscall() -> Callable[..., int] | None:
    # The platform is named here, not detected: the call's number is Linux's own (another
    # system's ``syscall`` would run something else under it).
    if sys.platform != "linux" or PORTABLE or not DIR_FD:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    # No argtypes: ctypes converting each argument costs ~0.3 µs of the ~1.1 µs of a call, so the
    # arguments are passed as ready C values (the number and size as longs, the path as char *,
    # the descriptor as an int, as the kernel reads it).
    function.restype = ctypes.c_long
    syscall: Callable[..., int] = function
    return syscall


_syscall = _load_syscall()
_NUMBER = ctypes.c_long(_SYS_OPENAT2)
_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
# One ``open_how`` per flags and resolve flags, made once: (the structure, a pointer to it).
_hows: dict[tuple[int, int], tuple[_OpenHow, Any]] = {}
# None until the first call tells whether the kernel (and any seccomp filter) allows openat2,
# and whether it can refuse to wait for a lookup (RESOLVE_CACHED, Linux >= 5.12).
_openat2_works: bool | None = None if _syscall is not None else False
_cached_works: bool | None = None if _syscall is not None else False
_probe_lock = threading.Lock()


def _renew_probe_lock() -> None:
    global _probe_lock
    _probe_lock = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_probe_lock)


def openat2_available() -> bool:
    """Whether this kernel resolves paths beneath a root itself (else the walk is used)."""
    global _openat2_works
    if _openat2_works is None:
        with _probe_lock:
            if _openat2_works is None:
                root_fd = os.open("/", DIRECTORY)
                try:
                    os.close(_openat2(root_fd, ".", DIRECTORY))
                    _openat2_works = True
                except OSError:
                    # ENOSYS on kernels before 5.6; EPERM where a seccomp filter refuses calls
                    # it does not know.
                    _openat2_works = False
                finally:
                    os.close(root_fd)
    return _openat2_works


def cached_lookups_available() -> bool:
    """Whether `open_cached` can work here (``openat2`` with ``RESOLVE_CACHED``)."""
    global _cached_works
    if _cached_works is None:
        works = openat2_available()
        if works:
            try:
                # Twice: the first call may find "/" not yet looked up (EAGAIN).
                for _ in range(2):
                    fd = _call(_AT_FDCWD, b"/", DIRECTORY, _RESOLVE_CACHED)
                    if fd >= 0:
                        os.close(fd)
                works = fd >= 0
            except OSError:
                works = False
        _cached_works = works
    return _cached_works


def _call(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    """The system call itself: the new descriptor, or minus the error number."""
    assert _syscall is not None
    how = _hows.get((flags, resolve))
    if how is None:
        structure = _OpenHow(flags, 0, resolve)
        how = _hows[flags, resolve] = (structure, ctypes.byref(structure))
    fd = _syscall(_NUMBER, dir_fd, path, how[1], _SIZE)
    return fd if fd >= 0 else -ctypes.get_errno()


def open_cached(root: str, key: str, flags: int) -> int | None:
    """``key`` opened beneath the folder ``root`` (as `open_beneath`), if that needs no disk
    access: every name is in the kernel's lookup cache. ``None`` if some name is not (or this
    kernel cannot tell, see `cached_lookups_available`)."""
    if not (openat2_available() and cached_lookups_available()):
        return None
    flags |= os.O_CLOEXEC
    root_fd = _call(_AT_FDCWD, os.fsencode(root), DIRECTORY, _RESOLVE_CACHED)
    if root_fd < 0:
        if root_fd == -errno.EAGAIN:
            return None
        raise OSError(-root_fd, os.strerror(-root_fd), root)
    try:
        fd = _call(root_fd, os.fsencode(key), flags, _BENEATH | _RESOLVE_CACHED)
    finally:
        os.close(root_fd)
    if fd >= 0:
        return fd
    if fd == -errno.EAGAIN:
        return None
    _raise(-fd, key)


def _openat2(dir_fd: int, path: str, flags: int) -> int:
    encoded = os.fsencode(path)
    # EAGAIN: a rename elsewhere raced with the resolution; the kernel asks us to retry.
    for _ in range(8):
        fd = _call(dir_fd, encoded, flags, _BENEATH)
        if fd >= 0:
            return fd
        if fd != -errno.EAGAIN:
            break
    _raise(-fd, path)


def _raise(code: int, path: str) -> NoReturn:
    if code == errno.EXDEV:
        raise LeavesRoot(errno.EPERM, "leads out of the store's root through a symbolic link", path)
    raise OSError(code, os.strerror(code), path)


def open_root(root: str) -> DirRef:
    """A handle on the root folder itself (its own path may go through links: it is the
    caller's choice); `FileNotFoundError` or `NotADirectoryError` if it is not a folder.
    Without folder handles: its resolved path."""
    if DIR_FD:
        return os.open(root, DIRECTORY)
    real = os.path.realpath(root)
    if not stat.S_ISDIR(os.stat(real).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), root)
    return real


def open_folder(root: DirRef, path: str, *, listable: bool = False) -> DirRef:
    """The folder ``path`` beneath the root (``""``: the root), as `open_beneath` resolves it;
    ``listable``: one that scandir can list."""
    if isinstance(root, int):
        return open_beneath(root, path or ".", LISTABLE if listable else DIRECTORY)
    real, info = _walk_path(root, path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return real


def stat_beneath(root: DirRef, path: str) -> os.stat_result:
    """The status of what ``path`` names beneath the root, links followed as `open_beneath`
    follows them."""
    if isinstance(root, int):
        fd = open_beneath(root, path, O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    return _walk_path(root, path)[1]


def open_beneath(root_fd: DirRef, path: str, flags: int) -> int:
    """``os.open(path, flags)`` relative to the folder ``root_fd``, never leaving it.

    ``path`` is relative and ``/``-separated; a final link is followed like any other unless
    ``flags`` has ``O_NOFOLLOW``. Raises `LeavesRoot` where a link leads out of the root, and the
    errors ``open`` raises otherwise (``ELOOP`` for a loop of links).
    """
    if flags & os.O_CREAT:
        raise ValueError("open_beneath opens existing names; create them with a *at call")
    if isinstance(root_fd, str):
        real, info = _walk_path(root_fd, path)
        # Only regular files are opened by path: Windows opens no folder, and without
        # O_NONBLOCK a FIFO would wait for a writer.
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), path)
        return os.open(real, flags | O_BINARY)
    if _openat2_works or (_openat2_works is None and openat2_available()):
        return _openat2(root_fd, path, flags | os.O_CLOEXEC)
    return _walk(root_fd, path, flags | os.O_CLOEXEC)


def _walk(root_fd: int, path: str, flags: int) -> int:
    # Components still to resolve, the next one last; and the folders resolved so far, the root
    # first, so that ".." (from a link's target) goes back one of them and never above the root.
    pending = path.split("/")[::-1]
    folders = [root_fd]
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(folders) == 1:
                    raise LeavesRoot(
                        errno.EPERM, "leads out of the store's root through a symbolic link", path
                    )
                os.close(folders.pop())
                continue
            final = not pending
            try:
                if final:
                    fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=folders[-1])
                    if flags & os.O_NOFOLLOW or not (flags & O_PATH and _is_link(fd)):
                        return fd
                    os.close(fd)  # O_PATH | O_NOFOLLOW opens a link itself: read it below
                else:
                    folders.append(os.open(name, DIRECTORY | os.O_NOFOLLOW, dir_fd=folders[-1]))
                    continue
            except OSError as error:
                # A link met with O_NOFOLLOW fails with ELOOP (ENOTDIR where a folder is wanted).
                if error.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
                if final and flags & os.O_NOFOLLOW:
                    raise  # the caller asked not to follow a final link
                if not _is_link_at(folders[-1], name):
                    raise
            target = os.readlink(name, dir_fd=folders[-1])
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            if target.startswith("/"):
                raise LeavesRoot(
                    errno.EPERM, "leads out of the store's root through a symbolic link", path
                )
            pending.extend(target.split("/")[::-1])
        # The path ended on a folder reached through "." or ".." (a link's target): open it.
        return os.open(".", flags, dir_fd=folders[-1])
    finally:
        for fd in folders[1:]:
            os.close(fd)


def _is_link(fd: int) -> bool:
    return stat.S_ISLNK(os.fstat(fd).st_mode)


def _is_link_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _split(path: str) -> list[str]:
    """The names of a relative path or a link's target (``\\`` separates them on Windows)."""
    return path.replace(os.sep, "/").split("/")


def _walk_path(root: str, path: str) -> tuple[str, os.stat_result]:
    """`_walk` on paths, for systems without folder handles: the resolved path of ``path``
    beneath ``root`` (itself resolved) and its status, links followed while they stay inside.
    Refuses what `_walk` refuses; see the module docstring for the race it cannot close."""
    pending = path.split("/")[::-1]
    folders = [root]
    info: os.stat_result | None = None  # of folders[-1], once known
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if len(folders) == 1:
                raise LeavesRoot(
                    errno.EPERM, "leads out of the store's root through a symbolic link", path
                )
            folders.pop()
            info = None
            continue
        here = os.path.join(folders[-1], name)
        info = os.lstat(here)
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(here)
            # Absolute, on a drive ("C:x"), or from the top of the current drive ("\\x").
            if os.path.isabs(target) or os.path.splitdrive(target)[0] or target[:1] in ("/", "\\"):
                raise LeavesRoot(
                    errno.EPERM, "leads out of the store's root through a symbolic link", path
                )
            pending.extend(_split(target)[::-1])
            continue
        if stat.S_ISDIR(info.st_mode):
            folders.append(here)
        elif pending:
            # A file where the path goes on: as the kernel says it.
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        else:
            return here, info
    return folders[-1], os.stat(folders[-1]) if info is None else info
