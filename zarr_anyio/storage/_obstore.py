"""ObjectStore: any obstore store (S3, GCS, Azure, HTTP, local, memory), drop-in for
``zarr.storage.ObjectStore``.

Requests use obstore's async API under the store's limiter, rate limit and retries: awaited
directly by an asyncio caller (obstore's futures work on any asyncio loop), and on the bridge's
loop for a trio caller. Measured here against a loopback HTTP server, 16 in flight, it beat
obstore's blocking API in worker threads: 4 KiB objects 166 µs each direct and 222 µs on the
bridge against 190-250 µs in threads; 1 MiB objects 538 and 578 µs against ~1,000 µs
(``benchmarks/remote.py``). Listing, one call per listing, stays a blocking call in a thread.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import os
import pickle
import posixpath
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
)
from typing import Any, Self, TypeVar, Unpack

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio._core.fork import at_fork_in_child
from zarr_anyio._core.loops import running_asyncio_loop
from zarr_anyio._core.threads import run_in_worker

from . import _live
from ._base import PAGE_SIZE, Entry, Part
from ._checksum import etag_checksum
from ._client_retries import warn_if_client_retries
from ._conflicts import find_conflict
from ._http_range import RangeNotHonoured, span
from ._keys import check_byte_range, is_valid_key, validate_key
from ._obstore_listing import Lister
from ._pieces import Pieces
from ._redact import redact
from ._remote import RemoteOptions, RemoteStore
from ._retry import http_status

__all__ = ["ObjectStore"]

T = TypeVar("T")

# How Rust prints a system error in obstore's messages: "Is a directory (os error 21)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _os_error(error: BaseException) -> int | None:
    """The system error number inside an obstore error's text (its local store's file calls),
    if there is one."""
    import obstore

    if not isinstance(error, obstore.exceptions.GenericError):
        return None
    found = _OS_ERROR.search(str(error))
    return None if found is None else int(found.group(1))


# Whether obstore has run a request in this process, and whether the process was forked from
# one where it had (see _check_runtime).
_runtime_started = False
_runtime_inherited = False


def _after_fork_in_child() -> None:
    global _runtime_inherited
    _runtime_inherited = _runtime_inherited or _runtime_started


at_fork_in_child(_after_fork_in_child)


def _let_obstore_threads_leave_python(bound: float = 0.5) -> None:
    """At exit, wait (at most ``bound`` seconds) until no thread of obstore's is inside Python.

    obstore hands each result to the event loop from one of its Rust threads, which lets go of
    the GIL while it wakes the loop and then takes it back. If the program has ended by then,
    Python stops that thread with ``pthread_exit``, which cannot unwind through Rust: the
    process aborts (SIGABRT, exit code 134) after everything it did succeeded. Seen with obstore
    0.12 in about one exit in three under load. Such a thread has a Python frame (the loop's
    wake-up), and is not one of ``threading``'s, so it can be waited for.
    """
    deadline = time.monotonic() + bound
    while True:
        known = {thread.ident for thread in threading.enumerate()}
        inside_python = [ident for ident in sys._current_frames() if ident not in known]
        if not inside_python or time.monotonic() > deadline:
            return
        time.sleep(0.001)  # lets go of the GIL, which that thread is waiting for


def _check_runtime() -> None:
    """Refuse to call obstore in a child forked after obstore ran: it would hang for ever.

    obstore runs its requests on a Rust (tokio) runtime whose worker threads are started on
    first use and do not survive a fork: in the child every request, blocking or async, waits
    for them for ever, ``timeout=`` included (seen with obstore 0.12; its maintainers say it is
    not fork-safe). Nothing here can start that runtime anew, so the child gets this error.
    """
    global _runtime_started
    if not _runtime_started:
        atexit.register(_let_obstore_threads_leave_python)
    if _runtime_inherited:
        raise RuntimeError(
            "this process was forked from one that had made obstore requests, and obstore "
            "cannot make requests after a fork (its runtime's threads stay behind in the "
            "parent): every request would hang. Start worker processes with the 'spawn' or "
            "'forkserver' method (multiprocessing.get_context('spawn')), or make no request "
            "before forking; or use FsspecStore, which works in a forked child."
        )
    _runtime_started = True


def _is_range_error(error: Exception) -> bool:
    """A range that starts past the end of the object: HTTP 416 (not any other error)."""
    return http_status(error) == 416


def _whole_body_sent(error: Exception) -> bool:
    """Whether obstore refused a 200 with the whole object to a range request."""
    import obstore

    return isinstance(error, obstore.exceptions.NotSupportedError) or (
        "non-partial response when range requested" in str(error)
    )


def _is_panic(error: BaseException) -> bool:
    """obstore's async API reports a panic of its Rust code as ``RustPanic`` (a class that
    ``pyo3_async_runtimes`` makes and exports nowhere, so it is known by its name)."""
    cls = type(error)
    return cls.__name__ == "RustPanic" and cls.__module__ == "pyo3_async_runtimes"


def _holds_a_key(store: Any, folder: str) -> bool:
    import obstore

    return any(len(batch) > 0 for batch in obstore.list(store, prefix=folder, chunk_size=1))


async def _next_chunk(stream: Any) -> Any:
    """The next chunk of an obstore byte stream, ``None`` at its end."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _written(writer: Any, part: Part) -> None:
    """``part`` written by an obstore writer (a coroutine, as the bridge takes)."""
    await writer.write(part)


async def _awaited(awaitable: Awaitable[T]) -> T:
    """A coroutine of an awaitable: obstore gives futures, and the bridge takes coroutines."""
    return await awaitable


# obstore takes byte positions as unsigned 64-bit integers (a larger one raised its ValueError).
# No object is that large: a range reaching beyond is read to the object's end, and one that
# starts beyond reads nothing, as on every other store.
_U64_END = 2**64


def _fit(byte_range: ByteRequest | None) -> tuple[ByteRequest | None, bool]:
    """``byte_range`` as obstore can take it, and whether it starts past the end of any object."""
    if isinstance(byte_range, RangeByteRequest) and byte_range.end >= _U64_END:
        if byte_range.start >= _U64_END:
            return None, True
        return OffsetByteRequest(byte_range.start), False
    if isinstance(byte_range, OffsetByteRequest) and byte_range.offset >= _U64_END:
        return None, True
    if isinstance(byte_range, SuffixByteRequest) and byte_range.suffix >= _U64_END:
        return None, False  # the whole object
    return byte_range, False


# How object_store reports a 206 whose Content-Range names other bytes than asked (its
# ``UnexpectedRange``): the same error as FsspecStore's for it, with the bytes named.
_UNEXPECTED_RANGE = re.compile(r"Generic HTTP error: Requested (\d+)\.\.(\d+), got (\d+)\.\.(\d+)")


def _refuse_unexpected_range(error: Exception, key: str) -> None:
    """Raise `RangeNotHonoured` if ``error`` is object_store's ``UnexpectedRange``."""
    wrong = _UNEXPECTED_RANGE.match(str(error))
    if wrong is not None:
        asked, sent = (int(wrong[1]), int(wrong[2])), (int(wrong[3]), int(wrong[4]))
        raise RangeNotHonoured(
            f"{key!r}: asked for bytes {asked[0]}-{asked[1] - 1}, the server sent bytes "
            f"{sent[0]}-{sent[1] - 1}"
        ) from None


def _options(byte_range: ByteRequest | None) -> Any:
    if byte_range is None:
        return {}
    if isinstance(byte_range, RangeByteRequest):
        return {"range": (byte_range.start, byte_range.end)}
    if isinstance(byte_range, OffsetByteRequest):
        return {"range": {"offset": byte_range.offset}}
    if isinstance(byte_range, SuffixByteRequest):
        return {"range": {"suffix": byte_range.suffix}}
    raise TypeError(f"Unexpected byte_range, got {byte_range!r}.")


class ObjectStore(RemoteStore):
    """Store over an obstore store.

    Parameters
    ----------
    store
        An ``obstore.store`` instance (``S3Store``, ``GCSStore``, ``AzureStore``, ``HTTPStore``,
        ``LocalStore``, ``MemoryStore``).
    read_only
        Refuse every write.
    max_concurrency, limiter, adaptive, retry, retry_budget, timeout, rate_limit
        See `RemoteStore`. The store retries; a client that retries too (obstore's default
        ``retry_config``) hides its throttles from the window, so it draws a
        `ClientRetriesWarning`: make it with ``retry_config={"max_retries": 0}``, as
        `open_store` does.
    """

    store: Any

    def __init__(
        self,
        store: Any,
        *,
        read_only: bool = False,
        **options: Unpack[RemoteOptions],
    ) -> None:
        if not type(store).__module__.startswith("obstore"):
            raise TypeError(f"expected an obstore store, got {store!r}")
        super().__init__(read_only=read_only, **options)
        warn_if_client_retries(store, "ObjectStore")
        self.store = store
        # Set once the server has answered a range request with the whole object (see _fetch).
        self._ranges_ignored = False
        # open_store(str(store)) reaches this obstore client again while this store lives.
        _live.remember(str(self), self)

    def _with_options(self, read_only: bool, options: dict[str, Any]) -> Self:
        return type(self)(self.store, read_only=read_only, **options)

    def __str__(self) -> str:
        # obstore's repr of an HTTP store holds its URL, credentials included.
        return redact(f"object_store://{self.store}")

    def __repr__(self) -> str:
        return f"ObjectStore({self})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ObjectStore)
            and self.read_only == other.read_only
            and bool(self.store == other.store)
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["store"] = pickle.dumps(self.store)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {**state, "store": pickle.loads(state["store"])}
        super().__setstate__(state)

    # ---------------------------------------------------------------- calling obstore

    async def _call(
        self,
        make: Callable[[], Coroutine[Any, Any, T]],
        sent: int = 0,
        *,
        retried: bool = True,
        patient: bool = False,
    ) -> T:
        """One obstore request (``make()`` awaits its async API), as one `_request` (as one
        `_request_once`, never retried, if not ``retried``; without a timeout if ``patient``)."""
        _check_runtime()
        call = make if running_asyncio_loop() is not None else None

        def start() -> Awaitable[T]:
            return call() if call is not None else run_on_loop(make)

        if retried:
            return await self._request(start, sent=sent)
        return await self._request_once(start, sent=sent, patient=patient)

    async def _call_blocking(self, function: Callable[[], T]) -> T:
        """One obstore request made with its blocking API in a worker thread."""
        _check_runtime()
        return await self._request(lambda: run_in_worker(lambda _: function()))

    async def _fetch(self, key: str, byte_range: ByteRequest | None) -> memoryview | None:
        import obstore

        try:
            if isinstance(byte_range, RangeByteRequest) and byte_range.start == byte_range.end:
                await obstore.head_async(self.store, key)
                return memoryview(b"")
            byte_range, past_end = _fit(byte_range)
            if past_end:
                await obstore.head_async(self.store, key)
                return memoryview(b"")
            if byte_range is not None and self._ranges_ignored:
                return await self._fetch_and_cut(key, byte_range)
            try:
                result = await obstore.get_async(self.store, key, options=_options(byte_range))
            except Exception as error:
                # obstore refuses the whole body that a server which ignores Range sends (200):
                # its HTTPStore with NotSupportedError, its S3Store (and the others) with
                # object_store's "non-partial response". Cut the range out of the object, as
                # FsspecStore does, and ask this server for whole objects from now on: unless
                # the object is empty, whose whole body is every range of it (moto's S3
                # answers a range of an empty object so).
                if byte_range is None or not _whole_body_sent(error):
                    raise
                return await self._fetch_and_cut(key, byte_range, ignored=True)
            return memoryview(await result.bytes_async())
        except FileNotFoundError:
            return None
        except Exception as error:
            if _os_error(error) == errno.ENOTDIR:
                return None  # a key on its path (obstore's local store): no file of this name
            _refuse_unexpected_range(error, key)
            if not _is_range_error(error):
                raise
            # The range starts past the end: zarr's answer is what exists there, nothing.
            await obstore.head_async(self.store, key)
            return memoryview(b"")

    async def _fetch_and_cut(
        self, key: str, byte_range: ByteRequest, *, ignored: bool = False
    ) -> memoryview:
        """``byte_range`` cut out of the whole object; ``ignored``: the server sent it whole
        to a range request, so ask it for whole objects from now on (unless it is empty)."""
        import obstore

        whole = memoryview(await (await obstore.get_async(self.store, key)).bytes_async())
        if ignored and len(whole):
            self._ranges_ignored = True
        start, stop = span(byte_range, len(whole))
        return whole[start:stop]

    # ---------------------------------------------------------------- backend hooks

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        try:
            data = await self._call(lambda: self._fetch(key, byte_range))
        except FileNotFoundError:
            return None
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        """As every store's, but several byte ranges of one key are one request (``get_ranges``)."""
        requests = list(key_ranges)
        for key, byte_range in requests:
            validate_key(key)
            check_byte_range(byte_range)
        await self._ensure_open()
        ranged: dict[str, list[int]] = defaultdict(list)
        for index, (key, byte_range) in enumerate(requests):
            if (
                isinstance(byte_range, RangeByteRequest)
                and byte_range.start < byte_range.end < _U64_END
                and not self._ranges_ignored
            ):
                ranged[key].append(index)
        groups = [indexes for indexes in ranged.values() if len(indexes) > 1]
        grouped = {index for indexes in groups for index in indexes}
        singles = [index for index in range(len(requests)) if index not in grouped]
        results: list[Buffer | None] = [None] * len(requests)

        async def fetch_group(indexes: list[int]) -> None:
            import obstore

            key = requests[indexes[0]][0]
            ranges = [requests[index][1] for index in indexes]
            starts = [r.start for r in ranges if isinstance(r, RangeByteRequest)]
            ends = [r.end for r in ranges if isinstance(r, RangeByteRequest)]
            try:
                parts = await self._call(
                    lambda: _awaited(
                        obstore.get_ranges_async(self.store, key, starts=starts, ends=ends)
                    )
                )
            except FileNotFoundError:
                return
            except Exception as error:
                if _whole_body_sent(error):
                    # A server that ignores Range (see _fetch): each range cut from the object.
                    for index in indexes:
                        await fetch_single(index)
                    return
                _refuse_unexpected_range(error, key)
                # obstore's get_ranges panics when a range starts past the end of the object
                # (it slices the merged answer); over HTTP that range may also be a 416. Either
                # way, ask for each range on its own, as single gets would.
                if not (_is_panic(error) or _is_range_error(error)):
                    raise
                for index in indexes:
                    await fetch_single(index)
                return
            for index, part in zip(indexes, parts, strict=True):
                results[index] = prototype.buffer.from_bytes(memoryview(part))

        async def fetch_single(index: int) -> None:
            key, byte_range = requests[index]
            results[index] = await self._backend_get(key, prototype, byte_range)

        async def fetch(item: tuple[str, Any]) -> None:
            kind, payload = item
            if kind == "group":
                await fetch_group(payload)
            else:
                await fetch_single(payload)

        work = [("group", indexes) for indexes in groups] + [("single", i) for i in singles]
        await self._for_each(work, fetch)
        return results

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        import obstore

        try:
            await self._put(key, value.to_bytes(), exclusive=exclusive)
        except obstore.exceptions.GenericError as error:
            # obstore's local store keeps keys as files: a key where a folder is, or below a
            # key, fails with the system's error inside obstore's text (Rust's "(os error N)").
            code = _os_error(error)
            if code not in (errno.EISDIR, errno.ENOTDIR):
                raise
            folder_of_nothing = False
            if code == errno.EISDIR:
                async with self._limit.current():
                    folder_of_nothing = await run_in_worker(
                        lambda _: self._remove_empty_folders(key)
                    )
            if folder_of_nothing:
                await self._put(key, value.to_bytes(), exclusive=exclusive)
                return
            raise await find_conflict(self, key, f"the store {self}") from None

    def _remove_empty_folders(self, key: str) -> bool:
        """Remove the tree of empty folders at ``key`` in obstore's local store (left by its
        deletes): a folder that holds no key is not there. Whether anything was removed."""
        root = getattr(self.store, "prefix", None)
        if type(self.store).__name__ != "LocalStore" or root is None:
            return False
        folder = os.path.join(os.fspath(root), *key.split("/"))
        try:
            for parent, folders, files in os.walk(folder, topdown=False):
                if files:
                    return False
                for name in folders:
                    os.rmdir(os.path.join(parent, name))
            os.rmdir(folder)
        except OSError:
            return False
        return True

    async def _put(self, key: str, data: bytes, *, exclusive: bool) -> None:
        import obstore

        if not exclusive:
            await self._call(
                lambda: _awaited(obstore.put_async(self.store, key, data)), sent=len(data)
            )
            return
        with contextlib.suppress(obstore.exceptions.AlreadyExistsError):
            await self._call(
                lambda: _awaited(obstore.put_async(self.store, key, data, mode="create")),
                sent=len(data),
            )

    # obstore's writer sends a value in parts of its buffer's size (a multipart upload on S3,
    # one PUT if the value fits one buffer), so a value of any size costs memory for about two
    # parts: the one filling and the one in flight (``max_concurrency=1``).
    @property
    def _streams_writes(self) -> bool:
        return True

    _min_part_size = 5 << 20

    async def _backend_set_streamed(self, key: str, parts: AsyncIterator[Part]) -> None:
        import obstore

        writer: Any = None
        async for part in parts:
            if writer is None:
                size = max(len(part), self._min_part_size)
                writer = obstore.open_writer_async(
                    self.store, key, buffer_size=size, max_concurrency=1
                )
            # Never retried: the writer has taken in whatever a failed write gave it.
            await self._call(
                functools.partial(_written, writer, part),
                sent=len(part),
                retried=False,
            )
            del part  # its slot of the read pool is free for the next part
        if writer is None:
            await self._put(key, b"", exclusive=False)
            return
        # Only a writer that got every part is closed: closing completes the upload, making the
        # object visible. One that failed or was cancelled is dropped unclosed, which leaves an
        # incomplete multipart upload (never visible; S3's AbortIncompleteMultipartUpload
        # lifecycle rule removes it) and the old value, if any, in place.
        await self._call(lambda: _awaited(writer.close()), retried=False, patient=True)

    async def _backend_read_parts(
        self, key: str, start: int, size: int, part: int
    ) -> AsyncGenerator[memoryview, None]:
        # One GET whose body is taken a part at a time: one request for the value where ranged
        # reads cost one a part, and a server that reads the whole object for each range (moto:
        # 0.31 s a 2 MiB range of a 256 MiB object, 0.02 s of a 4 MiB one) is read once. A
        # failure in the middle of the body goes on with ranged reads from there, each retried.
        # The body's pieces as hyper read them (no ``min_chunk_size``: obstore would join them
        # into a new buffer of a part, in Rust), each copied once into the part (`._pieces`).
        import obstore

        options: Any = {"range": {"offset": start}} if start else None
        result = await self._call(
            lambda: _awaited(obstore.get_async(self.store, key, options=options))
        )
        stream = result.stream(min_chunk_size=0)
        pieces = Pieces(lambda _: _next_chunk(stream))

        async def next_piece(wanted: int) -> memoryview | None:
            return await self._call(lambda: pieces.part(wanted), retried=False)

        async def current_version() -> str | None:
            meta = await self._call(lambda: _awaited(obstore.head_async(self.store, key)))
            return meta.get("e_tag")

        parts = self._streamed_parts(
            key, start, size, part, next_piece, result.meta.get("e_tag"), current_version
        )
        async with contextlib.aclosing(parts):
            async for data in parts:
                yield data
                del data  # see `AnyioStore._read_parts`

    async def _backend_checksum(self, key: str) -> str | None:
        import obstore

        if type(self.store).__name__ != "S3Store":
            return None
        meta = await self._call(lambda: _awaited(obstore.head_async(self.store, key)))
        return etag_checksum(meta.get("e_tag"))

    async def _backend_delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            await self._call(lambda: _awaited(obstore.delete_async(self.store, key)))

    async def _backend_exists(self, key: str) -> bool:
        import obstore

        try:
            await self._call(lambda: _awaited(obstore.head_async(self.store, key)))
        except FileNotFoundError:
            return False
        except obstore.exceptions.GenericError as error:
            if _os_error(error) != errno.ENOTDIR:
                raise
            return False  # a key on its path (obstore's local store): no file of this name
        return True

    async def _backend_getsize(self, key: str) -> int:
        import obstore

        try:
            meta = await self._call(lambda: _awaited(obstore.head_async(self.store, key)))
        except obstore.exceptions.GenericError as error:
            if _os_error(error) != errno.ENOTDIR:
                raise
            raise FileNotFoundError(key) from None
        return int(meta["size"])

    def _keys_under(self, folder: str) -> list[str]:
        """Every key under ``folder``, as one blocking call: names that are no keys (see
        `Lister`, and our own key rules, which `get` applies) are left out."""
        lister = Lister(self.store, folder or None, 1000)
        keys: list[str] = []
        while (page := lister.next_page()) is not None:
            keys.extend(path for path, _ in page if is_valid_key(path))
        return keys

    async def _list_under(self, folder: str) -> list[str]:
        return await self._call_blocking(lambda: self._keys_under(folder))

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        # obstore lists whole path segments ("a" means "a/…"): list the folder, filter by string.
        folder = posixpath.dirname(prefix)
        return [key for key in await self._list_under(folder) if key.startswith(prefix)]

    async def _backend_list_pages(self, prefix: str) -> AsyncGenerator[list[Entry], None]:
        # obstore lists whole path segments: "a" means "a/...", which is what a node is. A name
        # obstore refuses comes with its page (and no size), for the copy to count and leave out.
        lister = Lister(self.store, prefix.rstrip("/") or None, PAGE_SIZE)

        while True:
            # The blocking API in a thread, as the store lists: one request per page.
            page = await self._call_blocking(lister.next_page)
            if page is None:
                return
            yield page

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        import obstore
        import obstore.exceptions
        import obstore.store

        folder = prefix.rstrip("/")
        # obstore's LocalStore lists directories as common prefixes, empty ones too (left by
        # deletes); a zarr store has folders only as parts of keys. Object stores have no empty
        # folders, so only there is each folder asked for one key.
        local = isinstance(self.store, obstore.store.LocalStore)

        def names_under() -> list[str]:
            try:
                found = obstore.list_with_delimiter(self.store, prefix=folder or None)
            except obstore.exceptions.InvalidPathError:
                # A name obstore refuses among them: the names from the folder's listing.
                start = len(folder) + 1 if folder else 0
                return [key[start:].split("/", 1)[0] for key in self._keys_under(folder)]
            folders = [p.rstrip("/") for p in found["common_prefixes"]]
            if local:
                folders = [p for p in folders if _holds_a_key(self.store, p)]
            names = [posixpath.basename(p) for p in folders]
            return names + [posixpath.basename(meta["path"]) for meta in found["objects"]]

        names = set(await self._call_blocking(names_under))
        return sorted(name for name in names if is_valid_key(name))

    async def _backend_delete_dir(self, prefix: str) -> None:
        keys = await self._list_under(prefix.rstrip("/"))
        await self._for_each(keys, self._backend_delete)
