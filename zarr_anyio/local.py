"""LocalStore: a directory tree, drop-in for ``zarr.storage.LocalStore``.

The layout is zarr's: key ``a/b/c`` is the file ``<root>/a/b/c``. Blocking file calls run in
worker threads; short reads are batched several to a hop (see `._threads`). A write goes to a
temporary file beside its target and is renamed over it, so a reader, a crash or a cancellation
sees the old value or the new one, never part of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from ._base import BlockingStore
from ._keys import byte_range_slice, check_byte_range, validate_key
from ._limit import LimiterLike
from ._threads import run_in_worker

__all__ = ["LocalStore", "check_root"]

# Temporary files of writes in progress start with this, and listings leave them out.
TEMP_MARK = ".__zarr_anyio_tmp__."
# A write checks for cancellation between pieces of this size.
WRITE_PIECE = 1 << 20
# The blocking write of one piece; a module attribute so tests can stand in for the disk.
_write_piece: Callable[[int, memoryview], int] = os.write


def _no_cancel_check() -> None:
    """Used by the sync surface, which has no host task to be cancelled."""


# ---------------------------------------------------------------- blocking helpers (threads)


def _read_file(path: str, byte_range: ByteRequest | None) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        wanted = byte_range_slice(byte_range, info.st_size)
        length = wanted.stop - wanted.start
        data = os.pread(fd, length, wanted.start)
        # A regular file is read whole in one call unless it changed under us; finish it.
        while len(data) < length:
            more = os.pread(fd, length - len(data), wanted.start + len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _write_file(
    path: Path, value: memoryview, *, exclusive: bool, check_cancelled: Callable[[], None]
) -> None:
    if exclusive and path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{TEMP_MARK}{path.name}.{uuid.uuid4().hex}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            written = 0
            while written < len(value):
                written += _write_piece(fd, value[written : written + WRITE_PIECE])
                check_cancelled()
        finally:
            os.close(fd)
        if exclusive:
            try:
                # link, unlike rename, fails if the target exists: creation is atomic.
                os.link(temp, path)
            except FileExistsError:
                return
        else:
            os.replace(temp, path)
    finally:
        # After replace the temporary name is gone; after link or a failure it is not.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _delete_file(path: Path) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (IsADirectoryError, PermissionError):
        # A key that names a folder is not a key: delete never removes a whole folder.
        if not path.is_dir():
            raise


def _is_file(path: Path) -> bool:
    return path.is_file()


def _size_of(path: Path) -> int:
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(str(path)) from None
    if not stat.S_ISREG(info.st_mode):
        raise FileNotFoundError(str(path))
    return info.st_size


def _walk_files(folder: str, key_prefix: str, out: list[str]) -> None:
    try:
        entries = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            if entry.name.startswith(TEMP_MARK):
                continue
            if entry.is_dir(follow_symlinks=False):
                _walk_files(entry.path, f"{key_prefix}{entry.name}/", out)
            elif entry.is_file():
                out.append(f"{key_prefix}{entry.name}")


def _list_prefix(root: Path, prefix: str) -> list[str]:
    """Keys that start with ``prefix`` as a string: ``"a/b"`` takes in ``"a/bc/0"`` too."""
    folder, _, stem = prefix.rpartition("/")
    key_prefix = f"{folder}/" if folder else ""
    keys: list[str] = []
    try:
        entries = os.scandir(root / folder)
    except (FileNotFoundError, NotADirectoryError):
        return keys
    with entries:
        for entry in entries:
            if entry.name.startswith(TEMP_MARK) or not entry.name.startswith(stem):
                continue
            if entry.is_dir(follow_symlinks=False):
                _walk_files(entry.path, f"{key_prefix}{entry.name}/", keys)
            elif entry.is_file():
                keys.append(f"{key_prefix}{entry.name}")
    return keys


def _list_dir(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(TEMP_MARK))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_tree(folder: str) -> None:
    # Gone already, or a file: no keys lie under it either way.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        shutil.rmtree(folder)


def _delete_tree(root: Path, prefix: str) -> None:
    if prefix:
        _remove_tree(os.path.join(root, prefix))
        return
    # The whole store: empty the root but keep it, so the store stays open.
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
        else:
            _delete_file(Path(entry.path))


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


def _prepare_root(root: Path, *, create: bool) -> None:
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            # A file in the way, at the root or above it.
            check_root(root)
            raise
    else:
        check_root(root)


class LocalStore(BlockingStore):
    """Store for the local file system.

    Parameters
    ----------
    root
        Directory to use as the root of the store; created on open (or first write) unless
        the store is read-only.
    read_only
        Refuse every write.
    max_concurrency, limiter
        How many file operations may be in flight at once (see `AnyioStore`).
    """

    root: Path

    def __init__(
        self,
        root: Path | str,
        *,
        read_only: bool = False,
        max_concurrency: int | None = None,
        limiter: LimiterLike | None = None,
    ) -> None:
        super().__init__(read_only=read_only, max_concurrency=max_concurrency, limiter=limiter)
        if isinstance(root, str):
            root = Path(root)
        if not isinstance(root, Path):
            raise TypeError(
                "'root' must be a string or Path instance. "
                f"Got an instance of {type(root)} instead."
            )
        self.root = root

    @classmethod
    async def open(
        cls,
        root: Path | str,
        *,
        read_only: bool = False,
        mode: str | None = None,
        **kwargs: Any,
    ) -> Self:
        """Create and open the store; ``mode="r"`` or ``"r+"`` requires the root to exist."""
        # As zarr's LocalStore: mode decides whether opening may create the root, read_only
        # decides what the returned store may do.
        must_exist = mode in ("r", "r+") if mode is not None else read_only
        if must_exist:
            await run_in_worker(lambda _: _prepare_root(Path(root), create=False))
        store = cls(root, read_only=read_only, **kwargs)
        await store._open()
        return store

    def with_read_only(self, read_only: bool = False) -> Self:
        return type(self)(self.root, read_only=read_only, **self._store_kwargs())

    def __str__(self) -> str:
        return f"file://{self.root.as_posix()}"

    def __repr__(self) -> str:
        return f"LocalStore('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.root == other.root

    async def move(self, dest_root: Path | str) -> None:
        """Move the store's folder to ``dest_root`` (which must not exist) and follow it."""
        dest = Path(dest_root)

        def move() -> None:
            if dest.exists():
                raise FileExistsError(f"Destination root {dest} already exists.")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.root, dest)

        await self._blocking(lambda _: move())
        self.root = dest

    # ------------------------------------------------------------------ backend hooks

    async def _backend_open(self) -> None:
        root, create = self.root, not self.read_only
        await run_in_worker(lambda _: _prepare_root(root, create=create))

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        return _read_file(os.path.join(self.root, key), byte_range)

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        path = self.root / key
        view = memoryview(value.as_buffer_like()).cast("B")
        await self._blocking(
            lambda check: _write_file(path, view, exclusive=exclusive, check_cancelled=check)
        )

    async def _backend_delete(self, key: str) -> None:
        path = self.root / key
        await self._blocking(lambda _: _delete_file(path))

    async def _backend_exists(self, key: str) -> bool:
        path = self.root / key
        result: bool = await self._hops.run(lambda: _is_file(path))
        return result

    async def _backend_getsize(self, key: str) -> int:
        path = self.root / key
        size: int = await self._hops.run(lambda: _size_of(path))
        return size

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        root = self.root
        return await self._blocking(lambda _: _list_prefix(root, prefix))

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        folder = self.root / prefix
        return await self._blocking(lambda _: _list_dir(folder))

    async def _backend_delete_dir(self, prefix: str) -> None:
        root = self.root
        await self._blocking(lambda _: _delete_tree(root, prefix.rstrip("/")))

    # ------------------------------------------------------------ zarr >= 3.4's sync surface
    # Plain blocking calls: zarr may take its synchronous path.
    _serves_sync_io = True

    def _ensure_open_sync(self) -> None:
        if not self._is_open:
            _prepare_root(self.root, create=not self.read_only)
            self._is_open = True

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        validate_key(key)
        check_byte_range(byte_range)
        self._ensure_open_sync()
        data = _read_file(os.path.join(self.root, key), byte_range)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_writable()
        validate_key(key)
        self._check_value(value)
        self._ensure_open_sync()
        view = memoryview(value.as_buffer_like()).cast("B")
        _write_file(self.root / key, view, exclusive=False, check_cancelled=_no_cancel_check)

    def delete_sync(self, key: str) -> None:
        self._check_writable()
        validate_key(key)
        self._ensure_open_sync()
        _delete_file(self.root / key)
