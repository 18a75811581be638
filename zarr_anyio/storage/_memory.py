"""MemoryStore: a dict of buffers, drop-in for ``zarr.storage.MemoryStore``.

Across processes: like zarr's, a MemoryStore pickles its dict, so a copy in another process (a
dask.distributed worker, a multiprocessing pool) holds a snapshot of the data. zarr lets that
copy be written, and every write is lost without a word (measured with zarr's store: 0 of
120,000 chunk writes made by two worker processes reached the client's store). Here the copy
reads the snapshot as zarr's does, and refuses every write with an error that says why: the
data lives in one process. Pickling itself is left alone, since copies in the same process
(``copy.deepcopy``, zarr's own tests) behave as before.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from zarr_anyio._core.fork import at_fork_in_child
from zarr_anyio._core.limit import LimiterLike

from . import _live
from ._base import AnyioStore
from ._keys import byte_range_slice, names_under

__all__ = ["MemoryStore"]


# Held between "is the key there?" and "put it there" of set_if_not_exists: the same dict can be
# written from several threads and event loops at once (zarr's loop thread, the caller's loop),
# and copying a large value between the two steps left room for two or three winners. One lock
# for every MemoryStore, because two stores can share one dict; only exclusive writes take it.
_EXCLUSIVE_WRITE = threading.Lock()


def _renew_exclusive_write() -> None:
    global _EXCLUSIVE_WRITE
    _EXCLUSIVE_WRITE = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_exclusive_write)


def _copy(value: Buffer) -> Buffer:
    # An uncompressed chunk can be a view of the caller's array; keep a copy, not an alias.
    return type(value).from_bytes(value.to_bytes())


class MemoryStore(AnyioStore):
    """Store for local memory: keys map to buffers in ``store_dict``.

    Parameters
    ----------
    store_dict
        The mapping to keep data in; shared with the caller when given.
    read_only
        Refuse every write.
    max_concurrency, limiter
        As for every zarr_anyio store; a memory store never waits for I/O, so these only matter
        for a limiter shared with other stores.
    """

    _store_dict: MutableMapping[str, Buffer]

    def __init__(
        self,
        store_dict: MutableMapping[str, Buffer] | None = None,
        *,
        read_only: bool = False,
        max_concurrency: int | None = None,
        limiter: LimiterLike | None = None,
    ) -> None:
        super().__init__(read_only=read_only, max_concurrency=max_concurrency, limiter=limiter)
        self._store_dict = {} if store_dict is None else store_dict
        # The process whose dict this is: a pickled copy elsewhere holds a snapshot.
        self._pid = os.getpid()
        # open_store(str(store)) reaches this dict again while a store over it lives.
        _live.remember(str(self), self)

    def with_read_only(self, read_only: bool = False) -> MemoryStore:
        copy = type(self)(self._store_dict, read_only=read_only, **self._store_kwargs())
        copy._pid = self._pid
        return copy

    def _over_same_data(self, read_only: bool, options: dict[str, Any]) -> MemoryStore:
        return type(self)(self._store_dict, read_only=read_only, **options)

    def _check_writable(self) -> None:
        super()._check_writable()
        if self._pid != os.getpid():
            raise RuntimeError(
                f"{self!r} is a copy, in process {os.getpid()}, of a MemoryStore of process "
                f"{self._pid} (pickled to get here, as dask.distributed and multiprocessing "
                "do): a write to it would never reach that store, so it is refused. Write "
                "from the process that holds the store, or use a store that processes share "
                "(LocalStore, an object store)."
            )

    def __str__(self) -> str:
        return f"memory://{id(self._store_dict)}"

    def __repr__(self) -> str:
        return f"MemoryStore('{self}')"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, type(self))
            and self._store_dict == other._store_dict
            and self.read_only == other.read_only
        )

    # A dict lookup never blocks: each call is one checkpoint, so a caller can still be cancelled.

    def _read(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        value = self._store_dict.get(key)
        if value is None:
            return None
        return prototype.buffer.from_buffer(value[byte_range_slice(byte_range, len(value))])

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        await anyio.lowlevel.checkpoint()
        return self._read(key, prototype, byte_range)

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        await anyio.lowlevel.checkpoint()
        if not exclusive:
            self._store_dict[key] = _copy(value)
        elif key not in self._store_dict:
            copy = _copy(value)  # outside the lock: it can take a while
            with _EXCLUSIVE_WRITE:
                if key not in self._store_dict:
                    self._store_dict[key] = copy

    async def _backend_delete(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._store_dict.pop(key, None)

    async def _backend_exists(self, key: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return key in self._store_dict

    async def _backend_getsize(self, key: str) -> int:
        await anyio.lowlevel.checkpoint()
        try:
            return len(self._store_dict[key])
        except KeyError:
            raise FileNotFoundError(key) from None

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        await anyio.lowlevel.checkpoint()
        # A snapshot, so a caller may delete while iterating.
        return [key for key in list(self._store_dict) if key.startswith(prefix)]

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        await anyio.lowlevel.checkpoint()
        return names_under(list(self._store_dict), prefix)

    async def _backend_delete_dir(self, prefix: str) -> None:
        await anyio.lowlevel.checkpoint()
        for key in [key for key in self._store_dict if key.startswith(prefix)]:
            del self._store_dict[key]

    # ------------------------------------------------------------ zarr >= 3.4's sync surface
    # Plain blocking calls: zarr may take its synchronous path.
    _serves_sync_io = True

    def _sync_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        return self._read(key, prototype, byte_range)

    def _sync_set(self, key: str, value: Buffer) -> None:
        self._store_dict[key] = _copy(value)

    def _sync_delete(self, key: str) -> None:
        self._store_dict.pop(key, None)
