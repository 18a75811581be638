"""ZipStore: a whole hierarchy in one zip file, drop-in for ``zarr.storage.ZipStore``.

The file is only ever appended to while a store has it open (see `._zipformat`): a write appends
a member, close appends a directory, and the archive as it was stays intact before them. So:

- A write that fails (a full disk) or is cancelled is cut off and never listed: the key keeps its
  old value, in this session and after reopening.
- A crash (kill -9) or a failed close leaves a file that the next opening recovers: every member
  that was written whole is kept, the rest is dropped with a warning naming it. ``mode="r"`` never
  writes; a writable store appends a fresh directory at close.
- A deleted key is hidden at once; close appends a directory without it, then rewrites the file
  without its bytes into a temporary file that replaces the archive only once complete. If either
  step fails, close raises and the store stays open with its state, so close can be retried.
  Opened through a symbolic link, a rewrite replaces the file the link leads to (its temporary
  file beside that one): the link stays a link to the archive.
- Every read of a whole member checks its CRC-32 (a 4 KiB chunk: ~2 µs more on a ~8 µs read);
  a byte range of a member is read after the whole member was checked once per opening.
- ``close()`` and ``aclose()`` wait for the calls in flight on the store before closing.
- Overwritten values do not pile up: a write that overwrites a key leaves the old bytes unlisted
  in the file, and once such dead bytes pass half the file (and 1 MiB) the store rewrites it
  (as `rewrite()` does, within the write that crossed the line; likewise at close), so the file
  stays under twice what it holds. Measured here, 2,000 overwrites of one 100 KiB value in an
  archive of 50 such values (the worst case, nothing but overwrites): without compaction the file
  grew to 200 MiB; with it, 6 MiB, at 0.55 ms a write instead of 0.16 ms (each rewrite copies the
  live values and fsyncs once). A small key rewritten often (zarr.json) waits for 1 MiB of
  rewrites.
- A rewrite needs the folder, not only the file: its copy is made beside the archive, given the
  archive's owner and group, and renamed over it. Where that cannot be done faithfully (the
  folder refuses; the archive is another user's and this one cannot give the copy away; the
  file has other hard links, which would stay on the old file), compaction and close after a
  delete leave the file as it is, whole (its last directory leaves out deleted keys and old
  copies), keep appending, try again once the dead bytes doubled, and say so with a
  `ZipNotRewrittenWarning`; `rewrite()` raises `RewriteRefused`.
- One writer, in one process. A writable store used in another process than the one that made
  it (sent to a dask worker, say) refuses with an error that says what to do: two processes
  appending to one file would corrupt it. A writable store holds an advisory lock on the file
  (`._filelock`), so a second writer opened independently, here or in another program, is
  refused with `ArchiveLocked`; readers take no lock. `with_read_only()` gives a copy that
  other processes may read (pickling writes the directory first, so the copy sees a whole
  archive).

``zipfile`` is not used to write: it would overwrite the old directory on append, register a
member that failed half-way, and drop its handle before a failed close. It still parses
directories and decompresses. Reads of stored members read just the bytes asked for, from a file
descriptor of their own, outside the store's lock, so they run concurrently; when those bytes are
in the page cache they are read on the event loop itself.
"""

from __future__ import annotations

import contextlib
import errno
import lzma
import os
import shutil
import stat
import threading
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Self

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from zarr_anyio._core.limit import LimiterLike
from zarr_anyio._core.store_calls import StoreCalls
from zarr_anyio._core.threads import CheckCancelled, run_in_worker

from . import _live, _oscalls
from ._base import NOT_READY, BlockingStore, Pending
from ._fileio import read_exact
from ._filelock import same_file, try_lock, unlock
from ._keys import byte_range_slice, names_under, validate_key
from ._zipformat import (
    PIECE,
    data_offset,
    directory_record,
    member_record,
    rewritten_header,
    write_all,
)
from ._zipread import (
    Contents,
    FdReader,
    crc_of,
    overlapping,
    read_contents,
    recover,
)

__all__ = ["ArchiveLocked", "RewriteRefused", "ZipNotRewrittenWarning", "ZipStore"]

ZipStoreAccessModeLiteral = Literal["r", "w", "a", "x"]

_LOCAL_HEADER_SIZE = 30
# Linux's "read only what is in the page cache, else fail at once" flag; None elsewhere.
_RWF_NOWAIT = _oscalls.RWF_NOWAIT
# Every open of the archive: not inherited, and bytes as they are (Windows' text mode is not).
_OPENING = _oscalls.O_CLOEXEC | _oscalls.O_BINARY
# Reads made on the event loop copy and check at most this much: 1 MiB is ~0.3 ms of the loop's
# time (copy and CRC-32); bigger reads go to a thread.
_LOOP_READ_LIMIT = 1 << 20
# Temporary files of rewrites, beside the archive; a name no zarr key may take.
_REWRITE_MARK = ".__zarr_anyio_rewrite__."
# Dead bytes (overwritten values, old directories) that make the store rewrite the file: more
# than this share of the file, and more than the floor (below it a rewrite is not worth its
# fsync). Module attributes so tests can lower the floor.
_COMPACT_SHARE = 0.5
_COMPACT_FLOOR = 1 << 20


def _no_cancel_check() -> None:
    """For calls that have no caller to be cancelled (the sync surface, ``close()``)."""


def _check_archive_path(path: Path) -> None:
    """What ``mode="r"`` needs: a file at ``path`` (a clear error now, not at first read)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            f"{path}: no such zip file (mode 'r' reads an existing archive; mode 'a' or 'w' "
            "creates one)"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(
            f"{path} is a folder, not a zip file (for a folder of keys, use LocalStore)"
        )


class _Session:
    """One opening of the archive: its file descriptor and what the store holds in it."""

    def __init__(self, fd: int, contents: Contents, *, end: int, dirty: bool) -> None:
        self.fd = fd
        self.comment = contents.comment
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.folders: list[zipfile.ZipInfo] = []
        self.data_offsets = dict(contents.data_offsets)
        # Header offsets of members whose CRC-32 was checked in this session.
        self.checked = set(contents.checked)
        self._take(contents.infos)
        # Keys deleted since the last rewrite: hidden now, their bytes dropped by the next one.
        self.deleted: set[str] = set()
        # Where the next member goes: the end of the file, never before it.
        self.end = end
        # The file's last directory does not list what the store holds.
        self.dirty = dirty
        # Cleared when the page-cache read fails for a reason other than "not cached".
        self.nowait = _RWF_NOWAIT is not None
        # Bytes of the file that no listed member needs: overwritten and deleted values, old
        # directories (the one the file ends with counts as dead from the start: it is
        # replaced by the next one).
        self.dead = max(0, end - sum(_record_size(info) for info in self.listed()))
        self.directory_size = 0
        # Compaction is tried once dead bytes pass this too: after a refused rewrite (a folder
        # we may not write), not again until they doubled, so that the cost stays amortised.
        self.compact_at = 0
        # The process that holds the writer's lock on ``fd`` (None: not locked, as for readers,
        # or where the file system has no locks). A forked child must not give it up.
        self.locked_by: int | None = None
        # Refused rewrites reported: once a session for dead bytes, once for deleted keys (a
        # warning per write would drown the rest).
        self.told_refused: set[bool] = set()

    def _take(self, infos: Iterable[zipfile.ZipInfo]) -> None:
        # The newest copy of a name is the one furthest into the file.
        for info in sorted(infos, key=lambda info: info.header_offset):
            if info.filename.endswith("/"):
                self.folders.append(info)
            else:
                self.members[info.filename] = info

    def live(self, key: str) -> zipfile.ZipInfo | None:
        return None if key in self.deleted else self.members.get(key)

    def live_keys(self) -> list[str]:
        return [key for key in self.members if key not in self.deleted]

    def listed(self) -> list[zipfile.ZipInfo]:
        """What the directory lists: live members and folder entries, in file order."""
        infos = [info for key, info in self.members.items() if key not in self.deleted]
        return sorted([*infos, *self.folders], key=lambda info: info.header_offset)

    def add(self, info: zipfile.ZipInfo, data_offset: int, end: int) -> None:
        old = self.live(info.filename)
        if old is not None:
            self.dead += _record_size(old)
        self.members[info.filename] = info
        self.deleted.discard(info.filename)
        self.data_offsets[info.header_offset] = data_offset
        self.checked.add(info.header_offset)
        self.end = end
        self.dirty = True

    def replace_file(
        self, fd: int, infos: list[zipfile.ZipInfo], offsets: dict[int, int], checked: set[int]
    ) -> None:
        """The archive was rewritten into ``fd``; close the old descriptor."""
        old, self.fd = self.fd, fd
        self.members, self.folders = {}, []
        self._take(infos)
        self.data_offsets, self.checked = offsets, checked
        self.deleted = set()
        self.end = os.fstat(fd).st_size
        self.dirty = False
        self.nowait = _RWF_NOWAIT is not None
        self.dead = 0
        self.directory_size = 0
        self.compact_at = 0
        self.close_fd(old)

    def close_fd(self, fd: int) -> None:
        """Close ``fd`` (the session's or one it replaced), giving up the writer's lock first:
        reads in flight hold duplicates of it, which would keep the lock otherwise."""
        if self.locked_by == os.getpid():
            unlock(fd)
        os.close(fd)


class ArchiveLocked(BlockingIOError):
    """Another ZipStore, in this process or another, is writing the zip file (it holds the
    file's lock): a zip file takes one writer at a time."""


class RewriteRefused(PermissionError):
    """A rewrite of the archive (a copy put in its place) is refused: the folder does not let
    this user create or replace files, the file has other hard links, or it belongs to a user
    that this one cannot give the copy to."""


class ZipNotRewrittenWarning(UserWarning):
    """A rewrite the store makes on its own (compaction, close after a delete) was refused by
    the folder: the file keeps its dead bytes, the store keeps appending."""


def _refused(target: Path, error: PermissionError) -> RewriteRefused:
    """The error of a rewrite the folder refused: ``str()`` names the archive and its folder."""
    return RewriteRefused(
        error.errno,
        f"a rewrite writes a complete copy of the archive beside it and puts it in its place, "
        f"and its folder {target.parent} does not let this user create or replace files "
        f"({error.strerror})",
        str(target),
    )


def _give_copy(fd: int, archive: os.stat_result, target: Path) -> None:
    """Give the rewrite's copy the archive's owner and group, or refuse the rewrite: a shared
    archive must not become this user's (its owner could lose write access to it)."""
    copy = os.fstat(fd)
    uid = archive.st_uid if copy.st_uid != archive.st_uid else -1
    gid = archive.st_gid if copy.st_gid != archive.st_gid else -1
    if uid == -1 and gid == -1:
        return
    try:
        os.fchown(fd, uid, gid)
    except PermissionError:
        raise RewriteRefused(
            errno.EPERM,
            f"it belongs to user {archive.st_uid} (group {archive.st_gid}), and a copy made by "
            "this user cannot be given to them, so it would change hands",
            str(target),
        ) from None


def _record_size(info: zipfile.ZipInfo) -> int:
    """About how many bytes a member takes in the file (header, name, extra, data)."""
    descriptor = 16 if info.flag_bits & 0x08 else 0
    name = len(info.filename.encode("utf-8", "surrogateescape"))
    return _LOCAL_HEADER_SIZE + name + len(info.extra) + info.compress_size + descriptor


class _Shared:
    """The open archive of a store, shared with its copies from `ZipStore.with_read_only`."""

    def __init__(self) -> None:
        self.session: _Session | None = None


class ZipStore(BlockingStore):
    """Store using a zip file.

    Parameters
    ----------
    path
        The zip file.
    mode
        ``"r"`` reads an existing archive, ``"w"`` creates (or truncates) one, ``"a"`` appends to
        an existing archive or creates it, ``"x"`` creates one that must not exist yet. ``"w"``
        and ``"x"`` apply to the first open only; reopening (after ``close()`` or unpickling)
        appends, so entries already written are kept. With ``"r"`` the file must exist: a
        missing one fails here, not at first use.
    read_only
        Defaults to ``mode == "r"``. As in zarr, ``mode`` decides how the file is opened (so
        ``mode="w", read_only=True`` still creates it) and ``read_only`` what the store may do.
    compression, allowZip64
        As for ``zipfile.ZipFile``.
    max_concurrency, limiter
        As for every zarr_anyio store.
    """

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_listing: bool = True
    _reads_on_loop = _RWF_NOWAIT is not None

    path: Path
    compression: int
    allowZip64: bool

    def __init__(
        self,
        path: Path | str,
        *,
        mode: ZipStoreAccessModeLiteral = "r",
        read_only: bool | None = None,
        compression: int = zipfile.ZIP_STORED,
        allowZip64: bool = True,
        max_concurrency: int | None = None,
        limiter: LimiterLike | None = None,
    ) -> None:
        if mode not in ("r", "w", "a", "x"):
            raise ValueError(f"mode must be one of 'r', 'w', 'a', 'x', got {mode!r}")
        if read_only is None:
            read_only = mode == "r"
        super().__init__(read_only=read_only, max_concurrency=max_concurrency, limiter=limiter)
        if isinstance(path, str):
            path = Path(path)
        if not isinstance(path, Path):
            raise TypeError(f"'path' must be a string or Path instance, got {type(path)}")
        self.path = path
        self._zmode = mode
        self.compression = compression
        self.allowZip64 = allowZip64
        # The process that may write the file (see _open_session).
        self._pid = os.getpid()
        self._owner: ZipStore | None = None
        self._init_archive_state()
        if mode == "r":
            _check_archive_path(path)
        # open_store(str(store)) finds this store while it has the file open for writing.
        _live.remember(str(self), self)

    def _init_archive_state(self) -> None:
        self._lock = threading.RLock()
        self._shared = _Shared()
        self._calls = StoreCalls()

    @property
    def _session(self) -> _Session | None:
        return self._shared.session

    @_session.setter
    def _session(self, session: _Session | None) -> None:
        self._shared.session = session

    def _open_for_writing(self) -> bool:
        """Whether this store (or the store it is a copy of) holds the file open to write."""
        writer = self._owner or self
        return self._session is not None and not writer.read_only

    def _over_same_data(self, read_only: bool, options: dict[str, Any]) -> ZipStore:
        # The zip is open for writing in this process: a second store over it would be a second
        # writer, so it is this store again.
        if options:
            raise TypeError(
                f"{self!r} is open for writing in this process: open_store gives that store "
                f"again, and cannot apply {sorted(options)} to it"
            )
        return self

    def with_read_only(self, read_only: bool = False) -> ZipStore:
        """A copy of this store that is read-only (or writable).

        The copy of a writable store shares its open archive (and its lock): it reads what the
        store has written, unclosed writes included, and never opens the file a second time,
        which would make two writers. Closing the copy leaves the store open. A copy sent to
        another process opens the file there, read-only.
        """
        writer = self._owner or self
        kwargs: dict[str, Any] = {
            "compression": self.compression,
            "allowZip64": self.allowZip64,
            **self._store_kwargs(),
        }
        if writer.read_only:
            mode: ZipStoreAccessModeLiteral = "r" if read_only else "a"
            return type(self)(self.path, mode=mode, read_only=read_only, **kwargs)
        copy = type(self)(self.path, mode="a", read_only=read_only, **kwargs)
        copy._owner = writer
        copy._lock, copy._shared, copy._calls = writer._lock, writer._shared, writer._calls
        return copy

    # ---------------------------------------------------------------- identity and pickling

    def __str__(self) -> str:
        return f"zip://{self.path}"

    def __repr__(self) -> str:
        return f"ZipStore('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.path == other.path

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            session = self._session
            if session is not None and session.dirty and self._open_for_writing():
                # A copy that another process opens must find a whole archive: write the
                # directory of what is written so far (append-only, as close does).
                self._append_directory(session)
            state = super().__getstate__()
        for name in ("_lock", "_shared", "_calls", "_owner"):
            state.pop(name, None)
        if self._owner is not None:
            # A copy of a writer opens the file on its own, for reading only.
            state["_zmode"] = "r" if self.read_only else "a"
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Opened on first use: a copy that is never used must not touch the file.
        self._owner = None
        self._init_archive_state()

    def __del__(self) -> None:
        if getattr(self, "_owner", None) is not None or not hasattr(self, "_shared"):
            return  # a copy: the archive is its owner's
        session = self._session
        if session is None:
            return
        if session.dirty or session.deleted:
            warnings.warn(
                f"{self!r} was not closed: closing it now to write the zip's central directory. "
                "Close a writable ZipStore (close(), `with`, `async with`) when done with it.",
                ResourceWarning,
                stacklevel=2,
            )
            with contextlib.suppress(Exception):
                self.close()
        if self._session is not None:
            # Nothing to write, or the close failed: the next opening recovers the file.
            self._session = None
            session.close_fd(session.fd)

    # ---------------------------------------------------------------- opening (blocking)

    def _use(self, expected: _Session | None = None) -> _Session:
        """The open session, opened on first use; call with the lock held.

        A call that started in session ``expected`` refuses to go on in another one: it was
        left behind by a caller that stopped waiting, and must not reopen a closed store."""
        current = self._session
        if expected is not None and current is not expected:
            raise RuntimeError(f"{self!r} was closed while this call was waiting; it did nothing")
        if current is None:
            current = self._session = (self._owner or self)._open_session()
        return current

    def _open_session(self) -> _Session:
        mode = self._zmode
        if mode != "r" and not self.read_only and os.getpid() != self._pid:
            raise RuntimeError(
                f"{self!r} is writable and was made in process {self._pid}; this is process "
                f"{os.getpid()}. A zip file takes one writer: two processes appending to it "
                "would corrupt it, so it is not opened here. Write from the process that made "
                "the store (with dask: the threaded scheduler, or write to a LocalStore or an "
                "object store instead), and to read from other processes close it first and "
                "send store.with_read_only() (or ZipStore(path, mode='r'))."
            )
        writing = mode != "r" and not self.read_only
        flags = _OPENING | (os.O_RDONLY if mode == "r" else os.O_RDWR | os.O_CREAT)
        if mode == "w" and not writing:
            flags |= os.O_TRUNC
        elif mode == "x":
            flags |= os.O_EXCL
        fd, locked = self._open_archive(flags, writing)
        if mode == "w" and writing:
            # Emptied only once the lock is ours: never under another writer.
            os.ftruncate(fd, 0)
        try:
            session = self._read_session(fd)
        except BaseException:
            if locked:
                unlock(fd)
            os.close(fd)
            raise
        session.locked_by = os.getpid() if locked else None
        if writing:
            self._remove_stale_rewrites()
        if mode in ("w", "x"):
            self._zmode = "a"
        return session

    def _open_archive(self, flags: int, writing: bool) -> tuple[int, bool]:
        """The archive's file descriptor, and whether it holds the writer's lock (taken when
        ``writing``; a second writer is refused with `ArchiveLocked`)."""
        while True:
            fd = self._open_path(flags)
            if not writing:
                return fd, False
            try:
                taken = try_lock(fd)
                # A lock on a file that a rewrite replaced since we opened it guards nothing:
                # open the one that is there now.
                current = taken != "taken" or same_file(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if taken == "held":
                os.close(fd)
                raise ArchiveLocked(
                    errno.EWOULDBLOCK,
                    f"{self.path} is open for writing by another ZipStore, in this process or "
                    "another (it holds the file's lock). A zip file takes one writer at a time: "
                    "two appending to it would lose each other's keys. Close the other store "
                    "first and open this one again, or open this one with mode='r' to read what "
                    "the other had written at its last close.",
                )
            if current:
                return fd, taken == "taken"
            unlock(fd)
            os.close(fd)
            flags &= ~os.O_EXCL  # mode "x" made it; the file there now is another writer's

    def _open_path(self, flags: int) -> int:
        mode = self._zmode
        try:
            return os.open(self.path, flags, 0o666)
        except IsADirectoryError:
            raise IsADirectoryError(
                f"{self.path} is a folder, not a zip file (for a folder of keys, use LocalStore)"
            ) from None
        except FileNotFoundError:
            if mode == "r":
                _check_archive_path(self.path)
            raise FileNotFoundError(
                f"{self.path}: cannot create the zip file: its folder {self.path.parent} does "
                "not exist"
            ) from None

    def _read_session(self, fd: int) -> _Session:
        size = os.fstat(fd).st_size
        if size == 0 and self._zmode != "r":
            # A new archive: as with zipfile, its (empty) directory is written at close.
            return _Session(fd, Contents([]), end=0, dirty=True)
        contents = read_contents(fd, size)
        if contents is None:
            contents = recover(fd, size, writable=self._zmode != "r")
        if contents is None:
            raise zipfile.BadZipFile(
                f"{self.path} is not a zip file (or is damaged beyond recovery: it holds "
                "neither a directory nor a whole member)"
            )
        for info in contents.infos:
            # A folder entry ("c/") is held to the rule of keys too: "../x/" is no safer.
            name = info.orig_filename
            try:
                validate_key(name[:-1] if name.endswith("/") else name)
            except ValueError as error:
                raise ValueError(
                    f"{self.path} holds a member that is not a safe key: {error}"
                ) from None
        shared = overlapping(contents.infos)
        if shared is not None:
            first, second = shared
            raise zipfile.BadZipFile(
                f"{self.path} is not a valid zip file: its entries {first.filename!r} (at "
                f"offset {first.header_offset}, {first.compress_size} bytes) and "
                f"{second.filename!r} (at offset {second.header_offset}) overlap (zipfile "
                "refuses such archives too)"
            )
        repair = contents.recovered and not self.read_only
        if contents.recovered:
            self._warn_recovered(contents, repair)
        return _Session(fd, contents, end=size, dirty=repair)

    def _warn_recovered(self, contents: Contents, repair: bool) -> None:
        dropped = "; ".join(contents.dropped[:10]) or "nothing"
        if len(contents.dropped) > 10:
            dropped += f"; and {len(contents.dropped) - 10} more"
        source = (
            "its last directory and the local headers after it"
            if contents.found_directory
            else "their local headers"
        )
        then = (
            "close() will append a directory listing what was recovered"
            if repair
            else "the file was not changed"
        )
        warnings.warn(
            f"{self.path} is damaged: it does not end with a directory that lists what it "
            f"holds (as after a crash or a full disk). Recovered {len(contents.infos)} "
            f"entries from {source}; dropped: {dropped}. {then[0].upper()}{then[1:]}.",
            UserWarning,
            stacklevel=2,
        )

    def _target(self) -> Path:
        """The file the archive is: ``path``, or where its symbolic links lead. A rewrite
        replaces that file, so that a link stays a link and keeps reaching the archive (zarr's
        ZipStore writes in place, through the link)."""
        return Path(os.path.realpath(self.path))

    def _remove_stale_rewrites(self) -> None:
        """Temporary files of rewrites that a crash left beside the archive."""
        target = self._target()
        prefix = f"{_REWRITE_MARK}{target.name}."
        with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    # ---------------------------------------------------------------- reads (blocking)

    def _data_offset(
        self, session: _Session, info: zipfile.ZipInfo, read: Callable[[int, int], bytes | None]
    ) -> int | None:
        """Where ``info``'s bytes start, remembered; the first time, its local header is read
        with ``read(length, offset)``, and if that gives ``None`` so does this."""
        offset = session.data_offsets.get(info.header_offset)
        if offset is not None:
            return offset
        header = read(_LOCAL_HEADER_SIZE, info.header_offset)
        if header is None:
            return None
        try:
            offset = data_offset(header, info.header_offset)
        except zipfile.BadZipFile:
            raise zipfile.BadZipFile(
                f"{self.path}: bad local header for {info.filename!r}"
            ) from None
        session.data_offsets[info.header_offset] = offset
        return offset

    def _damaged(self, key: str, detail: str) -> zipfile.BadZipFile:
        return zipfile.BadZipFile(f"{self.path}: key {key!r} is damaged: {detail}")

    def _check_crc(self, key: str, info: zipfile.ZipInfo, data: bytes) -> None:
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise self._damaged(
                key, "Bad CRC-32 (its bytes do not match the checksum stored in the archive)"
            )

    def _cached(self, session: _Session, length: int, offset: int) -> bytes | None:
        """``length`` bytes at ``offset`` if they are all in the page cache, else ``None``."""
        assert _RWF_NOWAIT is not None
        buffer = bytearray(length)
        try:
            read = _oscalls.read_into(session.fd, buffer, offset, _RWF_NOWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            # This file cannot be read that way (tmpfs: EOPNOTSUPP): threads read it from now.
            session.nowait = False
            return None
        return bytes(buffer) if read == length else None

    def _read_nowait(
        self, key: str, byte_range: ByteRequest | None
    ) -> bytes | Literal[Pending.NOT_READY] | None:
        # On the event loop: never wait for the lock or the disk, fall back to a thread instead.
        if not self._lock.acquire(blocking=False):
            return NOT_READY
        try:
            session = self._session
            if session is None or not session.nowait:
                return NOT_READY
            info = session.live(key)
            if info is None:
                return None
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                return NOT_READY
            wanted = byte_range_slice(byte_range, info.file_size)
            length = wanted.stop - wanted.start
            whole = length == info.file_size
            if length > _LOOP_READ_LIMIT or not (whole or info.header_offset in session.checked):
                return NOT_READY
            offset = self._data_offset(session, info, lambda n, at: self._cached(session, n, at))
            if offset is None:
                return NOT_READY
            data = self._cached(session, length, offset + wanted.start)
            if data is None:
                return NOT_READY
            if whole:
                self._check_crc(key, info, data)
                session.checked.add(info.header_offset)
            return data
        finally:
            self._lock.release()

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        with self._lock:
            session = self._use()
            info = session.live(key)
            if info is None:
                return None
            if info.flag_bits & 0x1:
                raise RuntimeError(f"File {key!r} is encrypted, password required for extraction")
            offset = self._data_offset(session, info, lambda n, at: read_exact(session.fd, n, at))
            assert offset is not None  # pread waits for the disk rather than give up
            # A directory may claim any size: past the end of the file it is damage, not a
            # buffer of the claimed size to allocate (MemoryError).
            stored = info.compress_type == zipfile.ZIP_STORED
            if offset + (info.file_size if stored else info.compress_size) > session.end:
                raise self._damaged(key, "the archive ends inside it")
            checked = info.header_offset in session.checked
            # A descriptor of our own, so the bytes can be read outside the lock and survive a
            # close or a rewrite (which replaces the file, not the inode this one reads).
            handle = os.dup(session.fd)
        try:
            data, now_checked = self._read_member(handle, key, info, offset, byte_range, checked)
        finally:
            os.close(handle)
        if now_checked and not checked:
            with self._lock:
                if session.live(key) is info:
                    session.checked.add(info.header_offset)
        return data

    def _read_member(
        self,
        fd: int,
        key: str,
        info: zipfile.ZipInfo,
        offset: int,
        byte_range: ByteRequest | None,
        checked: bool,
    ) -> tuple[bytes, bool]:
        """The bytes ``byte_range`` asks for, and whether the whole member's CRC-32 was checked
        (a byte range of a member not checked yet reads the whole member once to check it)."""
        wanted = byte_range_slice(byte_range, info.file_size)
        length = wanted.stop - wanted.start
        whole = length == info.file_size
        if info.compress_type == zipfile.ZIP_STORED:
            if whole:
                data = read_exact(fd, length, offset)
                self._check_crc(key, info, data)
                return data, True
            if not checked and crc_of(fd, offset, offset + info.file_size) != info.CRC:
                raise self._damaged(
                    key, "Bad CRC-32 (its bytes do not match the checksum stored in the archive)"
                )
            data = read_exact(fd, length, offset + wanted.start)
            if len(data) < length:
                raise self._damaged(key, "the archive ends inside it")
            return data, True
        reader = FdReader(fd, offset + info.compress_size, offset)
        try:
            with zipfile.ZipExtFile(reader, "r", info) as member:
                if checked and not whole:
                    member.seek(wanted.start)
                    return member.read(length), False
                # zipfile's reader checks the CRC-32 when it reaches the end.
                parts, position = [], 0
                while piece := member.read(PIECE):
                    low = max(wanted.start - position, 0)
                    high = min(wanted.stop - position, len(piece))
                    if low < high:
                        parts.append(piece[low:high])
                    position += len(piece)
        except zipfile.BadZipFile as error:
            raise self._damaged(key, str(error)) from error
        except (zlib.error, lzma.LZMAError, EOFError) as error:
            raise self._damaged(key, f"its compressed data is damaged ({error})") from error
        if position != info.file_size:
            raise self._damaged(key, f"{position} bytes instead of {info.file_size}")
        return b"".join(parts), True

    # ---------------------------------------------------------------- writes (blocking)

    def _write_blocking(
        self,
        key: str,
        data: bytes,
        *,
        exclusive: bool,
        check_cancelled: CheckCancelled = _no_cancel_check,
        session: _Session | None = None,
    ) -> None:
        validate_key(key)
        # Checksum and compression need no lock: concurrent writes do them in parallel.
        info, header, payload = member_record(key, data, self.compression, self.allowZip64)
        check_cancelled()
        with self._lock:
            current = self._use(session)
            old = current.live(key)
            if exclusive and old is not None:
                return
            # An overwrite leaves the old bytes unlisted (no "Duplicate name", unlike zipfile:
            # the directory lists one member per key), and compaction bounds them.
            start = current.end
            try:
                after = write_all(current.fd, header, start, check_cancelled)
                end = write_all(current.fd, payload, after, check_cancelled)
            except BaseException:
                # Unlisted, and cut off so that no recovery finds a part of it either; if the
                # cut fails, the next member or directory overwrites it.
                with contextlib.suppress(OSError):
                    os.ftruncate(current.fd, start)
                raise
            info.header_offset = start
            current.add(info, after, end)
            if self._should_compact(current):
                # The value is written; a cancellation from here on only stops the rewrite.
                self._rewrite_or_append(current, check_cancelled)

    def _should_compact(self, session: _Session) -> bool:
        """Whether dead bytes (overwritten values, old directories) are worth a rewrite."""
        writer = self._owner or self
        return (
            not writer.read_only
            and session.dead > _COMPACT_FLOOR
            and session.dead > _COMPACT_SHARE * session.end
            and session.dead > session.compact_at
        )

    def _delete_blocking(self, keys: Iterable[str], session: _Session | None = None) -> None:
        with self._lock:
            current = self._use(session)
            for key in keys:
                info = current.live(key)
                if info is not None:
                    current.deleted.add(key)
                    current.dead += _record_size(info)
                    current.dirty = True

    def _append_directory(self, session: _Session) -> None:
        """Make the file a whole archive again: a directory of the store's state at its end."""
        record = directory_record(session.listed(), session.end, session.comment, self.allowZip64)
        try:
            end = write_all(session.fd, record, session.end, _no_cancel_check)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(session.fd, session.end)
            raise
        if os.fstat(session.fd).st_size > end:
            # Left by a write whose cut failed: the directory must end the file.
            os.ftruncate(session.fd, end)
        # The directory before this one is dead now.
        session.dead += session.directory_size
        session.directory_size = end - session.end
        session.end, session.dirty = end, False

    def _rewrite_session(self, session: _Session, check_cancelled: CheckCancelled) -> None:
        """Copy the live members into a new file beside the archive and put it in its place.

        The archive is untouched until the copy is complete and on disk; a failure or a
        cancellation (checked between members and pieces) removes the copy and raises."""
        target = self._target()
        archive = os.fstat(session.fd)
        if archive.st_nlink > 1:
            # zarr's ZipStore writes in place, so every name of the file sees its writes.
            raise RewriteRefused(
                errno.EMLINK,
                f"it has {archive.st_nlink} hard links, and a copy put in its place would leave "
                "the other names on the old file",
                str(target),
            )
        temporary = target.with_name(f"{_REWRITE_MARK}{target.name}.{uuid.uuid4().hex}")
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPENING, 0o600)
        except PermissionError as error:
            raise _refused(target, error) from None
        try:
            if session.locked_by == os.getpid():
                # Locked before it takes the archive's name: no second writer slips in between.
                try_lock(fd)
            _give_copy(fd, archive, target)
            _oscalls.fchmod(fd, temporary, stat.S_IMODE(archive.st_mode))
            infos: list[zipfile.ZipInfo] = []
            offsets: dict[int, int] = {}
            checked: set[int] = set()
            position = 0
            for info in session.listed():
                check_cancelled()
                source = self._data_offset(
                    session, info, lambda n, at: read_exact(session.fd, n, at)
                )
                assert source is not None
                new, header = rewritten_header(info, position)
                after = write_all(fd, header, position, check_cancelled)
                position = self._copy(session.fd, source, info, fd, after, check_cancelled)
                infos.append(new)
                offsets[new.header_offset] = after
                if info.header_offset in session.checked:
                    checked.add(new.header_offset)
            record = directory_record(infos, position, session.comment, self.allowZip64)
            write_all(fd, record, position, check_cancelled)
            # On disk before it replaces the archive: a power cut must not leave neither.
            os.fsync(fd)
            check_cancelled()
            try:
                if _oscalls.OPEN_FILES_MOVE:
                    _oscalls.replace(temporary, target)
                else:
                    copy, fd = fd, -1
                    fd = self._replace_closed(session, copy, temporary, target)
            except PermissionError as error:
                # A folder with the sticky bit (/tmp) and an archive someone else owns.
                raise _refused(target, error) from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        session.replace_file(fd, infos, offsets, checked)

    def _replace_closed(self, session: _Session, copy: int, temporary: Path, target: Path) -> int:
        """Put the copy in place where no open file may be moved or replaced (Windows): the
        copy and the archive are closed first, and opened again after (the old archive, if the
        replace failed), the writer's lock taken again. Gives a descriptor of the new archive;
        ``copy`` is closed."""
        reopen = os.O_RDWR | _OPENING

        def reopened() -> int:
            fd = os.open(target, reopen)
            if session.locked_by == os.getpid():
                try_lock(fd)  # a lock of its own: a dup would share the one close_fd gives up
            return fd

        os.close(copy)
        session.close_fd(session.fd)
        try:
            _oscalls.replace(temporary, target)
        except BaseException:
            session.fd = reopened()
            raise
        # Closed by replace_file, as the old archive's descriptor would be.
        session.fd = os.open(target, reopen)
        return reopened()

    def _rewrite_or_append(self, session: _Session, check_cancelled: CheckCancelled) -> None:
        """A rewrite that the store makes on its own (compaction, close after a delete): where
        the folder refuses it, the file stays as it is (whole: its last directory leaves out
        deleted keys and old copies), the store keeps appending and tries again later; a
        warning says so, once a session. An explicit `rewrite()` raises instead."""
        try:
            self._rewrite_session(session, check_cancelled)
        except RewriteRefused as error:
            session.compact_at = 2 * session.dead
            kind = bool(session.deleted)
            if kind in session.told_refused:
                return
            session.told_refused.add(kind)
            left = (
                f"the bytes of the deleted keys ({len(session.deleted)}) stay in it (its "
                "directory leaves them out)"
                if session.deleted
                else "overwritten values stay in it, unlisted"
            )
            warnings.warn(
                f"{error.filename} was not rewritten: {error.strerror}. So {left}: "
                f"{session.dead} of its {session.end} bytes are dead. The archive is whole and "
                "the store keeps appending (it tries again once the dead bytes doubled, and at "
                "close); to drop them, call rewrite() where the folder is writable.",
                ZipNotRewrittenWarning,
                stacklevel=2,
            )

    def _copy(
        self,
        source: int,
        at: int,
        info: zipfile.ZipInfo,
        target: int,
        to: int,
        check_cancelled: CheckCancelled,
    ) -> int:
        """Copy ``info``'s (compressed) bytes as they are; gives the offset after them."""
        left = info.compress_size
        while left:
            check_cancelled()
            piece = read_exact(source, min(PIECE, left), at)
            if not piece:
                raise self._damaged(info.filename, "the archive ends inside it")
            to = write_all(target, piece, to, check_cancelled)
            at, left = at + len(piece), left - len(piece)
        return to

    def _commit(self, session: _Session, check_cancelled: CheckCancelled) -> None:
        """Make the file hold what the store holds: a directory if anything changed, then a
        rewrite if keys were deleted. If a step fails it raises, and the session still knows
        what is left to do."""
        if session.dirty:
            self._append_directory(session)
        writer = self._owner or self
        if (session.deleted and not writer.read_only) or self._should_compact(session):
            self._rewrite_or_append(session, check_cancelled)

    def _close(self, check_cancelled: CheckCancelled, what: str) -> None:
        owner = self._owner
        if owner is not None and owner._is_open:
            # A copy of an open store: the archive stays open for its owner.
            super().close()
            return
        # Calls in flight would reopen the archive after we closed it: wait for them.
        self._calls.wait_until_idle(f"{self!r}.{what}", check_cancelled)
        with self._lock:
            session = self._session
            if session is not None:
                self._commit(session, check_cancelled)
                self._session = None
                session.close_fd(session.fd)
            super().close()

    # ---------------------------------------------------------------- closing, rewriting, moving

    def close(self) -> None:
        """Close the archive, writing its central directory (and dropping deleted keys).

        Waits for the calls in flight on the store first. If writing fails (a full disk), it
        raises and the store stays open as it was: call ``close()`` again to retry."""
        self._close(_no_cancel_check, "close()")

    async def aclose(self) -> None:
        # Waiting for calls in flight, and writing the directory or rewriting, are blocking:
        # not on the event loop. A cancelled close stops between members and leaves it open.
        await run_in_worker(lambda check_cancelled: self._close(check_cancelled, "aclose()"))

    async def rewrite(self) -> None:
        """Drop deleted keys and overwritten copies from the file now, instead of at close.

        Writing a key twice leaves both copies in the file (the newest is read); after many
        overwrites the file holds dead bytes. ``rewrite()`` copies the live members into a new
        file beside it and replaces the old one once the copy is complete. Where the folder
        does not let this user create or replace files, it raises `RewriteRefused` (a
        `PermissionError`) and the archive stays as it was.
        """
        self._check_writable()
        await self._ensure_open()

        def rewrite(check_cancelled: CheckCancelled) -> None:
            with self._lock:
                self._rewrite_session(self._use(), check_cancelled)

        with self._calls:
            await self._blocking(rewrite)

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> Self:
        store = cls(*args, **kwargs)
        await store._open()
        return store

    async def move(self, path: Path | str) -> None:
        """Write the directory, move the zip file to ``path`` and follow it."""
        destination = Path(path)

        def move(check_cancelled: CheckCancelled) -> None:
            with self._lock:
                session = self._use()
                self._commit(session, check_cancelled)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(self.path, destination)
                self.path = destination
                # A move across filesystems copies: follow the file, not the old inode.
                reading = os.O_RDONLY if self._zmode == "r" else os.O_RDWR
                old, session.fd = session.fd, os.open(destination, reading | _OPENING)
                session.close_fd(old)
                if session.locked_by == os.getpid() and try_lock(session.fd) == "held":
                    session.locked_by = None
                    raise ArchiveLocked(
                        errno.EWOULDBLOCK,
                        f"{destination}: another ZipStore took the file's lock while it moved",
                    )
            self._is_open = True

        with self._calls:
            await self._blocking(move)

    # ---------------------------------------------------------------- backend hooks

    async def _backend_open(self) -> None:
        def open_archive(_: CheckCancelled) -> None:
            with self._lock:
                self._use()

        with self._calls:
            await self._blocking(open_archive)

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        with self._calls:
            return await super()._backend_get(key, prototype, byte_range)

    async def _backend_get_batch(
        self, requests: list[tuple[str, ByteRequest | None]], prototype: BufferPrototype
    ) -> list[Buffer | None]:
        with self._calls:
            return await super()._backend_get_batch(requests, prototype)

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        data = value.to_bytes()
        with self._calls:
            session = self._session
            # A cancelled write stops between pieces and is cut off: the old value stays.
            await self._blocking(
                lambda check_cancelled: self._write_blocking(
                    key,
                    data,
                    exclusive=exclusive,
                    check_cancelled=check_cancelled,
                    session=session,
                )
            )

    async def _backend_delete(self, key: str) -> None:
        with self._calls:
            session = self._session
            await self._blocking(lambda _: self._delete_blocking([key], session))

    async def _backend_delete_dir(self, prefix: str) -> None:
        def delete_under(session: _Session | None) -> None:
            with self._lock:
                keys = [key for key in self._use(session).live_keys() if key.startswith(prefix)]
                self._delete_blocking(keys, session)

        with self._calls:
            session = self._session
            await self._blocking(lambda _: delete_under(session))

    async def _backend_exists(self, key: str) -> bool:
        def exists() -> bool:
            with self._lock:
                return self._use().live(key) is not None

        with self._calls:
            return await self._hops.run(exists)

    async def _backend_getsize(self, key: str) -> int:
        def size() -> int:
            with self._lock:
                info = self._use().live(key)
            if info is None:
                raise FileNotFoundError(key)
            return info.file_size

        with self._calls:
            return await self._hops.run(size)

    def _live_keys(self) -> list[str]:
        with self._lock:
            return self._use().live_keys()

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        with self._calls:
            keys = await self._blocking(lambda _: self._live_keys())
        return [key for key in keys if key.startswith(prefix)]

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        with self._calls:
            keys = await self._blocking(lambda _: self._live_keys())
        return names_under(keys, prefix)

    # ---------------------------------------------------------------- zarr >= 3.4's sync surface
    # Plain blocking calls: zarr may take its synchronous path.
    _serves_sync_io = True

    @contextlib.contextmanager
    def _sync_call(self) -> Iterator[None]:
        with self._calls:
            self._is_open = True
            yield

    def _sync_set(self, key: str, value: Buffer) -> None:
        self._write_blocking(key, value.to_bytes(), exclusive=False)

    def _sync_delete(self, key: str) -> None:
        self._delete_blocking([key])
