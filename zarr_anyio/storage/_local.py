"""LocalStore: a directory tree, drop-in for ``zarr.storage.LocalStore``.

The layout is zarr's: key ``a/b/c`` is the file ``<root>/a/b/c``. Blocking file calls run in
worker threads; short reads are batched several to a hop (see `zarr_anyio._core.threads`).

Never outside the root. Every path is resolved beneath a handle on the root (`._beneath`:
``openat2(RESOLVE_BENEATH)``, or a walk with ``O_NOFOLLOW``), so a symbolic link planted in the
root can lead a key to another place in the root (relative links are followed, as zarr does) but
never out of it: reads give ``None``, writes raise `LeavesRoot`, listings leave such names out,
and deletions remove a link itself, never what it points to. A name that is not a regular file (a
FIFO, a socket, a device) is not a key: it is opened without blocking (``O_NONBLOCK``), or not at
all (``O_PATH``), and treated as absent. Cost: the blocking part of a 4 KiB read went from 3.2 µs
to 4.2 µs (see `._beneath`), mostly opening the root each time, which keeps the store following
its path rather than a folder once seen there.

Reads. A small read whose names and bytes are all in the kernel's caches is made on the event
loop (``RESOLVE_CACHED``, ``RWF_NOWAIT``: ~5 µs, no hop); one that would wait goes to a thread.
A large read goes into a reused buffer (`._buffers`) that zarr wraps as is, in a hop of its own.
Why (zarr's ``arr[:]`` of 512 x 1 MiB chunks on this 2-core machine, instrumented):
zarr's store reads each chunk into fresh memory, 75-100,000 page faults per pass and 170-600 ms
of system time, varying with the allocator's state. Ours did the same (50-72,000 faults, 270-530
ms), and the CPU time those faults added to a read (320-600 µs) sat either side of the 400 µs
at which the hop batching stops: ~340 hops a pass, half with one read and half with two, threads
busy 5-7; with ~60 µs of loop time per read spent in the batching queue. No read was copied twice;
the swing was the faults and the batching. Now: ~260-770 faults, ~190 ms of system time, 512
hops of one read, user time at or below zarr's: ours / zarr 0.64-0.82 (1-D) and 0.43-0.94 (2-D)
over ten runs on both zarr versions. For 4 KiB chunks zarr's own work is ~70-90 µs a chunk (as
measured with its MemoryStore); reads on the loop bring ours to about that, 0.35-0.38 of zarr's
store on a quiet machine (0.4-0.85 when the machine is busy).

Writes. A value goes to a temporary file in the folder ``<root>/.zarr_anyio\\tmp/`` (a short
random name, so any key zarr can write fits the file system's limit on a name) and is renamed
into place, so a reader, a crash or a cancellation sees the old value or the new one. The
folder is removed when no write of this process is using it, so zarr's own LocalStore sees no
trace of ours. A writer holds an ``flock`` on its temporary file; opening a writable store
removes the temporary files of writers that died (no lock: ~one ``scandir`` of that folder, no
tree walk; where the file system has no locks, those untouched for `STALE_AFTER` seconds). The
library's own names hold a backslash, which no key may (`._keys`): no key can collide with them,
and listings leave out every name that holds one (it cannot be a key either). Where a
sub-folder is another file system (the rename would cross devices) the temporary file goes
beside its target instead (a name of ours too); those are not cleaned up on open.

A batch of writes (`_set_many_blocking`, the codec pipeline's) opens the root, the temporary
folder and each key's folder once, not once a key, and makes the temporary folder once: per key
that leaves the file's creation, lock, write and rename, with the single write's path to fall
back on whenever something changed under the batch.

Keys and folders. A key cannot be where a folder of keys is, nor below a key (``x`` and ``x/y``):
such a write raises a `KeyConflict` naming both keys, and changes nothing. A folder that holds no
key is as if it were not there, as in MemoryStore and the object stores: a delete removes the
folders it empties (a writer whose folder vanished under it starts again), `list_dir` leaves out
folders that hold no key (one ``scandir`` per level, stopping at the first key: ~12 µs a
sub-folder, so a ``list_dir`` of 2,000 chunk folders takes 25 ms where it took 1 ms; zarr lists
folders only to find a group's members), and a key of its name replaces a tree of empty
folders. Errors of refused writes and deletes name the root and the key (`._localfs._where`):
the file system's own name a temporary file of ours, or a name relative to some folder.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import anyio
import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer

from zarr_anyio._core.limit import LimiterLike
from zarr_anyio._core.threads import CheckCancelled, run_in_worker

from ._base import NOT_READY, PAGE_SIZE, BlockingStore, Entry, Part, Pending
from ._localfs import (
    ON_LOOP_READ,
    RWF_NOWAIT,
    Folder,
    NoWaitUnsupported,
    Staged,
    delete_file,
    delete_tree,
    is_file,
    list_dir,
    list_prefix,
    move_root,
    no_cancel_check,
    open_value,
    prepare_root,
    read_cached,
    read_file,
    read_file_into_array,
    read_files,
    read_part,
    scan_folder,
    size_of,
    write_file,
    write_files,
)

__all__ = ["LocalStore"]


def _read_at(
    fd: int, length: int, offset: int, _: CheckCancelled
) -> tuple[memoryview, os.stat_result]:
    """``length`` bytes at ``offset``, and the file's status after they were read."""
    data = read_part(fd, length, offset)
    return data, os.fstat(fd)


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    # Not its ctime: a value renamed over (the old file unlinked) changes that, and the bytes
    # read from the old file stay whole.
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


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
            await run_in_worker(lambda _: prepare_root(Path(root), create=False))
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
        """Move the store's folder to ``dest_root`` (which must not exist) and follow it.

        Within one file system this is one rename. Across file systems the folder is copied
        (checking for cancellation between files; a cancelled or failed copy is removed and the
        store stays where it was), then the old folder is removed.
        """
        dest = Path(dest_root)
        source = self.root
        moved: list[bool] = []
        try:
            await self._blocking(lambda check: move_root(source, dest, check, moved))
        finally:
            if moved:
                self.root = dest

    # ------------------------------------------------------------------ backend hooks

    @property
    def _root(self) -> str:
        return os.fspath(self.root)

    async def _backend_open(self) -> None:
        root, create = self.root, not self.read_only
        await run_in_worker(lambda _: prepare_root(root, create=create))

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> bytes | memoryview | None:
        data = read_file(self._root, key, byte_range)
        assert not isinstance(data, int)  # no `into`: the bytes themselves
        if data is not None:
            self._hops.note_bytes(len(data))
        return data

    def _read_into_blocking(self, key: str, into: memoryview) -> int | bytes | memoryview | None:
        return read_file(self._root, key, None, into)

    def _read_into_array_blocking(
        self, key: str, into: np.ndarray[Any, Any]
    ) -> int | bytes | memoryview | None:
        return read_file_into_array(self._root, key, into)

    def _read_many_blocking(
        self, requests: Iterable[tuple[str, np.ndarray[Any, Any] | None]]
    ) -> Generator[int | bytes | memoryview | None, None, None]:
        for data in read_files(self._root, requests):
            if data is not None and not isinstance(data, int):
                self._hops.note_bytes(len(data))
            yield data

    async def _backend_read_parts(
        self, key: str, start: int, size: int, part: int
    ) -> AsyncGenerator[memoryview, None]:
        # One descriptor for all the parts (not one open a part): a value replaced while it
        # is copied is then read whole, the old one, never its first parts and the new one's
        # last.
        root = self._root
        opened = await self._blocking(lambda _: open_value(root, key))
        if opened is None:
            raise FileNotFoundError(key)
        fd, before = opened
        try:
            if before.st_size != size:
                return  # not the value the caller knows: ends short, a change
            while start < size:
                length = min(part, size - start)
                data, after = await self._blocking(functools.partial(_read_at, fd, length, start))
                if not data or _changed(before, after):
                    # Written to in place since it was opened: the parts may mix two values.
                    # Ending short makes the caller give up on it as a value that changed.
                    return
                start += len(data)
                yield data
                del data  # see `AnyioStore._read_parts`
        finally:
            os.close(fd)

    # Small reads whose names and bytes are all cached are made on the event loop (~5 µs,
    # against a hop to a thread); see `read_cached`.
    _reads_on_loop = RWF_NOWAIT is not None

    def _read_nowait(
        self, key: str, byte_range: ByteRequest | None
    ) -> bytes | memoryview | Pending | None:
        if self._hops.mean_bytes() > ON_LOOP_READ:
            return NOT_READY  # reads here have been large: do not try on the loop first
        try:
            data = read_cached(self._root, key, byte_range)
        except NoWaitUnsupported:
            self._reads_on_loop = False  # not on this file system: go to threads from now on
            return NOT_READY
        if data is not None and not isinstance(data, Pending):
            self._hops.note_bytes(len(data))
        return data

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        root = self._root
        view = memoryview(value.as_buffer_like()).cast("B")
        await self._blocking(
            lambda check: write_file(root, key, view, exclusive=exclusive, check_cancelled=check)
        )

    @property
    def _streams_writes(self) -> bool:
        return True

    async def _backend_set_streamed(self, key: str, parts: AsyncIterator[Part]) -> None:
        # Each part into one temporary file as it comes (a thread hop each), which is then put
        # in place as any write's is: a value of any size costs memory for one part.
        root = self._root
        staged = await self._blocking(lambda _: Staged(root))
        try:
            async for part in parts:
                # Handed to the thread in a box that the write empties, and let go of here, so
                # that once written nothing refers to the part and the next one (read next, as
                # the loop asks for it) takes its slot of the read pool: the thread's call would
                # otherwise hold it until the thread next runs, after this loop may have asked.
                given = [memoryview(part).cast("B")]
                del part
                await self._blocking(lambda check: staged.write(given.pop(), check))  # noqa: B023
            await self._blocking(
                lambda check: write_file(
                    root,
                    key,
                    memoryview(b""),
                    exclusive=False,
                    check_cancelled=check,
                    staged=staged,
                )
            )
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_worker(lambda _: staged.close())

    _sets_blocking = True

    def _set_blocking(self, key: str, value: memoryview, check_cancelled: CheckCancelled) -> None:
        write_file(self._root, key, value, exclusive=False, check_cancelled=check_cancelled)

    def _delete_key_blocking(self, key: str) -> None:
        delete_file(self._root, key)

    def _set_many_blocking(
        self, items: Iterable[tuple[str, memoryview | None]], check_cancelled: CheckCancelled
    ) -> None:
        write_files(self._root, items, check_cancelled)

    async def _backend_delete(self, key: str) -> None:
        root = self._root
        await self._blocking(lambda _: delete_file(root, key))

    async def _backend_exists(self, key: str) -> bool:
        root = self._root
        result: bool = await self._hops.run(lambda: is_file(root, key))
        return result

    async def _backend_getsize(self, key: str) -> int:
        root = self._root
        size: int = await self._hops.run(lambda: size_of(root, key))
        return size

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        root = self._root
        return await self._blocking(lambda _: list_prefix(root, prefix))

    async def _backend_list_pages(self, prefix: str) -> AsyncGenerator[list[Entry], None]:
        # Depth first, so what waits in memory is the folders not yet read, not their keys. Each
        # folder is read as the store lists (`scan_folder`): never through a link out of the root.
        root = os.fspath(self.root)
        pending: list[Folder] = [(prefix, frozenset())]
        while pending:
            folder = pending.pop()
            files, folders = await self._blocking(lambda _: scan_folder(root, folder))  # noqa: B023
            pending.extend(reversed(folders))
            entries: list[Entry] = list(files)
            for start in range(0, len(entries), PAGE_SIZE):
                yield entries[start : start + PAGE_SIZE]

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        root = self._root
        return await self._blocking(lambda _: list_dir(root, prefix))

    async def _backend_delete_dir(self, prefix: str) -> None:
        root = self._root
        await self._blocking(lambda check: delete_tree(root, prefix.rstrip("/"), check))

    # ------------------------------------------------------------ zarr >= 3.4's sync surface
    # Plain blocking calls: zarr may take its synchronous path.
    _serves_sync_io = True

    @contextlib.contextmanager
    def _sync_call(self) -> Iterator[None]:
        if not self._is_open:
            prepare_root(self.root, create=not self.read_only)
            self._is_open = True
        yield

    def _sync_set(self, key: str, value: Buffer) -> None:
        view = memoryview(value.as_buffer_like()).cast("B")
        write_file(self._root, key, view, exclusive=False, check_cancelled=no_cancel_check)

    def _sync_delete(self, key: str) -> None:
        delete_file(self._root, key)
