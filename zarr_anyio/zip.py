"""ZipStore: a whole hierarchy in one zip file, drop-in for ``zarr.storage.ZipStore``.

``zipfile`` is blocking and not safe for concurrent use, so every call into it runs in a worker
thread under the store's limiter and one lock. Reads of stored (uncompressed) members need the
lock only to look the member up and open a file handle of their own: the bytes themselves are
read outside it, so such reads run concurrently, and a member's bytes are never moved or
rewritten while it is listed in the archive. A zip cannot delete a member in place: a deleted key
is hidden at once and the archive is rewritten without it when the store closes.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Self

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from ._base import NOT_READY, BlockingStore, Pending
from ._keys import byte_range_slice, check_byte_range, names_under, validate_key
from ._limit import LimiterLike
from ._threads import run_in_worker

__all__ = ["ZipStore"]

ZipStoreAccessModeLiteral = Literal["r", "w", "a", "x"]

# A member's local header: fixed part, then the name and the extra field (PKWARE APPNOTE 4.3.7).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
# Linux's "read only what is in the page cache, else fail at once" flag; None elsewhere.
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _read_cached(handle: int, length: int, offset: int) -> bytes | None:
    """``length`` bytes at ``offset`` if they are all in the page cache, else ``None``."""
    assert _RWF_NOWAIT is not None
    buffer = bytearray(length)
    try:
        read = os.preadv(handle, [buffer], offset, _RWF_NOWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    return bytes(buffer) if read == length else None


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
        appends, so entries already written are kept.
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
        self._init_archive_state()

    def _init_archive_state(self) -> None:
        self._lock = threading.RLock()
        self._zf: zipfile.ZipFile | None = None
        # Keys deleted since the archive was opened: hidden now, dropped when it is rewritten.
        self._deleted: set[str] = set()
        # Where each stored member's bytes start, by the member's header offset.
        self._data_offsets: dict[int, int] = {}
        # A read-only handle for reads made on the event loop from the page cache (Linux).
        self._cached_reads_handle: int | None = None

    # ---------------------------------------------------------------- identity and pickling

    def __str__(self) -> str:
        return f"zip://{self.path}"

    def __repr__(self) -> str:
        return f"ZipStore('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.path == other.path

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = super().__getstate__()
        for name in ("_lock", "_zf", "_deleted", "_data_offsets", "_cached_reads_handle"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Opened on first use: a copy that is never used must not touch the file.
        self._init_archive_state()

    def __del__(self) -> None:
        handle = getattr(self, "_cached_reads_handle", None)
        if handle is not None:
            self._cached_reads_handle = None
            os.close(handle)
        if getattr(self, "_zf", None) is not None and not self.read_only:
            warnings.warn(
                f"{self!r} was not closed: closing it now to write the zip's central directory. "
                "Close a writable ZipStore (close(), `with`, `async with`) when done with it.",
                ResourceWarning,
                stacklevel=2,
            )
            with contextlib.suppress(Exception):
                self.close()

    # ---------------------------------------------------------------- the archive (blocking)

    def _archive(self) -> zipfile.ZipFile:
        """The open ``ZipFile``, opened on first use; call with the lock held."""
        if self._zf is not None:
            return self._zf
        mode = self._zmode
        if mode == "a" and self.path.exists() and not zipfile.is_zipfile(self.path):
            # zipfile would append a new archive to whatever the file is: refuse, touch nothing.
            raise zipfile.BadZipFile(f"{self.path} is not a zip file (or is damaged)")
        archive = zipfile.ZipFile(
            self.path, mode=mode, compression=self.compression, allowZip64=self.allowZip64
        )
        try:
            for name in archive.NameToInfo:
                if not name.endswith("/"):
                    validate_key(name)
        except ValueError as error:
            archive.close()
            raise ValueError(
                f"{self.path} holds a member that is not a safe key: {error}"
            ) from None
        if self._zmode in ("w", "x"):
            self._zmode = "a"
        if _RWF_NOWAIT is not None:
            self._cached_reads_handle = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._zf = archive
        return archive

    def _close_archive(self) -> None:
        """Close the ``ZipFile`` (writing its central directory); call with the lock held."""
        handle, self._cached_reads_handle = self._cached_reads_handle, None
        if handle is not None:
            os.close(handle)
        archive, self._zf = self._zf, None
        if archive is not None:
            archive.close()

    def _member(self, key: str) -> zipfile.ZipInfo | None:
        """The newest member named ``key``, unless deleted; call with the lock held."""
        if key in self._deleted:
            return None
        return self._archive().NameToInfo.get(key)

    def _live_keys(self) -> list[str]:
        with self._lock:
            names = self._archive().NameToInfo
            return [n for n in names if not n.endswith("/") and n not in self._deleted]

    def _data_offset(
        self, info: zipfile.ZipInfo, read: Callable[[int, int], bytes | None]
    ) -> int | None:
        """Where ``info``'s bytes start, remembered; the first time, its local header is read
        with ``read(length, offset)``, and if that gives ``None`` so does this."""
        offset = self._data_offsets.get(info.header_offset)
        if offset is not None:
            return offset
        header = read(_LOCAL_HEADER.size, info.header_offset)
        if header is None:
            return None
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_HEADER_MAGIC:
            raise zipfile.BadZipFile(f"{self.path}: bad local header for {info.filename!r}")
        name_length, extra_length = fields[-2], fields[-1]
        offset = int(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        self._data_offsets[info.header_offset] = offset
        return offset

    def _read_nowait(
        self, key: str, byte_range: ByteRequest | None
    ) -> bytes | Literal[Pending.NOT_READY] | None:
        # On the event loop: never wait for the lock or the disk, fall back to a thread instead.
        handle = self._cached_reads_handle
        if handle is None or not self._lock.acquire(blocking=False):
            return NOT_READY
        try:
            info = self._member(key)
            if info is None:
                return None
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                return NOT_READY
            offset = self._data_offset(info, lambda length, at: _read_cached(handle, length, at))
            if offset is None:
                return NOT_READY
            wanted = byte_range_slice(byte_range, info.file_size)
            data = _read_cached(handle, wanted.stop - wanted.start, offset + wanted.start)
            return NOT_READY if data is None else data
        finally:
            self._lock.release()

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        with self._lock:
            info = self._member(key)
            if info is None:
                return None
            wanted = byte_range_slice(byte_range, info.file_size)
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                # Compressed (or encrypted): zipfile decompresses up to the range and no further.
                with self._archive().open(info) as member:
                    member.seek(wanted.start)
                    return member.read(wanted.stop - wanted.start)
            # A handle of our own, so the bytes can be read outside the lock and survive a
            # close or a rewrite (which replaces the file, not the inode this handle reads).
            handle = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                offset = self._data_offset(info, lambda length, at: os.pread(handle, length, at))
            except BaseException:
                os.close(handle)
                raise
            # pread waits for the disk rather than give up, so the offset is known.
            assert offset is not None
            start = offset + wanted.start
        try:
            return os.pread(handle, wanted.stop - wanted.start, start)
        finally:
            os.close(handle)

    def _write_blocking(self, key: str, data: bytes, *, exclusive: bool) -> None:
        with self._lock:
            if exclusive and self._member(key) is not None:
                return
            info = zipfile.ZipInfo(key, date_time=time.localtime(time.time())[:6])
            info.compress_type = self.compression
            info.external_attr = 0o644 << 16
            archive = self._archive()
            # zipfile warns "Duplicate name" on a rewrite, as zarr's ZipStore does; a key
            # deleted here before is being written again, which is no surprise to warn about.
            with warnings.catch_warnings():
                if key in self._deleted:
                    warnings.simplefilter("ignore", UserWarning)
                archive.writestr(info, data)
            if archive.fp is not None:
                archive.fp.flush()  # so handles of our own see the bytes
            self._deleted.discard(key)

    def _delete_blocking(self, keys: Iterable[str]) -> None:
        with self._lock:
            names = self._archive().NameToInfo
            self._deleted.update(key for key in keys if key in names)

    def _rewrite_blocking(self) -> None:
        """Write the archive anew with only the newest copy of each live key, then swap it in."""
        with self._lock:
            archive = self._archive()
            keys = [k for k in archive.NameToInfo if not k.endswith("/") and k not in self._deleted]
            temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.rewrite")
            try:
                with zipfile.ZipFile(
                    temporary, "w", compression=self.compression, allowZip64=self.allowZip64
                ) as fresh:
                    for key in keys:
                        old = archive.NameToInfo[key]
                        new = zipfile.ZipInfo(key, date_time=old.date_time)
                        new.compress_type = old.compress_type
                        new.external_attr = old.external_attr
                        fresh.writestr(new, archive.read(old))
                self._close_archive()
                os.replace(temporary, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
            self._deleted.clear()
            self._data_offsets.clear()
            self._zmode = "a"

    def close(self) -> None:
        """Close the archive, writing its central directory (and dropping deleted keys)."""
        with self._lock:
            if self._zf is not None:
                try:
                    if self._deleted and not self.read_only:
                        self._rewrite_blocking()
                finally:
                    self._close_archive()
            super().close()

    async def aclose(self) -> None:
        # Writing the central directory, or rewriting, is file I/O: not on the event loop.
        await run_in_worker(lambda _: self.close())

    async def rewrite(self) -> None:
        """Drop deleted keys and overwritten copies from the file now, instead of at close.

        Writing a key twice leaves both copies in the file (the newest is read); after many
        overwrites the file holds dead bytes. ``rewrite()`` copies the live members into a new
        file beside it and replaces the old one.
        """
        self._check_writable()
        await self._ensure_open()
        await self._blocking(lambda _: self._rewrite_blocking())

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> Self:
        store = cls(*args, **kwargs)
        await store._open()
        return store

    async def move(self, path: Path | str) -> None:
        """Move the zip file to ``path`` and follow it."""
        destination = Path(path)

        def move() -> None:
            with self._lock:
                self.close()
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, destination)
                self.path = destination
                self._archive()
                self._is_open = True

        await self._blocking(lambda _: move())

    # ---------------------------------------------------------------- backend hooks

    async def _backend_open(self) -> None:
        def open_archive() -> None:
            with self._lock:
                self._archive()

        await self._blocking(lambda _: open_archive())

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        data = value.to_bytes()
        # No cancellation check inside: a write either completes or never starts, so the
        # archive's structure is never left half-written.
        await self._blocking(lambda _: self._write_blocking(key, data, exclusive=exclusive))

    async def _backend_delete(self, key: str) -> None:
        await self._blocking(lambda _: self._delete_blocking([key]))

    async def _backend_delete_dir(self, prefix: str) -> None:
        def delete_under() -> None:
            with self._lock:
                self._delete_blocking([k for k in self._live_keys() if k.startswith(prefix)])

        await self._blocking(lambda _: delete_under())

    async def _backend_exists(self, key: str) -> bool:
        def exists() -> bool:
            with self._lock:
                return self._member(key) is not None

        return await self._hops.run(exists)

    async def _backend_getsize(self, key: str) -> int:
        def size() -> int:
            with self._lock:
                info = self._member(key)
            if info is None:
                raise FileNotFoundError(key)
            return info.file_size

        return await self._hops.run(size)

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        keys = await self._blocking(lambda _: self._live_keys())
        return [key for key in keys if key.startswith(prefix)]

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        return names_under(await self._blocking(lambda _: self._live_keys()), prefix)

    # ---------------------------------------------------------------- zarr >= 3.4's sync surface

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        validate_key(key)
        check_byte_range(byte_range)
        self._is_open = True
        data = self._read_blocking(key, byte_range)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_writable()
        validate_key(key)
        self._check_value(value)
        self._is_open = True
        self._write_blocking(key, value.to_bytes(), exclusive=False)

    def delete_sync(self, key: str) -> None:
        self._check_writable()
        validate_key(key)
        self._is_open = True
        self._delete_blocking([key])
