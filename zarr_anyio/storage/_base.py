"""The store base every zarr_anyio store builds on.

`AnyioStore` is a ``zarr.abc.store.Store`` that does, once for all backends, what is not
particular to a backend: opening, read-only enforcement, key and byte-range validation, the
concurrency limit, and the bulk operations (each a pool of at most ``max_concurrency`` worker
tasks in one task group, pulling from the request iterator). A backend fills in a handful of
``_backend_*`` hooks that receive input already validated.

The hooks are the extension API for stores outside this library too (docs/custom-stores.md,
tested with `zarr_anyio.testing`). They keep their underscore: public names would put, on every
store, calls that skip key validation, the read-only check and opening.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from contextlib import aclosing, asynccontextmanager, contextmanager
from itertools import islice
from typing import Any, Literal, Self, TypeVar

import anyio
import anyio.lowlevel
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from zarr_anyio._core.api_scope import in_api_call, tracked
from zarr_anyio._core.bridge import run_blocking
from zarr_anyio._core.errors import single_error
from zarr_anyio._core.limit import ConcurrencyLimit, Limiter, LimiterLike, OneLoopLimiter
from zarr_anyio._core.threads import CheckCancelled, HopCoalescer, run_in_worker, timed

from ._keys import check_byte_range, directory_prefix, validate_key, validate_prefix
from ._scatter import fill_from

__all__ = [
    "PAGE_SIZE",
    "AnyioStore",
    "BlockingStore",
    "Entry",
    "FetchRequest",
    "Part",
]

T = TypeVar("T")


class Pending(enum.Enum):
    NOT_READY = enum.auto()


NOT_READY = Pending.NOT_READY
"""What `BlockingStore._read_nowait` gives when a read would block: make it in a thread."""

PAGE_SIZE = 1000
"""Keys per page of `AnyioStore._backend_list_pages`: S3's own page size, and what one
worker-thread hop takes of a local folder."""

Entry = tuple[str, int | None]
"""A key and its size in bytes (``None`` where the backend does not say)."""

FetchRequest = str | tuple[str, ByteRequest | None]
"""What `AnyioStore.fetch_many` takes per item: a key, or a key and a byte range."""

Part = bytes | memoryview
"""A part of a value written in parts (`AnyioStore._set_streamed`): bytes, or a view of a part
as it was read (`AnyioStore._read_parts`)."""


def _as_request(item: FetchRequest) -> tuple[str, ByteRequest | None]:
    if isinstance(item, str):
        return item, None
    key, byte_range = item
    return key, byte_range


class AnyioStore(Store, abc.ABC):
    """A zarr store whose I/O is bounded by a limiter and written against anyio.

    Parameters
    ----------
    read_only
        Refuse every write with zarr's ``ValueError``.
    max_concurrency
        How many backend operations may be in flight at once (default 32), across every event
        loop and thread that uses the store.
    limiter
        A `Limiter` to draw tokens from instead, shared with other stores (one budget for all
        of them, across loops and threads). An ``anyio.CapacityLimiter`` is accepted too, but
        works only in the event loop that first uses it.

    Notes
    -----
    To write a store, subclass this (an async backend), `BlockingStore` (blocking calls, made
    in worker threads) or `RemoteStore` (requests to a server, with retries) and fill in the
    ``_backend_*`` hooks. Each hook that does I/O holds a token of ``self.limiter`` while it
    does (``async with self.limiter:``; `BlockingStore._blocking` and `RemoteStore._request`
    do it for you). Then give the store ``with_read_only``, ``__eq__`` and ``__str__``, and
    test it with `zarr_anyio.testing.AnyioStoreTests`.
    """

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_listing: bool = True
    # zarr 3.1.0's Store still declares partial writes abstract (3.1.1 dropped them); no zarr_anyio
    # store writes part of a value, as none of zarr's own do any more.
    supports_partial_writes: Literal[False] = False

    def __init__(
        self,
        *,
        read_only: bool = False,
        max_concurrency: int | None = None,
        limiter: LimiterLike | None = None,
    ) -> None:
        super().__init__(read_only=read_only)
        self._limit = ConcurrencyLimit(max_concurrency, limiter)

    # ----------------------------------------------------------------- state and identity

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_is_open"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _store_kwargs(self) -> dict[str, Any]:
        """Constructor keywords that keep this store's concurrency settings (for copies)."""
        if self._limit.shared is not None:
            return {"limiter": self._limit.shared}
        return {"max_concurrency": self._limit.total_tokens}

    def _over_same_data(self, read_only: bool, options: dict[str, Any]) -> AnyioStore:
        """Another store over this one's data, made with ``options`` (this store's own settings
        where there are none): what `open_store` gives for ``str(store)`` while this store is
        alive in the process and its name alone cannot reach its data (see ``_live``)."""
        raise TypeError(f"cannot open another store over the data of {self!r}")

    @property
    def max_concurrency(self) -> int:
        """How many backend operations may be in flight at once."""
        return self._limit.total_tokens

    @property
    def limiter(self) -> Limiter | OneLoopLimiter:
        """The limiter every operation of this store holds a token of (the same one on every
        event loop); read its ``statistics()`` to watch the store."""
        return self._limit.current()

    async def __aenter__(self) -> Self:
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store without blocking the event loop (``close()`` may write, as a zip's)."""
        self.close()

    async def _ensure_open(self) -> None:
        # Concurrent first calls may all get here; opening is idempotent, and going through
        # `_open` would make all but the first fail with "store is already open".
        if not self._is_open:
            await self._backend_open()
            self._is_open = True

    async def _open(self) -> None:
        if self._is_open:
            raise ValueError("store is already open")
        await self._backend_open()
        self._is_open = True

    # ----------------------------------------------------------------- backend hooks

    async def _backend_open(self) -> None:
        """Make the store ready (create or check its root); called once, idempotent."""

    @abc.abstractmethod
    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        """The value of ``key`` (the part ``byte_range`` asks for, as `byte_range_slice` cuts
        it) in a ``prototype.buffer``; ``None`` if the key does not exist."""

    @abc.abstractmethod
    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        """Write ``value``; with ``exclusive``, leave an existing value as it is."""

    @abc.abstractmethod
    async def _backend_delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    @abc.abstractmethod
    async def _backend_exists(self, key: str) -> bool:
        """Whether ``key`` holds a value."""

    @abc.abstractmethod
    async def _backend_getsize(self, key: str) -> int:
        """The size of ``key`` in bytes; ``FileNotFoundError`` if it does not exist."""

    @abc.abstractmethod
    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        """Every key that starts with ``prefix`` (a plain string prefix)."""

    @abc.abstractmethod
    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        """The names directly under ``prefix`` (``""`` or ending in ``/``), keys and folders."""

    async def _backend_delete_dir(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (``""`` or ending in ``/``)."""
        keys = list(await self._backend_list_prefix(prefix))
        await self._for_each(keys, self._backend_delete)

    async def _backend_list_pages(self, prefix: str) -> AsyncGenerator[list[Entry], None]:
        """Every key under ``prefix`` (``""`` or ending in ``/``) with its size in bytes, a page
        of at most `PAGE_SIZE` at a time: what the command's copy, ``ls`` and ``info`` walk.

        This default takes the whole listing from ``_backend_list_prefix`` and asks each key's
        size of the store, a page at a time. A backend that pages by itself (one folder a hop
        on a disk, one request a page on S3) and knows sizes as it lists overrides it, each page
        one backend call under one token of the limit. An override must not ``yield`` while it
        holds a task group or cancel scope open.
        """
        keys = list(await self._backend_list_prefix(prefix))
        for start in range(0, len(keys), PAGE_SIZE):
            names = keys[start : start + PAGE_SIZE]
            sizes: dict[str, int | None] = {}

            async def size_of(key: str) -> None:
                try:
                    sizes[key] = await self.getsize(key)  # noqa: B023
                except FileNotFoundError:
                    pass  # gone since it was listed
                except ValueError:
                    sizes[key] = None  # not a valid key: the caller decides what to do with it  # noqa: B023

            await self._for_each(names, size_of)
            yield [(key, sizes[key]) for key in names if key in sizes]

    # What `_backend_set_streamed` does with a value given in parts: ``True`` where each part
    # goes to the backend as it comes (a temporary file, a multipart upload), so a value of any
    # size costs memory for a part; ``False`` where the default holds the value whole.
    @property
    def _streams_writes(self) -> bool:
        return False

    # The smallest part the backend takes, all but the last (S3's multipart upload: 5 MiB).
    _min_part_size: int = 0

    # The bytes that reading a value with `_read_parts` holds beyond the part itself, for as
    # long as the read goes on (a client's buffers for the response): what a copy's byte
    # budget counts for each value it streams.
    _stream_overhead: int = 0

    # Whether a whole read (`get`) holds the value twice at its peak (a client that joins the
    # body's pieces into new bytes), where `_read_parts` of the value as one part holds it once:
    # a copy then reads a large value in parts even when it fits one.
    @property
    def _whole_reads_twice(self) -> bool:
        return False

    async def _backend_set_streamed(self, key: str, parts: AsyncIterator[Part]) -> None:
        """Write the value whose bytes ``parts`` gives in order, whole or not at all: until the
        last part is in, nothing is visible at ``key`` (the old value, if any, stays). A part
        may be a slot of the read pool (`._pieces`): keep a reference only as long as it is
        used (the slot is reused once none is left), copy it to keep it longer.

        This default joins the parts and writes them with `_backend_set` (the value held
        whole); a backend that can write a value as it comes overrides it and sets
        ``_streams_writes``.
        """
        pieces = [part async for part in parts]
        value = default_buffer_prototype().buffer.from_bytes(b"".join(pieces))
        del pieces
        await self._backend_set(key, value, exclusive=False)

    async def _backend_read_parts(
        self, key: str, start: int, size: int, part: int
    ) -> AsyncGenerator[memoryview, None]:
        """The bytes ``start`` to ``size`` of ``key`` in order, in parts of ``part`` bytes (the
        last may be shorter): what a copy of a large value reads. ``FileNotFoundError`` if the
        key does not exist. A value that no longer has ``size`` bytes gives fewer (it ends
        early) or more (bytes past ``size``): the caller checks, and no request is made for it
        where the read itself tells (the end of a streamed response, a file's size).

        Each part is read into memory of its own, with no copy after (the read pool's slots,
        `._pieces`, where a client hands the body over in pieces), so that a copy holds a part
        once: what its byte budget counts.

        This default makes one ranged read per part. A backend whose ranged reads cost more
        than a part (a server that reads the whole object for each range) or that streams a
        response overrides it with one streamed read. It must not ``yield`` while it holds a
        task group or cancel scope open.
        """
        while True:
            # Past the end, one byte more: what tells a value that grew.
            end = min(start + part, size) if start < size else size + 1
            value = await self.get(key, default_buffer_prototype(), RangeByteRequest(start, end))
            if value is None:
                raise FileNotFoundError(key)
            if not len(value):
                return
            start += len(value)
            # As it was read (`to_bytes` would copy it): a large read from a folder is a slot.
            yield memoryview(value.as_buffer_like()).cast("B")
            del value  # see `_read_parts`

    async def _backend_checksum(self, key: str) -> str | None:
        """A checksum of the value at ``key`` that the backend keeps and gives without reading
        the value, as ``"md5:<hex>"`` (or another ``algorithm:hex``); ``None`` where it keeps
        none it vouches for. ``FileNotFoundError`` if the key does not exist."""
        return None

    # ----------------------------------------------------------------- the worker pool

    async def _for_each(
        self,
        items: Iterable[T],
        action: Callable[[T], Awaitable[None]],
        workers: int | None = None,
    ) -> None:
        """Run ``action`` on every item, at most ``max_concurrency`` at a time, in one task group.

        Workers pull from the shared iterator, so a million items cost memory for the workers,
        not for a million tasks. The first error cancels the rest and is raised as itself.
        """
        iterator = iter(items)

        async def worker(first: T) -> None:
            await action(first)
            for item in iterator:
                await action(item)

        with single_error():
            async with anyio.create_task_group() as tg:
                for first in islice(iterator, workers or self._limit.total_tokens):
                    tg.start_soon(worker, first)

    def _read_batch_size(self) -> int:
        """How many reads one step of a bulk read takes; 1 unless the backend batches them."""
        return 1

    def _read_parallelism(self) -> int:
        """How many steps of a bulk read run at once; every token unless the backend knows."""
        return self._limit.total_tokens

    def _requests_loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop every request of this store is made on, if it has one (a caller
        on another loop hops to it and back for each request): a caller with many requests
        to make can run them all there, one hop for the lot. ``None``: made on the caller's."""
        return None

    async def _backend_get_batch(
        self, requests: list[tuple[str, ByteRequest | None]], prototype: BufferPrototype
    ) -> list[Buffer | None]:
        """Several reads as one step of a bulk read; a backend may do them in one hop."""
        return [await self._backend_get(key, prototype, byte_range) for key, byte_range in requests]

    def _checked_batches(
        self, requests: Iterable[tuple[str, ByteRequest | None]]
    ) -> Iterator[list[tuple[str, ByteRequest | None]]]:
        # Lazy, so workers validate as they pull, and each batch is sized by the latest estimate.
        iterator = iter(requests)
        while batch := list(islice(iterator, self._read_batch_size())):
            for key, byte_range in batch:
                validate_key(key)
                check_byte_range(byte_range)
            yield batch

    async def _get_all(
        self,
        requests: Iterable[tuple[str, ByteRequest | None]],
        prototype: BufferPrototype,
    ) -> list[Buffer | None]:
        await self._ensure_open()
        results: dict[int, list[Buffer | None]] = {}

        async def fetch(item: tuple[int, list[tuple[str, ByteRequest | None]]]) -> None:
            index, batch = item
            results[index] = await self._backend_get_batch(batch, prototype)

        await self._for_each(
            enumerate(self._checked_batches(requests)), fetch, self._read_parallelism()
        )
        return [result for index in range(len(results)) for result in results[index]]

    # ----------------------------------------------------------------- reads

    @tracked
    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        validate_key(key)
        check_byte_range(byte_range)
        await self._ensure_open()
        return await self._backend_get(key, prototype or default_buffer_prototype(), byte_range)

    @tracked
    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        """Values (or parts) of many keys, in order; ``None`` where a key does not exist."""
        return await self._get_all(key_ranges, prototype)

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        # A generator must not yield while it holds a task group open, so the requests are
        # fetched a window at a time, each window in its own task group, and yielded after.
        iterator = iter(requests)
        window = 4 * self._limit.total_tokens
        while batch := list(islice(iterator, window)):
            results: list[Buffer | None] = [None] * len(batch)

            async def fetch(index: int) -> None:
                key, prototype, byte_range = batch[index]
                results[index] = await self.get(key, prototype, byte_range)  # noqa: B023

            await self._for_each(range(len(batch)), fetch)
            for (key, _, _), result in zip(batch, results, strict=True):
                yield key, result

    @asynccontextmanager
    async def fetch_many(
        self,
        requests: Iterable[FetchRequest],
        *,
        prototype: BufferPrototype | None = None,
    ) -> AsyncIterator[MemoryObjectReceiveStream[tuple[str, Buffer | None]]]:
        """Fetch many keys, giving ``(key, buffer or None)`` pairs as they complete.

        ::

            async with store.fetch_many(keys) as results:
                async for key, buffer in results:
                    ...

        At most ``max_concurrency`` fetches run at once and at most as many results wait to be
        taken, so memory stays bounded however many requests there are. Leaving the block early
        cancels the fetches still running; the first error cancels the rest and is raised.
        """
        prototype = prototype or default_buffer_prototype()
        send, receive = anyio.create_memory_object_stream[tuple[str, Buffer | None]](
            self._limit.total_tokens
        )

        async def produce() -> None:
            async def fetch(item: FetchRequest) -> None:
                key, byte_range = _as_request(item)
                await send.send((key, await self.get(key, prototype, byte_range)))

            async with send:
                await self._for_each(requests, fetch)

        with single_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                try:
                    yield receive
                finally:
                    # Cancel the fetches before closing the stream, so that none of them
                    # fails on a closed stream instead of ending quietly.
                    tg.cancel_scope.cancel()
                    receive.close()

    @tracked
    async def exists(self, key: str) -> bool:
        validate_key(key)
        await self._ensure_open()
        return await self._backend_exists(key)

    async def getsize(self, key: str) -> int:
        validate_key(key)
        await self._ensure_open()
        return await self._backend_getsize(key)

    async def getsize_prefix(self, prefix: str) -> int:
        prefix = directory_prefix(prefix)
        await self._ensure_open()
        sizes: list[int] = []

        async def size_of(key: str) -> None:
            sizes.append(await self._backend_getsize(key))

        await self._for_each(await self._backend_list_prefix(prefix), size_of)
        return sum(sizes)

    # ----------------------------------------------------------------- listing

    async def list(self) -> AsyncIterator[str]:
        await self._ensure_open()
        for key in await self._backend_list_prefix(""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        validate_prefix(prefix)
        await self._ensure_open()
        for key in await self._backend_list_prefix(prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = directory_prefix(prefix)
        await self._ensure_open()
        for name in await self._backend_list_dir(prefix):
            yield name

    # ----------------------------------------------------------------- writes

    def _check_value(self, value: Buffer) -> None:
        if not isinstance(value, Buffer):
            raise TypeError(
                f"{type(self).__name__}.set(): `value` must be a Buffer instance. "
                f"Got an instance of {type(value)} instead."
            )

    @tracked
    async def set(self, key: str, value: Buffer) -> None:
        await self._write(key, value, exclusive=False)

    @tracked
    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        """Write ``value`` unless ``key`` exists; atomic against concurrent writers."""
        await self._write(key, value, exclusive=True)

    async def _write(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        self._check_writable()
        validate_key(key)
        self._check_value(value)
        await self._ensure_open()
        await self._backend_set(key, value, exclusive=exclusive)

    @tracked
    async def _set_streamed(self, key: str, parts: AsyncIterator[Part]) -> None:
        """Write a value given as an async iterator of its parts (see `_backend_set_streamed`)."""
        self._check_writable()
        validate_key(key)
        await self._ensure_open()
        await self._backend_set_streamed(key, parts)

    async def _read_parts(self, key: str, size: int, part: int) -> AsyncGenerator[memoryview, None]:
        """The ``size`` bytes of ``key`` in parts (see `_backend_read_parts`)."""
        validate_key(key)
        await self._ensure_open()
        parts = self._backend_read_parts(key, 0, size, part)
        async with aclosing(parts):
            async for data in parts:
                yield data
                # Let go of a part before the next is read, here and in every generator that
                # passes parts on: a part still referred to keeps its slot of the read pool, so
                # the next part would take a second slot, and a copy would hold two parts a
                # value where it reads and writes them one after the other.
                del data

    async def _checksum(self, key: str) -> str | None:
        """The backend's own checksum of ``key`` (see `_backend_checksum`)."""
        validate_key(key)
        await self._ensure_open()
        return await self._backend_checksum(key)

    @tracked
    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        # Every key is checked before anything is written, so bad input writes nothing.
        self._check_writable()
        items = list(values)
        for key, value in items:
            validate_key(key)
            self._check_value(value)
        await self._ensure_open()

        async def put(item: tuple[str, Buffer]) -> None:
            await self._backend_set(item[0], item[1], exclusive=False)

        await self._for_each(items, put)

    async def set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        """Write many ``(key, value)`` pairs concurrently; no write starts if any key is bad."""
        await self._set_many(values)

    async def set_partial_values(self, key_start_values: Iterable[tuple[str, int, Any]]) -> None:
        """Not supported (zarr 3.1.0 declares it; later zarr no longer does)."""
        raise NotImplementedError(f"{type(self).__name__} does not support partial writes")

    @tracked
    async def delete(self, key: str) -> None:
        self._check_writable()
        validate_key(key)
        await self._ensure_open()
        await self._backend_delete(key)

    @tracked
    async def delete_dir(self, prefix: str) -> None:
        """Delete every key under the node ``prefix`` (``"a"`` means ``"a/…"``, not ``"ab"``)."""
        self._check_writable()
        prefix = directory_prefix(prefix)
        await self._ensure_open()
        await self._backend_delete_dir(prefix)

    @tracked
    async def clear(self) -> None:
        self._check_writable()
        await self._ensure_open()
        await self._backend_delete_dir("")

    # ----------------------------------------------------------------- zarr >= 3.4's sync surface
    # One template for every store. For any backend: the async call, run on the bridge's loop and
    # waited for; zarr is told not to take its sync path (`_supports_sync_io`): that path makes
    # one call at a time, each a hop to the bridge's loop, where the async path keeps a window of
    # them in flight. A store whose backend can serve a call without a loop (a dict, a file) sets
    # `_serves_sync_io = True` and fills in the `_sync_*` hooks, which get input already
    # validated, as the `_backend_*` hooks do.
    _serves_sync_io: bool = False

    @property
    def _supports_sync_io(self) -> bool:
        # What zarr >= 3.4 asks before taking its blocking fast path: only where the backend
        # serves blocking calls itself, and never under zarr_anyio.api (that path reads in
        # zarr's own threads, outside the store's limit and beyond cancellation).
        return self._serves_sync_io and not in_api_call()

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        if not self._serves_sync_io:
            return run_blocking(lambda: self.get(key, prototype, byte_range))
        validate_key(key)
        check_byte_range(byte_range)
        with self._sync_call():
            return self._sync_get(key, prototype or default_buffer_prototype(), byte_range)

    def set_sync(self, key: str, value: Buffer) -> None:
        if not self._serves_sync_io:
            run_blocking(lambda: self.set(key, value))
            return
        self._check_writable()
        validate_key(key)
        self._check_value(value)
        with self._sync_call():
            self._sync_set(key, value)

    def delete_sync(self, key: str) -> None:
        if not self._serves_sync_io:
            run_blocking(lambda: self.delete(key))
            return
        self._check_writable()
        validate_key(key)
        with self._sync_call():
            self._sync_delete(key)

    @contextmanager
    def _sync_call(self) -> Iterator[None]:
        """Around each blocking call of the sync surface: opens the store (without a loop)."""
        self._is_open = True
        yield

    def _sync_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        raise NotImplementedError(f"{type(self).__name__} serves no blocking reads")

    def _sync_set(self, key: str, value: Buffer) -> None:
        raise NotImplementedError(f"{type(self).__name__} serves no blocking writes")

    def _sync_delete(self, key: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} serves no blocking deletes")


class BlockingStore(AnyioStore):
    """A store whose backend is blocking calls (files, ``zipfile``), made in worker threads.

    A backend gives `_read_blocking`, one read as a blocking call. Single reads go through a
    `HopCoalescer`, so reads waiting at the same time share a hop to a worker thread; bulk reads
    take batches of reads to each hop, sized by what reads have been costing. Every other call
    is one hop holding one token (`_blocking`).
    """

    def __init__(
        self,
        *,
        read_only: bool = False,
        max_concurrency: int | None = None,
        limiter: LimiterLike | None = None,
    ) -> None:
        super().__init__(read_only=read_only, max_concurrency=max_concurrency, limiter=limiter)
        self._hops = HopCoalescer(self._limit)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_hops"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._hops = HopCoalescer(self._limit)

    @abc.abstractmethod
    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> bytes | memoryview | None:
        """Read ``key`` (or the part ``byte_range`` asks for); ``None`` if it does not exist."""

    def _read_into_blocking(self, key: str, into: memoryview) -> int | bytes | memoryview | None:
        """Read the whole value of ``key`` into ``into`` if it is exactly that long (give its
        length); a value of another length is given as it is, ``None`` if there is none.

        For a caller that knows where the bytes belong (a raw chunk and its place in the
        result), so a backend that can read into given memory saves a copy. Call it in a worker
        thread, holding a token, like `_read_blocking`; this default reads, then copies."""
        data = self._read_blocking(key, None)
        if data is None or len(data) != len(into):
            return data
        into[:] = data
        return len(data)

    def _read_into_array_blocking(
        self, key: str, into: np.ndarray[Any, Any]
    ) -> int | bytes | memoryview | None:
        """`_read_into_blocking` with ``into`` a writable array of any strides, filled in C
        order (a raw chunk's place in the result, contiguous in it or not). This default reads
        into a contiguous one, or reads and copies."""
        if into.flags.c_contiguous:
            return self._read_into_blocking(key, into.reshape(-1).view(np.uint8).data)
        data = self._read_blocking(key, None)
        return None if data is None else fill_from(into, data)

    def _read_many_blocking(
        self, requests: Iterable[tuple[str, np.ndarray[Any, Any] | None]]
    ) -> Generator[int | bytes | memoryview | None, None, None]:
        """For each ``(key, into)`` as it is taken: `_read_blocking` of the whole value
        (``into`` ``None``) or `_read_into_array_blocking`. For a caller with many keys to read
        in one hop (a codec pipeline's batch), so that a backend can share work between them (a
        `LocalStore` opens its root once). Close it when done with it."""
        for key, into in requests:
            if into is None:
                yield self._read_blocking(key, None)
            else:
                yield self._read_into_array_blocking(key, into)

    # Whether the backend gives `_set_blocking` and `_delete_key_blocking`, so that a caller with
    # many keys to write (a codec pipeline) can write them in one hop, under one token.
    _sets_blocking: bool = False

    def _set_blocking(self, key: str, value: memoryview, check_cancelled: CheckCancelled) -> None:
        """Write ``value`` to ``key`` as `_backend_set` would (validated, writable, open), as a
        blocking call; in a worker thread, holding a token."""
        raise NotImplementedError

    def _delete_key_blocking(self, key: str) -> None:
        """Delete ``key`` as `_backend_delete` would, as a blocking call (see `_set_blocking`)."""
        raise NotImplementedError

    def _set_many_blocking(
        self, items: Iterable[tuple[str, memoryview | None]], check_cancelled: CheckCancelled
    ) -> None:
        """Write each value (delete each key given ``None``) in turn, as `_set_blocking` and
        `_delete_key_blocking` would; in a worker thread, holding a token. Each value is written
        before the next item is taken, so a caller may reuse its memory for the next. A backend
        may share work between the writes (LocalStore opens the folders once)."""
        for key, value in items:
            check_cancelled()
            if value is None:
                self._delete_key_blocking(key)
            else:
                self._set_blocking(key, value, check_cancelled)

    def _sync_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        data = self._read_blocking(key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def _blocking(self, function: Callable[[CheckCancelled], T]) -> T:
        """One blocking call in a worker thread, holding a token.

        ``function`` gets a ``check_cancelled()`` to call between steps: it raises once the
        caller is cancelled, so a long call can stop early; either way the caller waits for it.
        """
        async with self._limit.current():
            return await run_in_worker(function)

    # Whether `_read_nowait` can ever read; if not, reads skip straight to a thread.
    _reads_on_loop: bool = False

    def _read_nowait(
        self, key: str, byte_range: ByteRequest | None
    ) -> bytes | memoryview | Pending | None:
        """Read ``key`` on the event loop if that cannot block (the bytes are in memory or the
        page cache), else give `NOT_READY`. By default reads always go to a thread."""
        return NOT_READY

    def _read_on_loop(
        self, key: str, byte_range: ByteRequest | None
    ) -> bytes | memoryview | Pending | None:
        # A read that cannot block costs a few µs, a hop ~100 µs: skip the hop, but only with a
        # token free, so the limit still counts it.
        limiter = self._limit.current()
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            return NOT_READY
        try:
            return self._read_nowait(key, byte_range)
        finally:
            limiter.release()

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        on_loop = self._read_on_loop(key, byte_range) if self._reads_on_loop else NOT_READY
        if isinstance(on_loop, Pending):
            data = await self._hops.run(lambda: self._read_blocking(key, byte_range))
        else:
            # A read made on the loop is still a checkpoint, as every async call should be.
            await anyio.lowlevel.checkpoint()
            data = on_loop
        return None if data is None else prototype.buffer.from_bytes(data)

    def _read_batch_size(self) -> int:
        return self._hops.batch_size()

    def _read_parallelism(self) -> int:
        return self._hops.parallel_hops(self._limit.total_tokens)

    async def _backend_get_batch(
        self, requests: list[tuple[str, ByteRequest | None]], prototype: BufferPrototype
    ) -> list[Buffer | None]:
        def read_all() -> list[bytes | memoryview | None]:
            return [self._read_blocking(key, byte_range) for key, byte_range in requests]

        hop = await self._blocking(lambda _: timed(read_all))
        self._hops.record(hop, len(requests))
        return [None if data is None else prototype.buffer.from_bytes(data) for data in hop.result]
