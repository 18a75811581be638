"""The blocking file-system calls behind `LocalStore`, each made in a worker thread (or, for a
read whose names and bytes are all cached, on the event loop).

Each takes the root's path and a key already validated (`._keys`), and opens every path beneath
a handle on the root (`._beneath`), so no key and no link planted in the root leads out of it.
Where the system has no folder handles (Windows), a folder is its resolved path instead
(`._oscalls.DirRef`) and the same calls go by path, with the weaker guarantee `._beneath` states.
Writes go through a temporary file renamed into place. Why each works as it does, with what it
costs, is in the store's module docstring (`._local`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from zarr.abc.store import ByteRequest

from zarr_anyio._core.fork import at_fork_in_child
from zarr_anyio._core.threads import CheckCancelled

from . import _buffers, _oscalls
from ._base import NOT_READY, Pending
from ._beneath import LeavesRoot, open_beneath, open_cached, open_folder, open_root, stat_beneath
from ._conflicts import FolderIsAKey, KeyConflict, KeyIsAFolder, conflict
from ._fileio import read_exact
from ._keys import byte_range_slice
from ._oscalls import (
    O_CLOEXEC,
    O_NOCTTY,
    O_NONBLOCK,
    DirRef,
    lstat_at,
    open_at,
    open_folder_at,
    try_lock,
    unlink_at,
)
from ._scatter import fill_from, read_scattered

__all__ = [
    "ON_LOOP_READ",
    "RWF_NOWAIT",
    "STALE_AFTER",
    "TEMP_FOLDER",
    "TEMP_PREFIX",
    "Folder",
    "FolderIsAKey",
    "KeyConflict",
    "KeyIsAFolder",
    "NoWaitUnsupported",
    "Staged",
    "check_root",
    "delete_file",
    "delete_tree",
    "is_file",
    "list_dir",
    "list_prefix",
    "move_root",
    "no_cancel_check",
    "prepare_root",
    "read_cached",
    "read_file",
    "read_part",
    "scan_folder",
    "size_of",
    "write_file",
    "write_files",
]

# Every name of the library's own files holds this, which no key may hold (`._keys`): no key can
# collide with them, and a name that holds it is never a key.
OURS = "\\"
# The folder of temporary files of writes in progress, in the root.
TEMP_FOLDER = ".zarr_anyio\\tmp"
# Temporary files are named this and 16 random hex digits: 28 bytes, whatever the key.
TEMP_PREFIX = ".zarr_anyio\\"
# Reads of at most this many bytes are made on the event loop when that cannot block (see
# `read_cached`); larger ones are copies worth a thread (and a core) of their own.
ON_LOOP_READ = 64 << 10
RWF_NOWAIT = _oscalls.RWF_NOWAIT
# Reads of at least this many bytes go into a reused buffer (see `._buffers`); smaller ones come
# from the allocator's heap, which costs no page faults.
POOLED_READ = 128 << 10
# A write checks for cancellation between pieces of this size.
WRITE_PIECE = 1 << 20
# Where the file system cannot lock files: a temporary file untouched this long (a write touches
# it with every piece) is taken as left by a writer that died.
STALE_AFTER = 3600.0
# The blocking write of one piece; a module attribute so tests can stand in for the disk.
_write_piece: Callable[[int, memoryview], int] = os.write
# The same for the rename and the copies that move a root, and the removal of one file of a tree.
_rename: Callable[[Path, Path], None] = os.rename
_copy_file: Callable[[str, str], object] = shutil.copy2


def _unlink_at(name: str, dir_fd: DirRef) -> None:
    unlink_at(name, dir_fd)


# Opening a file to read it: O_NONBLOCK, as opening a FIFO for reading would wait for a writer.
_READING = os.O_RDONLY | O_NONBLOCK | O_NOCTTY
# Reading a name that is absent, not a folder where one is needed, or leads out of the root.
_ABSENT = (FileNotFoundError, NotADirectoryError, LeavesRoot)


def no_cancel_check() -> None:
    """Used by the sync surface, which has no host task to be cancelled."""


_Handle = TypeVar("_Handle", int, DirRef)


@contextlib.contextmanager
def _opened(fd: _Handle) -> Iterator[_Handle]:
    """Close a file's or a folder's handle on the way out (a folder named by its path has none)."""
    try:
        yield fd
    finally:
        _oscalls.close_dir(fd)


def _no_file_there(error: OSError) -> bool:
    """Whether opening a key failed because it names no regular file in the root: a loop of
    links, a socket (ENXIO), a device without a driver."""
    return error.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV)


def _conflict(root: str, key: str, other: str | None, *, below: bool) -> KeyConflict:
    return conflict(f"the LocalStore at {root}", key, other, below=below)


def _where(error: OSError, doing: str, root: str, key: str) -> OSError:
    """``error`` of a write or delete, saying which store and which key (the file system's
    error names a path relative to some folder, or a temporary file of ours)."""
    if isinstance(error, KeyConflict):
        return error
    what = error.strerror or str(error)
    message = f"{what}: cannot {doing} key {key!r} in the LocalStore at {root}"
    try:
        said = type(error)(error.errno, message) if error.errno else type(error)(message)
    except TypeError:  # an OSError subclass that takes other arguments: leave it as it is
        return error
    return said


# ---------------------------------------------------------------- reads (in threads)


def read_file(
    root: str, key: str, byte_range: ByteRequest | None, into: memoryview | None = None
) -> int | bytes | memoryview | None:
    """The bytes of ``key`` (or the part ``byte_range`` asks for); ``None`` if it names no file.

    With ``into`` (a whole value, no range): when the file is exactly that long it is read
    straight into ``into`` and its length is given, one ``preadv`` into the caller's memory with
    no buffer between (see `BlockingStore._read_into_blocking`); a file of another length is
    given as bytes."""
    return _read_value(open_value(root, key), byte_range, into)


def _read_value(
    opened: tuple[int, os.stat_result] | None,
    byte_range: ByteRequest | None,
    into: memoryview | None = None,
) -> int | bytes | memoryview | None:
    """`read_file` of a value already opened (`open_value`, `open_value_at`); the descriptor
    is closed."""
    if opened is None:
        return None
    fd, info = opened
    try:
        if into is not None:
            if info.st_size != len(into):
                return read_exact(fd, info.st_size, 0)
            done = _read_into(fd, into, 0)
            # The file shrank under us: what it held is not a whole value of that length.
            return len(into) if len(done) == len(into) else bytes(done)
        wanted = byte_range_slice(byte_range, info.st_size)
        if wanted.stop - wanted.start >= POOLED_READ:
            return _read_into(fd, _buffers.take(wanted.stop - wanted.start), wanted.start)
        return read_exact(fd, wanted.stop - wanted.start, wanted.start)
    finally:
        os.close(fd)


def read_files(
    root: str, requests: Iterable[tuple[str, np.ndarray[Any, Any] | None]]
) -> Generator[int | bytes | memoryview | None, None, None]:
    """For each ``(key, into)``: `read_file`'s answer for the whole value of ``key``
    (``into`` ``None``), or `read_file_into_array`'s (``into`` an array); the root opened once
    for them all, not once a key (two system calls a key fewer: a tenth of a 4 KiB chunk's read).
    """
    try:
        root_fd: DirRef | None = open_root(root)
    except _ABSENT:
        root_fd = None
    try:
        for key, into in requests:
            if root_fd is None:
                yield None
            elif into is None:
                yield _read_value(open_value_at(root_fd, key), None)
            else:
                yield _read_into_array(root_fd, key, into)
    finally:
        if root_fd is not None:
            _oscalls.close_dir(root_fd)


def read_file_into_array(
    root: str, key: str, into: np.ndarray[Any, Any]
) -> int | bytes | memoryview | None:
    """`read_file` with ``into`` an array of any strides (a raw chunk's place in the result):
    a file of exactly ``into.nbytes`` is read into it in C order and its length given, straight
    into its runs where the system can (`._scatter`), else through a buffer and a copy; a file
    of another length is given as bytes, ``None`` if there is none."""
    reads = read_files(root, [(key, into)])
    try:
        return next(reads)
    finally:
        reads.close()


def _read_into_array(
    root_fd: DirRef, key: str, into: np.ndarray[Any, Any]
) -> int | bytes | memoryview | None:
    if into.flags.c_contiguous:
        return _read_value(open_value_at(root_fd, key), None, into.reshape(-1).view(np.uint8).data)
    opened = open_value_at(root_fd, key)
    if opened is None:
        return None
    fd, info = opened
    try:
        if info.st_size != into.nbytes:
            return read_exact(fd, info.st_size, 0)
        if read_scattered is not None and (done := read_scattered(fd, into, 0)) is not None:
            # Fewer: the file shrank under us, and what it held is not a whole value of that
            # length: give what is there now, as bytes.
            return done if done == into.nbytes else read_exact(fd, os.fstat(fd).st_size, 0)
        return fill_from(into, _read_into(fd, _buffers.take(info.st_size), 0))
    finally:
        os.close(fd)


def open_value(root: str, key: str) -> tuple[int, os.stat_result] | None:
    """A descriptor open for reading on the file of ``key``, and its status; ``None`` if it
    names no file.

    A value read in parts through one descriptor is the one file it opened: a writer that puts
    a new value in place (a rename, as every writer here and zarr's own do) replaces the name,
    not the bytes read from here, so the parts cannot mix an old value and a new one."""
    try:
        root_fd = open_root(root)
    except _ABSENT:
        return None
    try:
        return open_value_at(root_fd, key)
    finally:
        _oscalls.close_dir(root_fd)


def open_value_at(root_fd: DirRef, key: str) -> tuple[int, os.stat_result] | None:
    """`open_value` beneath a root already open."""
    try:
        fd = open_beneath(root_fd, key, _READING)
    except (*_ABSENT, IsADirectoryError):
        return None
    except OSError as error:
        if _no_file_there(error):
            return None
        raise
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return fd, info


def read_part(fd: int, length: int, offset: int) -> memoryview:
    """``length`` bytes at ``offset`` (fewer only if the file ends first) in a slot of the read
    pool: a part of a value copied in parts, held once (see `._pieces`)."""
    return _read_into(fd, _buffers.take(length), offset)


def _read_into(fd: int, buffer: memoryview, offset: int) -> memoryview:
    """Fill ``buffer`` from ``offset``: the bytes land where zarr will use them, no copy after."""
    done = _oscalls.read_into(fd, buffer, offset)
    while done < len(buffer):
        more = _oscalls.read_into(fd, buffer[done:], offset + done)
        if not more:
            return buffer[:done]  # the file shrank under us
        done += more
    return buffer


class NoWaitUnsupported(Exception):
    """This file system cannot read without waiting (``RWF_NOWAIT``: EOPNOTSUPP, as tmpfs)."""


def read_cached(
    root: str, key: str, byte_range: ByteRequest | None
) -> bytes | memoryview | Pending | None:
    """A small read made without waiting: every name of the path in the kernel's lookup cache
    (``RESOLVE_CACHED``) and every byte in the page cache (``RWF_NOWAIT``), else `NOT_READY`."""
    try:
        fd = open_cached(root, key, _READING)
    except (*_ABSENT, IsADirectoryError):
        return None
    except OSError as error:
        if _no_file_there(error):
            return None
        raise
    if fd is None:
        return NOT_READY
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        wanted = byte_range_slice(byte_range, info.st_size)
        length = wanted.stop - wanted.start
        if length > ON_LOOP_READ or RWF_NOWAIT is None:
            return NOT_READY
        buffer = bytearray(length)
        try:
            done = _oscalls.read_into(fd, buffer, wanted.start, RWF_NOWAIT)
        except BlockingIOError:
            return NOT_READY  # not all in the page cache
        except OSError as error:
            if error.errno == errno.EOPNOTSUPP:
                raise NoWaitUnsupported from None
            raise
        # Fewer bytes: some were not cached, or the file shrank; a thread sorts it out.
        return memoryview(buffer) if done == length else NOT_READY
    finally:
        os.close(fd)


def _stat_key(root: str, key: str) -> os.stat_result | None:
    """The status of the regular file ``key`` names, or ``None`` if it names no regular file."""
    try:
        with _opened(open_root(root)) as root_fd:
            info = stat_beneath(root_fd, key)
    except _ABSENT:
        return None
    except OSError as error:
        if _no_file_there(error):
            return None
        raise
    return info if stat.S_ISREG(info.st_mode) else None


def is_file(root: str, key: str) -> bool:
    return _stat_key(root, key) is not None


def size_of(root: str, key: str) -> int:
    info = _stat_key(root, key)
    if info is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), key)
    return info.st_size


# ---------------------------------------------------------------- listing (in threads)


def _resolve(root_fd: DirRef, key: str) -> os.stat_result | None:
    """The status of what ``key`` names, following links beneath the root; ``None`` if it is
    absent or out of the root."""
    try:
        return stat_beneath(root_fd, key)
    except OSError:
        return None


def _open_listable(root_fd: DirRef, folder: str) -> DirRef | None:
    try:
        return open_folder(root_fd, folder, listable=True)
    except OSError:
        return None


def _key_path(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _key_under(root_fd: DirRef, folder: str) -> str | None:
    """A key under the folder ``folder`` (a key, no trailing ``/``), the first found, or
    ``None`` if it holds none: a folder emptied of keys is as if it were not there. Stops at
    the first key (one ``scandir`` per level for a folder of keys); links are followed within
    the root, once each."""
    pending, seen = [folder], set()
    while pending:
        here = pending.pop()
        dir_fd = _open_listable(root_fd, here)
        if dir_fd is None:
            continue
        with _opened(dir_fd):
            try:
                info = _oscalls.stat_dir(dir_fd)
            except FileNotFoundError:
                continue  # removed since it was found (a folder named by path)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            for entry in _oscalls.list_folder(dir_fd):
                if OURS in entry.name:
                    continue
                key = _key_path(here, entry.name)
                if entry.is_symlink():
                    mode = getattr(_resolve(root_fd, key), "st_mode", 0)
                    if stat.S_ISREG(mode):
                        return key
                    if stat.S_ISDIR(mode):
                        pending.append(key)
                elif entry.is_file(follow_symlinks=False):
                    return key
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(key)
    return None


Folder = tuple[str, frozenset[tuple[int, int]]]
"""A folder still to list: its key prefix (``""`` or ending in ``/``) and the folders above it."""


def scan_folder(
    root: str, folder: Folder, stem: str = ""
) -> tuple[list[tuple[str, int]], list[Folder]]:
    """One folder of the store: its keys (names starting with ``stem``) with their sizes, and the
    folders in it to list next. Blocking: one call per folder, so that a walk pages.

    Names resolve beneath the root: a link is followed where it stays inside (to a file: a key;
    to a folder: listed, unless it is one of the folders above, a loop), and left out where it
    leads out; FIFOs and the like are no keys; names holding a backslash are the library's own.
    """
    key_prefix, above = folder
    files: list[tuple[str, int]] = []
    folders: list[Folder] = []
    try:
        root_fd = open_root(root)
    except _ABSENT:
        return files, folders
    with _opened(root_fd):
        dir_fd = _open_listable(root_fd, key_prefix.rstrip("/"))
        if dir_fd is None:
            return files, folders
        with _opened(dir_fd):
            try:
                info = _oscalls.stat_dir(dir_fd)
            except FileNotFoundError:
                return files, folders  # removed since it was found (a folder named by path)
            here = (info.st_dev, info.st_ino)
            if here in above:
                return files, folders  # a link back to a folder above: listed there already
            inside = above | {here}
            entries = [
                e
                for e in _oscalls.list_folder(dir_fd)
                if e.name.startswith(stem) and OURS not in e.name
            ]
            for entry in entries:
                key = f"{key_prefix}{entry.name}"
                if entry.is_symlink():
                    target = _resolve(root_fd, key)
                    mode = 0 if target is None else target.st_mode
                    if stat.S_ISREG(mode):
                        assert target is not None
                        files.append((key, target.st_size))
                    elif stat.S_ISDIR(mode):
                        folders.append((f"{key}/", inside))
                elif entry.is_file(follow_symlinks=False):
                    files.append((key, entry.stat(follow_symlinks=False).st_size))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append((f"{key}/", inside))
    return files, folders


def list_prefix(root: str, prefix: str) -> list[str]:
    """Keys that start with ``prefix`` as a string: ``"a/b"`` takes in ``"a/bc/0"`` too."""
    folder, _, stem = prefix.rpartition("/")
    keys: list[str] = []
    files, pending = scan_folder(root, (f"{folder}/" if folder else "", frozenset()), stem)
    while True:
        keys.extend(key for key, _ in files)
        if not pending:
            return keys
        files, more = scan_folder(root, pending.pop())
        pending.extend(more)


def list_dir(root: str, prefix: str) -> list[str]:
    """The names directly under ``prefix``: keys, and folders that resolve inside the root."""
    folder = prefix.rstrip("/")
    names: list[str] = []
    folders: list[str] = []
    try:
        root_fd = open_root(root)
    except _ABSENT:
        return names
    with _opened(root_fd):
        dir_fd = _open_listable(root_fd, folder)
        if dir_fd is None:
            return names
        with _opened(dir_fd):
            entries = _oscalls.list_folder(dir_fd)
            for entry in entries:
                if OURS in entry.name:
                    continue
                if entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.name)
                elif entry.is_symlink():
                    target = _resolve(root_fd, f"{prefix}{entry.name}")
                    mode = 0 if target is None else target.st_mode
                    if stat.S_ISREG(mode):
                        names.append(entry.name)
                    elif stat.S_ISDIR(mode):
                        folders.append(entry.name)
            # A folder that holds no key (emptied by deletes, or made by someone else) is not
            # named: a store with no key under a prefix behaves as if the folder were not
            # there, as MemoryStore and the object stores do.
            names.extend(
                name
                for name in folders
                if _file_in(dir_fd, name) or _key_under(root_fd, _key_path(folder, name))
            )
    return sorted(names)


def _file_in(dir_fd: DirRef, name: str) -> bool:
    """Whether the folder ``name`` in ``dir_fd`` (not a link) holds a regular file of its own:
    the quick answer for a folder of keys (one ``openat`` and ``scandir``, where resolving it
    from the root again cost 2-3 times as much); `_key_under` answers the rest."""
    try:
        fd = open_folder_at(name, dir_fd, listable=True)
    except OSError:
        return False
    with _opened(fd):
        return any(
            OURS not in entry.name and entry.is_file(follow_symlinks=False)
            for entry in _oscalls.list_folder(fd)
        )


# ---------------------------------------------------------------- writes (in threads)


def _make_folders(root_fd: DirRef, folder: str) -> DirRef:
    """A handle on ``folder`` beneath the root, made (with its parents) if missing."""
    if not folder:
        return _oscalls.dup_dir(root_fd)
    try:
        return open_folder(root_fd, folder)
    except FileNotFoundError:
        pass
    parts = folder.split("/")
    here = _oscalls.dup_dir(root_fd)
    try:
        for depth, name in enumerate(parts, start=1):
            with contextlib.suppress(FileExistsError):
                _oscalls.mkdir_at(name, here)
            # Resolved from the root again: a name that already existed may be a link.
            following = open_folder(root_fd, "/".join(parts[:depth]))
            _oscalls.close_dir(here)
            here = following
    except BaseException:
        _oscalls.close_dir(here)
        raise
    return here


class _TempFolders:
    """Counts this process's writes using each root's temporary folder, so that the last one
    out removes it (zarr's own LocalStore would list it otherwise) and none removes it under
    another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[tuple[int, int], int] = {}

    @contextlib.contextmanager
    def using(self, root_fd: DirRef) -> Iterator[None]:
        info = _oscalls.stat_dir(root_fd)
        root = (info.st_dev, info.st_ino)
        with self._lock:
            self._users[root] = self._users.get(root, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._users[root] -= 1
                if not self._users[root]:
                    del self._users[root]
                    _remove_temp_folder(root_fd)

    def remove_if_unused(self, root_fd: DirRef) -> None:
        info = _oscalls.stat_dir(root_fd)
        with self._lock:
            if (info.st_dev, info.st_ino) not in self._users:
                _remove_temp_folder(root_fd)


_temp_folders = _TempFolders()


def _forget_writes_in_flight() -> None:
    # Writes of the parent's other threads never end in a forked child: their counts would
    # keep the temporary folder for ever, and the lock may have been held by one of them.
    global _temp_folders
    _temp_folders = _TempFolders()


at_fork_in_child(_forget_writes_in_flight)


def _remove_temp_folder(root_fd: DirRef) -> None:
    # Not empty: another process is writing (or left files, removed on a later open).
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
        _oscalls.rmdir_at(TEMP_FOLDER, root_fd)


def _lock_temp(fd: int) -> bool:
    """Take the lock that tells cleaners this file is in use; ``False`` if a cleaner got it
    first (it is removing the file: make another)."""
    locked = try_lock(fd)
    if locked is None:
        return True  # no locks here: the age of the file decides instead
    if not locked:
        return False
    # A cleaner unlinks only while holding the lock: once we hold it, the name is ours.
    return os.fstat(fd).st_nlink > 0


def _create_temp(dir_fd: DirRef) -> tuple[str, int]:
    while True:
        name = f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC
        fd = open_at(name, flags, dir_fd, 0o666)
        if _lock_temp(fd):
            return name, fd
        os.close(fd)


def _name_temp(dir_fd: DirRef, unnamed: int) -> tuple[str, int]:
    """Name the unnamed file ``unnamed`` as a temporary file in ``dir_fd``, locked first: a
    cleaner finds it taken from the moment it has a name."""
    assert isinstance(dir_fd, int)
    try_lock(unnamed)
    while True:
        name = f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}"
        with contextlib.suppress(FileExistsError):
            _oscalls.name_unnamed_at(unnamed, name, dir_fd)
            return name, unnamed


def _create_temp_in_root(root_fd: DirRef, unnamed: int | None = None) -> tuple[DirRef, str, int]:
    """A new temporary file in the root's temporary folder: (folder, name, open file). Given
    an ``unnamed`` file (`_write_unnamed`), that file, named there."""
    for _ in range(_WRITE_TRIES):
        with contextlib.suppress(FileExistsError):
            _oscalls.mkdir_at(TEMP_FOLDER, root_fd)
        # Another process may remove the folder, empty, between our mkdir and our open, or
        # between our open and our file: either way, make it again.
        try:
            # A name in the root itself, not followed if a link: beneath the root by
            # construction.
            temp_dir = open_folder_at(TEMP_FOLDER, root_fd)
        except FileNotFoundError:
            continue
        try:
            if unnamed is not None:
                return (temp_dir, *_name_temp(temp_dir, unnamed))
            return (temp_dir, *_create_temp(temp_dir))
        except FileNotFoundError:
            _oscalls.close_dir(temp_dir)
        except BaseException:
            _oscalls.close_dir(temp_dir)
            raise
    raise FileNotFoundError(errno.ENOENT, "the temporary folder keeps vanishing", TEMP_FOLDER)


def _write_all(fd: int, value: memoryview, check_cancelled: CheckCancelled) -> None:
    written = 0
    while written < len(value):
        written += _write_piece(fd, value[written : written + WRITE_PIECE])
        check_cancelled()


def _write_through(
    temp_dir: DirRef,
    temp: str,
    fd: int,
    dir_fd: DirRef,
    name: str,
    value: memoryview,
    *,
    exclusive: bool,
    check_cancelled: CheckCancelled,
) -> None:
    """Fill the temporary file ``temp`` with ``value`` and move it into place.

    ``fd`` stays open, holding its lock, until the file is in place: a cleaner must never take
    a finished temporary file for an abandoned one. Except where a file that is open cannot be
    renamed nor removed (Windows, `_oscalls.OPEN_FILES_MOVE`): there it is closed just before it
    moves, and a cleaner that takes it in that instant makes the write fail (never tears it).
    """
    open_fd: int | None = fd
    try:
        try:
            _write_all(fd, value, check_cancelled)
            if not _oscalls.OPEN_FILES_MOVE:
                open_fd = None
                os.close(fd)
            if exclusive:
                # link, unlike rename, fails if the target exists: creation is atomic.
                with contextlib.suppress(FileExistsError):
                    _oscalls.link_at(temp, temp_dir, name, dir_fd)
                unlink_at(temp, temp_dir)
            else:
                _oscalls.replace_at(temp, temp_dir, name, dir_fd)
        finally:
            if open_fd is not None:
                os.close(open_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            unlink_at(temp, temp_dir)
        raise


def _write_unnamed(
    dir_fd: DirRef,
    name: str,
    value: memoryview,
    *,
    exclusive: bool,
    check_cancelled: CheckCancelled,
    temp_folder: Callable[[int], contextlib.AbstractContextManager[tuple[DirRef, str]]],
) -> bool:
    """Write ``value`` into a file with no name in the key's folder, then name it ``name``: the
    key appears whole or not at all, and a writer killed before naming it leaves nothing (the
    kernel frees a file no name refers to). Where ``name`` exists (not ``exclusive``), the file
    is named in a temporary folder (``temp_folder(fd)``: the folder and the name, until the
    move) and moved over it, as `_write_through` moves its own. ``False`` if there are no
    unnamed files here (nothing written).

    Three system calls fewer than a named temporary file (its random name, its lock and the
    check of it), and no folder that every writer's files share: two threads writing 1 MiB
    chunks spent 35% more time in the kernel going through one, held up on its lock and on
    finding free inodes where all the files were made."""
    if not _oscalls.UNNAMED_FILES or isinstance(dir_fd, str):
        return False
    try:
        fd = _oscalls.open_unnamed_at(dir_fd)
    except OSError as error:
        if error.errno in _oscalls.UNNAMED_REFUSED:
            return False
        if error.errno == errno.EPERM and _removed(dir_fd):
            # Linux's answer in a folder removed since it was opened, where a name made in it
            # gets ENOENT: the caller makes the folder again on ENOENT.
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name) from None
        raise
    with _opened(fd):
        _write_all(fd, value, check_cancelled)
        try:
            _oscalls.name_unnamed_at(fd, name, dir_fd)
        except FileExistsError:
            if exclusive:
                return True  # the first writer's value stands, as `_write_through`'s link
            with contextlib.ExitStack() as using:
                try:
                    temp_dir, temp = using.enter_context(temp_folder(fd))
                except OSError as error:
                    if error.errno != errno.EXDEV:
                        raise
                    # The key's folder is another file system than the root (a mount point
                    # inside it): the file is named beside the key, for the instant before it
                    # moves, rather than written again into a named file there.
                    temp_dir, temp = dir_fd, _name_temp(dir_fd, fd)[0]
                try:
                    _oscalls.replace_at(temp, temp_dir, name, dir_fd)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        unlink_at(temp, temp_dir)
                    raise
    return True


@contextlib.contextmanager
def _named_in_root(root_fd: DirRef, unnamed: int) -> Iterator[tuple[DirRef, str]]:
    """The unnamed file named in the root's temporary folder, held in use meanwhile."""
    with _temp_folders.using(root_fd):
        temp_dir, temp, _ = _create_temp_in_root(root_fd, unnamed)
        with _opened(temp_dir):
            yield temp_dir, temp


def _write_via(
    temp_dir: DirRef,
    dir_fd: DirRef,
    name: str,
    value: memoryview,
    *,
    exclusive: bool,
    check_cancelled: CheckCancelled,
) -> None:
    """Write through a new temporary file in ``temp_dir`` (`_write_through`)."""
    temp, fd = _create_temp(temp_dir)
    _write_through(
        temp_dir,
        temp,
        fd,
        dir_fd,
        name,
        value,
        exclusive=exclusive,
        check_cancelled=check_cancelled,
    )


def _write_via_temp_folder(
    root_fd: DirRef,
    dir_fd: DirRef,
    name: str,
    value: memoryview,
    *,
    exclusive: bool,
    check_cancelled: CheckCancelled,
) -> bool:
    """Write through an unnamed file or the root's temporary folder; ``False`` if the target
    is on another file system than the root and must be replaced (nothing written)."""
    try:
        if _write_unnamed(
            dir_fd,
            name,
            value,
            exclusive=exclusive,
            check_cancelled=check_cancelled,
            temp_folder=lambda unnamed: _named_in_root(root_fd, unnamed),
        ):
            return True
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        return False
    with _temp_folders.using(root_fd):
        temp_dir, temp, fd = _create_temp_in_root(root_fd)
        with _opened(temp_dir):
            try:
                _write_through(
                    temp_dir,
                    temp,
                    fd,
                    dir_fd,
                    name,
                    value,
                    exclusive=exclusive,
                    check_cancelled=check_cancelled,
                )
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                return False
    return True


class Staged:
    """A value written a part at a time into a temporary file of the root's temporary folder,
    then put in place whole by `write_file` (``staged=``), or dropped by `close`.

    The file holds its lock and the folder its count of users from the first part to the
    last, so no cleaner takes it for a file a dead writer left; a writer killed mid-value
    leaves only it, a name no key can have, which a later open of the root removes.
    """

    def __init__(self, root: str) -> None:
        self._root_fd = open_root(root)
        self._using = _temp_folders.using(self._root_fd)
        try:
            self._using.__enter__()
            try:
                self.temp_dir, self.temp, self._fd = _create_temp_in_root(self._root_fd)
            except BaseException:
                self._using.__exit__(None, None, None)
                raise
        except BaseException:
            _oscalls.close_dir(self._root_fd)
            raise
        self.placed = False
        self._closed = False

    def write(self, data: memoryview, check_cancelled: CheckCancelled) -> None:
        _write_all(self._fd, data, check_cancelled)

    def place(self, dir_fd: DirRef, name: str) -> None:
        """Move the file to ``name`` in ``dir_fd``; it stays where it is if this fails."""
        try:
            if not _oscalls.OPEN_FILES_MOVE:
                os.close(self._fd)
                self._fd = -1
            _oscalls.replace_at(self.temp, self.temp_dir, name, dir_fd)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            # The key's folder is another file system than the root: copy the file beside it
            # (a file-to-file copy, never through memory), then move that copy into place.
            temp, fd = _create_temp(dir_fd)
            try:
                with (
                    open(
                        self.temp,
                        "rb",
                        opener=lambda path, _: open_at(path, _READING, self.temp_dir),
                    ) as source,
                    open(fd, "wb", closefd=False) as target,
                ):
                    shutil.copyfileobj(source, target, WRITE_PIECE)
                _oscalls.replace_at(temp, dir_fd, name, dir_fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    unlink_at(temp, dir_fd)
                raise
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                unlink_at(self.temp, self.temp_dir)
        self.placed = True

    def close(self) -> None:
        """Remove the file unless it was put in place; let go of the folder and the root."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.placed:
                with contextlib.suppress(FileNotFoundError):
                    unlink_at(self.temp, self.temp_dir)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
            _oscalls.close_dir(self.temp_dir)
            self._using.__exit__(None, None, None)
            _oscalls.close_dir(self._root_fd)


# How often a write starts again after a folder on its way was removed under it (emptied by a
# delete of this or another process) or an empty folder was removed to make room for it. Each
# start costs ~50 µs. Three threads writing and deleting keys of one folder as fast as they can:
# 83% of 6,000 writes needed one start, the rest fewer each time (a third as many per extra
# start), at most 9.
_WRITE_TRIES = 100
# Starts made at once; each later one waits first, a little longer each time (`_WRITE_PAUSE`
# more). A folder whose remover is between removing it and removing its name stays where its
# name leads, a dead folder no file can be made in, for as long as that thread is off the CPU:
# on a busy machine, longer than a hundred starts at once take where the first thing a start
# tries is making a file in it (an unnamed file, refused at once). Three threads writing and
# deleting keys of one folder gave up on a write in one run of 8 that way.
_EAGER_TRIES = 10
_WRITE_PAUSE = 20e-6


def write_file(
    root: str,
    key: str,
    value: memoryview,
    *,
    exclusive: bool,
    check_cancelled: CheckCancelled,
    staged: Staged | None = None,
) -> None:
    """Write ``key`` (or put the ``staged`` file there, ``value`` unused); an error says which
    store and which key (never a temporary of ours)."""
    for tries in range(_WRITE_TRIES):
        if tries >= _EAGER_TRIES:
            time.sleep(_WRITE_PAUSE * (tries - _EAGER_TRIES + 1))
        try:
            if _write_once(
                root,
                key,
                value,
                exclusive=exclusive,
                check_cancelled=check_cancelled,
                staged=staged,
            ):
                return
        except OSError as error:
            raise _where(error, "write", root, key) from None
    changing = OSError(errno.EAGAIN, "the folders on its path kept changing under the write")
    raise _where(changing, "write", root, key)


def _write_once(
    root: str,
    key: str,
    value: memoryview,
    *,
    exclusive: bool,
    check_cancelled: CheckCancelled,
    staged: Staged | None = None,
) -> bool:
    """One try at writing ``key``: ``False`` if it must start again (a folder on its way was
    removed under it, or an empty folder where the key goes was removed to make room)."""
    folder, _, name = key.rpartition("/")
    try:
        root_fd = open_root(root)
    except FileNotFoundError:
        # Removed since the store was opened: a write makes it again, as zarr's store does.
        os.makedirs(root, exist_ok=True)
        root_fd = open_root(root)
    with _opened(root_fd):
        try:
            dir_fd = _make_folders(root_fd, folder)
        except LeavesRoot as error:
            raise LeavesRoot(errno.EPERM, error.strerror, key) from None
        except NotADirectoryError:
            other = _key_above(root_fd, folder)
            if other is None:
                return False  # a file on the way was removed meanwhile
            raise _conflict(root, key, other, below=True) from None
        except FileNotFoundError:
            return False  # a folder on the way emptied and removed meanwhile
        with _opened(dir_fd):
            if exclusive:
                there = _entry_mode(dir_fd, name)
                if there is not None and not stat.S_ISDIR(there):
                    return True
                if there is not None:
                    _make_room(root, root_fd, dir_fd, key)
                    return False
            try:
                if staged is not None:
                    staged.place(dir_fd, name)
                elif not _write_via_temp_folder(
                    root_fd,
                    dir_fd,
                    name,
                    value,
                    exclusive=exclusive,
                    check_cancelled=check_cancelled,
                ):
                    # The target's folder is another file system than the root: write beside
                    # it.
                    _write_via(
                        dir_fd,
                        dir_fd,
                        name,
                        value,
                        exclusive=exclusive,
                        check_cancelled=check_cancelled,
                    )
            except IsADirectoryError:
                _make_room(root, root_fd, dir_fd, key)
                return False
            except FileNotFoundError:
                if not _removed(dir_fd):
                    raise
                return False  # the key's folder emptied and removed meanwhile
    return True


_BATCH_FOLDERS = 8
"""Folders a batch keeps open at most. Each open one is a descriptor, and batches run in
parallel: a pipeline's batches of 256 chunks that each have a folder of their own (an array
chunked by rows, say) held 256 each, and 8 of them at once ran out of the 1024 descriptors a
process gets by default (EMFILE)."""


class _Batch:
    """What consecutive writes of one store share: the root, its temporary folder (held in use
    once, not made and removed around every write) and the keys' folders, each opened once.

    Per new key that leaves four system calls (an unnamed file's creation, the write, its name,
    the close; `_write_unnamed`), seven where there are no unnamed files or the key exists,
    where each `write_file` also opens the root and the key's folder. A folder removed under the
    batch is found when the file made in it or its name fails, and that key takes
    `write_file`'s path. One moved elsewhere meanwhile gets the keys where it went, as a single
    write's folder would if moved between its opening and the rename: here that window is the
    batch, not one key."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._stack = contextlib.ExitStack()
        self._root_fd: DirRef | None = None
        self._temp_dir: DirRef | None = None
        self._using_temp = False
        self._folders: dict[str, DirRef] = {}
        # Folders whose keys are written by `write_file` alone (another file system than the
        # root: the rename from the temporary folder cannot reach them).
        self._apart: set[str] = set()

    def write(self, key: str, value: memoryview, check_cancelled: CheckCancelled) -> None:
        folder, _, name = key.rpartition("/")
        if folder not in self._apart:
            try:
                dir_fd = self._folder(folder)
                if not _write_unnamed(
                    dir_fd,
                    name,
                    value,
                    exclusive=False,
                    check_cancelled=check_cancelled,
                    temp_folder=self._named_temp,
                ):
                    _write_via(
                        self._temp_folder(),
                        dir_fd,
                        name,
                        value,
                        exclusive=False,
                        check_cancelled=check_cancelled,
                    )
            except OSError as error:
                # Nothing of it was written (the temporary file is gone): the full path finds
                # out what stands in the way (a folder removed meanwhile, a key or a folder
                # where the key goes, a link out of the root) and says so, or starts again.
                self._forget(folder)
                if error.errno == errno.EXDEV:
                    self._apart.add(folder)
            else:
                return
        write_file(self.root, key, value, exclusive=False, check_cancelled=check_cancelled)

    def _root(self) -> DirRef:
        if self._root_fd is None:
            self._root_fd = self._stack.enter_context(_opened(open_root(self.root)))
        return self._root_fd

    def _temp_folder(self) -> DirRef:
        if self._temp_dir is None:
            root_fd = self._root()
            if not self._using_temp:
                self._stack.enter_context(_temp_folders.using(root_fd))
                self._using_temp = True
            with contextlib.suppress(FileExistsError):
                _oscalls.mkdir_at(TEMP_FOLDER, root_fd)
            self._temp_dir = open_folder_at(TEMP_FOLDER, root_fd)
        return self._temp_dir

    @contextlib.contextmanager
    def _named_temp(self, unnamed: int) -> Iterator[tuple[DirRef, str]]:
        temp_dir = self._temp_folder()
        yield temp_dir, _name_temp(temp_dir, unnamed)[0]

    def _folder(self, folder: str) -> DirRef:
        found = self._folders.get(folder)
        if found is None:
            if len(self._folders) >= _BATCH_FOLDERS:
                # The one opened first: a batch's keys come in order, folder after folder.
                _oscalls.close_dir(self._folders.pop(next(iter(self._folders))))
            found = self._folders[folder] = _make_folders(self._root(), folder)
        return found

    def _forget(self, folder: str) -> None:
        """Open the temporary folder and ``folder`` again next time: another process may have
        removed either (an emptied folder, an unused temporary folder)."""
        if self._temp_dir is not None:
            _oscalls.close_dir(self._temp_dir)
            self._temp_dir = None
        found = self._folders.pop(folder, None)
        if found is not None:
            _oscalls.close_dir(found)

    def close(self) -> None:
        try:
            for folder in list(self._folders):
                self._forget(folder)
            self._forget("")
        finally:
            self._stack.close()


def write_files(
    root: str,
    items: Iterable[tuple[str, memoryview | None]],
    check_cancelled: CheckCancelled,
) -> None:
    """Write each value (delete each key given ``None``) in turn, as `write_file` and
    `delete_file` would, each write atomic; the folders are opened once for all (`_Batch`).
    Each value is written before the next item is taken, so a caller may reuse its memory."""
    batch = _Batch(root)
    try:
        for key, value in items:
            check_cancelled()
            if value is None:
                delete_file(root, key)
            else:
                batch.write(key, value, check_cancelled)
    finally:
        batch.close()


def _removed(folder: DirRef) -> bool:
    """Whether the folder may have been removed since it was opened. A handle still open says
    so by its link count. A path cannot tell a folder removed and made again (by a write racing
    this one) from the one it named: by path, assume it was, and the write starts again (at most
    `_WRITE_TRIES` times)."""
    return isinstance(folder, str) or not os.fstat(folder).st_nlink


def _entry_mode(dir_fd: DirRef, name: str) -> int | None:
    try:
        return lstat_at(name, dir_fd).st_mode
    except FileNotFoundError:
        return None


def _make_room(root: str, root_fd: DirRef, dir_fd: DirRef, key: str) -> None:
    """The key names a folder: remove it if it holds nothing but empty folders (a store with no
    key under a prefix behaves as if the folder were not there), else raise `KeyIsAFolder`."""
    name = key.rpartition("/")[2]
    if not _remove_empty_tree(dir_fd, name):
        raise _conflict(root, key, _key_under(root_fd, key), below=False)


def _remove_empty_tree(dir_fd: DirRef, name: str) -> bool:
    """Remove the folder ``name`` if it (and every folder in it) is empty; whether it is gone.
    Anything else in it (a file, a link, a FIFO, a temporary file of a write in flight) keeps
    it, as it is."""
    try:
        fd = open_folder_at(name, dir_fd, listable=True)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # a link (ELOOP) or no folder (ENOTDIR): not ours to remove
    with _opened(fd):
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in _oscalls.list_folder(fd)]
        if not all(is_dir and _remove_empty_tree(fd, sub) for sub, is_dir in entries):
            return False
    try:
        _oscalls.rmdir_at(name, dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return False  # something was put in it meanwhile
    return True


def _key_above(root_fd: DirRef, folder: str) -> str | None:
    """The first folder on ``folder``'s path that is not a folder (a key, if a regular file)."""
    parts = folder.split("/")
    for depth in range(1, len(parts) + 1):
        path = "/".join(parts[:depth])
        mode = getattr(_resolve(root_fd, path), "st_mode", 0)
        if not stat.S_ISDIR(mode):
            return path
    return None


def _remove_emptied(root_fd: DirRef, folder: str) -> None:
    """Remove ``folder`` (a key's folder, ``""``: the root, kept) and the folders above it,
    deepest first, while they are empty: a folder emptied of keys is not left behind to show in
    listings or block a key of its name. Stops at the first that is not empty (or is a link)."""
    while folder:
        parent, _, name = folder.rpartition("/")
        try:
            with _opened(open_folder(root_fd, parent)) as parent_fd:
                _oscalls.rmdir_at(name, parent_fd)
        except OSError:
            return
        folder = parent


# ---------------------------------------------------------------- deletes (in threads)


def delete_file(root: str, key: str) -> None:
    try:
        _delete_key(root, key)
    except OSError as error:
        raise _where(error, "delete", root, key) from None


def _delete_key(root: str, key: str) -> None:
    folder, _, name = key.rpartition("/")
    try:
        root_fd = open_root(root)
    except _ABSENT:
        return
    with _opened(root_fd):
        try:
            dir_fd = open_folder(root_fd, folder)
        except _ABSENT:
            return  # nothing of the store's lies there
        with _opened(dir_fd):
            try:
                # Removes a link itself, never what it points to.
                unlink_at(name, dir_fd)
            except FileNotFoundError:
                return
            except (IsADirectoryError, PermissionError):
                # A key that names a folder is not a key: delete never removes a whole folder.
                if not stat.S_ISDIR(lstat_at(name, dir_fd).st_mode):
                    raise
                return
        _remove_emptied(root_fd, folder)


def _empty_folder(dir_fd: DirRef, check_cancelled: CheckCancelled, keep: str = "") -> None:
    """Remove everything in the folder ``dir_fd``, checking for cancellation between files.

    Links are removed, never followed; each file is there or gone at every moment.
    """
    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in _oscalls.list_folder(dir_fd)]
    for name, is_dir in entries:
        if name == keep:
            continue
        if is_dir:
            _remove_folder(dir_fd, name, check_cancelled)
        else:
            check_cancelled()
            with contextlib.suppress(FileNotFoundError):
                _unlink_at(name, dir_fd)


def _remove_folder(dir_fd: DirRef, name: str, check_cancelled: CheckCancelled) -> None:
    try:
        fd = open_folder_at(name, dir_fd, listable=True)
    except FileNotFoundError:
        return
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # Swapped for a link or a file since it was listed: remove that, as an entry.
        check_cancelled()
        with contextlib.suppress(FileNotFoundError):
            _unlink_at(name, dir_fd)
        return
    with _opened(fd):
        _empty_folder(fd, check_cancelled)
    try:
        _oscalls.rmdir_at(name, dir_fd)
    except FileNotFoundError:
        pass
    except OSError as error:
        # A write put a key in it since it was emptied: that write came after this delete,
        # and its key stays (with the folders on its way).
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


def delete_tree(root: str, prefix: str, check_cancelled: CheckCancelled) -> None:
    """Delete every key under ``prefix`` (a folder, no trailing ``/``; ``""``: the whole root)."""
    try:
        root_fd = open_root(root)
    except _ABSENT:
        return
    with _opened(root_fd):
        if not prefix:
            # The whole store: empty the root but keep it (the store stays open), and the
            # folder where writes in progress keep their files.
            with _opened(open_folder_at(".", root_fd, listable=True)) as listable:
                _empty_folder(listable, check_cancelled, keep=TEMP_FOLDER)
            return
        folder, _, name = prefix.rpartition("/")
        try:
            dir_fd = open_folder(root_fd, folder)
        except _ABSENT:
            return
        with _opened(dir_fd):
            try:
                info = lstat_at(name, dir_fd)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(info.st_mode):
                _remove_folder(dir_fd, name, check_cancelled)
            elif stat.S_ISLNK(info.st_mode) and _is_folder(_resolve(root_fd, prefix)):
                # The node is a link to a folder in the root: its keys go with the link.
                unlink_at(name, dir_fd)
            else:
                return  # a file (the key `prefix` itself, not a node): no keys lie under it
        _remove_emptied(root_fd, folder)


def _is_folder(info: os.stat_result | None) -> bool:
    return info is not None and stat.S_ISDIR(info.st_mode)


# ---------------------------------------------------------------- opening and moving


def check_root(root: Path) -> None:
    """The root must be a folder that exists: say which it is not."""
    if root.is_dir():
        return
    if root.exists() or root.is_symlink():
        hint = " (for a zip file, use ZipStore)" if zipfile.is_zipfile(root) else ""
        raise NotADirectoryError(
            f"{root} is a file, not a folder: a LocalStore keeps its keys in a folder{hint}"
        )
    raise FileNotFoundError(f"{root} does not exist (a LocalStore's root folder)")


def prepare_root(root: Path, *, create: bool) -> None:
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            # A file in the way, at the root or above it.
            check_root(root)
            raise
        remove_abandoned_temps(str(root))
    else:
        check_root(root)


def _abandoned(dir_fd: DirRef, name: str, now: float) -> bool:
    """Remove the temporary file ``name`` if its writer is gone; say whether it was."""
    try:
        fd = open_at(name, os.O_RDONLY | O_NONBLOCK | O_CLOEXEC, dir_fd)
    except FileNotFoundError:
        return False
    except OSError:
        # Not a file we made (a link, say): it has no business in our folder.
        with contextlib.suppress(OSError):
            unlink_at(name, dir_fd)
        return True
    with _opened(fd):
        locked = try_lock(fd)
        if locked is False:
            return False  # a live writer holds it
        if locked is None and now - os.fstat(fd).st_mtime < STALE_AFTER:
            return False  # no locks here: only its age tells
        if _oscalls.OPEN_FILES_MOVE:
            # Unlinked while we hold the lock, so a writer that locks it after sees it gone.
            with contextlib.suppress(FileNotFoundError):
                unlink_at(name, dir_fd)
            return True
    # Where an open file cannot be removed (Windows): after closing it; one that a writer has
    # opened since stays (PermissionError there).
    with contextlib.suppress(FileNotFoundError, PermissionError):
        unlink_at(name, dir_fd)
    return True


def remove_abandoned_temps(root: str) -> None:
    with _opened(open_root(root)) as root_fd:
        try:
            temp_dir = open_folder_at(TEMP_FOLDER, root_fd, listable=True)
        except OSError:
            return  # no folder, or not ours to look into
        with _opened(temp_dir):
            listing = _oscalls.list_folder(temp_dir)
            names = [e.name for e in listing if not e.is_dir(follow_symlinks=False)]
            now = time.time()
            for name in names:
                _abandoned(temp_dir, name, now)
        _temp_folders.remove_if_unused(root_fd)


def _copy_tree(source: Path, dest: Path, check_cancelled: CheckCancelled) -> None:
    """Copy a store's folder to another file system: files and links as they are (a link is
    copied, never followed), whatever is not a file or a folder left out."""

    def copy(src: str, dst: str) -> None:
        check_cancelled()
        _copy_file(src, dst)

    def special(folder: str, names: list[str]) -> set[str]:
        left_out = set()
        for name in names:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                left_out.add(name)
        return left_out

    shutil.copytree(source, dest, symlinks=True, copy_function=copy, ignore=special)


def move_root(source: Path, dest: Path, check_cancelled: CheckCancelled, moved: list[bool]) -> None:
    if dest.exists():
        raise FileExistsError(f"Destination root {dest} already exists.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _rename(source, dest)  # one step: nothing to cancel half-way
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    else:
        moved.append(True)
        return
    try:
        _copy_tree(source, dest, check_cancelled)
    except BaseException:
        # Cancelled or failed while copying: the store stays where it was, whole.
        shutil.rmtree(dest, ignore_errors=True)
        raise
    # The copy is complete: from here the store lives at dest, whatever happens to the source.
    moved.append(True)
    with (
        _opened(open_root(str(source))) as root_fd,
        _opened(open_folder_at(".", root_fd, listable=True)) as listable,
    ):
        _empty_folder(listable, check_cancelled)
    source.rmdir()
