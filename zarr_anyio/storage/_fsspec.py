"""FsspecStore: any fsspec filesystem, drop-in for ``zarr.storage.FsspecStore``.

An async filesystem (s3fs, http, gcsfs, …) runs its coroutines on an asyncio loop through the
bridge: its own loop if it has one (created with ``asynchronous=False``), otherwise the bridge's
loop, so its network session lives on one loop whoever calls. A sync filesystem (memory, local,
zip, …) runs in worker threads. Either way each request holds a token of the store's limiter,
waits its turn under ``rate_limit=`` and is retried under ``retry=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import posixpath
import threading
import urllib.parse
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
)
from typing import Any, Self, TypeVar, Unpack

import anyio
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from zarr_anyio._core.bridge import bridge_loop, run_blocking, run_on_loop
from zarr_anyio._core.extras import require_for_url
from zarr_anyio._core.fork import at_fork_in_child, keep_inherited
from zarr_anyio._core.threads import run_in_worker

from . import _live
from ._base import PAGE_SIZE, Entry, Part
from ._checksum import etag_checksum
from ._client_pools import fsspec_options_with_pool, pool_size
from ._client_retries import (
    fsspec_options_without_retries,
    turn_off_fsspec_retries,
    warn_if_client_retries,
)
from ._conflicts import find_conflict
from ._http_range import get_range
from ._keys import is_valid_key
from ._pieces import Pieces
from ._redact import redact
from ._remote import RemoteOptions, RemoteStore, check_http_root
from ._retry import describe, http_status
from ._sessions import close_session, close_when_collected

__all__ = ["ALLOWED_EXCEPTIONS", "FsspecStore"]

T = TypeVar("T")

# The most keys S3's DeleteObjects takes in one request.
S3_DELETE_BATCH = 1000

ALLOWED_EXCEPTIONS: tuple[type[Exception], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


def _join(root: str, key: str) -> str:
    root = root.rstrip("/")
    return f"{root}/{key}" if root else key


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _takes_keyword(fs: Any, method: str, keyword: str) -> bool:
    """Whether ``fs.<method>`` names ``keyword`` among its parameters."""
    function = getattr(fs, method, None)
    if function is None:
        return False
    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _fetch_limits(byte_range: ByteRequest | None) -> tuple[int | None, int | None]:
    """fsspec's ``start``/``end`` for a byte range (a negative start is a suffix)."""
    if byte_range is None:
        return None, None
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, None
    if isinstance(byte_range, SuffixByteRequest):
        return -byte_range.suffix, None
    raise TypeError(f"Unexpected byte_range, got {byte_range!r}.")


_renew_lock = threading.Lock()


def _renew_lock_after_fork() -> None:
    global _renew_lock
    _renew_lock = threading.Lock()  # a thread of the parent may have held it as it forked


at_fork_in_child(_renew_lock_after_fork)


def _renewed(fs: Any) -> Any:
    """A filesystem like ``fs``, made in this process: what unpickling ``fs`` gives (its class,
    constructor arguments and options), but an instance of its own, not fsspec's cached one."""
    make, (cls, args, options) = fs.__reduce__()
    return make(cls, args, {**options, "skip_instance_cache": True})


def _is_empty_range(byte_range: ByteRequest | None) -> bool:
    # HTTP cannot ask for zero bytes ("bytes=3-2" is the whole object on many servers).
    return (isinstance(byte_range, RangeByteRequest) and byte_range.start == byte_range.end) or (
        isinstance(byte_range, SuffixByteRequest) and byte_range.suffix == 0
    )


class FsspecStore(RemoteStore):
    """Store for any fsspec filesystem.

    Parameters
    ----------
    fs
        An fsspec filesystem (async or not), or an ``FSMap`` from ``fs.get_mapper(path)``.
    read_only
        Refuse every write.
    path
        The root of the store in ``fs`` (no scheme).
    allowed_exceptions
        Errors that mean "no such key" when reading.
    max_concurrency, limiter, adaptive, retry, retry_budget, timeout, rate_limit
        See `RemoteStore`.
    """

    fs: Any
    path: str
    allowed_exceptions: tuple[type[Exception], ...]

    def __init__(
        self,
        fs: Any,
        read_only: bool = False,
        path: str = "/",
        allowed_exceptions: tuple[type[Exception], ...] = ALLOWED_EXCEPTIONS,
        **options: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(read_only=read_only, **options)
        mapper_fs = getattr(fs, "fs", None)
        if mapper_fs is not None and hasattr(fs, "root"):
            # An FSMap: its filesystem, rooted where the mapping is.
            path, fs = fs.root, mapper_fs
        if not hasattr(fs, "protocol") or not hasattr(fs, "async_impl"):
            raise TypeError(f"fs must be an fsspec filesystem or FSMap, got {type(fs).__name__}")
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, got {type(path).__name__}")
        warn_if_client_retries(fs, "FsspecStore")
        self.fs = fs
        self.path = path
        self.allowed_exceptions = allowed_exceptions
        # A key is a path in the store, never URL syntax: over http(s) every character but
        # letters, digits, "-._~" and the separator "/" is percent-encoded, so "%2e%2e" stays
        # a literal segment (it is not ".."), "#" no fragment and "?" no query (as obstore's
        # HTTPStore does). Encoded, a key has no character that yarl would decode again.
        self._url_keys = bool(_protocols(fs) & {"http", "https"})
        if self._url_keys:
            check_http_root(path)
        # fsspec's HTTP filesystem returns whatever body answers a range request (a whole
        # object from a server that ignores Range): ranges are read and checked by `get_range`.
        self._checked_ranges = self._url_keys and bool(fs.async_impl) and hasattr(fs, "set_session")
        # s3fs (since 2026) reads a whole object by asking its size first (a HEAD) and, past
        # its block size, in up to ``max_concurrency`` ranged requests of its own: two requests
        # per chunk, and fetches outside this store's limit (fsspec/s3fs#1027, from s3fs#1007).
        # One GET per key instead.
        self._whole_read_kwargs: dict[str, Any] = (
            {"max_concurrency": 1} if _takes_keyword(fs, "_cat_file", "max_concurrency") else {}
        )
        # A filesystem that from_url made is ours to close; one the caller passed is theirs.
        self._owns_fs = False
        # The store that owns the filesystem, kept alive by a copy that reads through it.
        self._session_owner: FsspecStore | None = None
        # The process whose filesystem self.fs is (see _filesystem).
        self._fs_pid = os.getpid()
        # open_store(str(store)) reaches this filesystem (its options, credentials) again
        # while this store lives.
        _live.remember(str(self), self)

    @classmethod
    def from_url(
        cls,
        url: str,
        storage_options: dict[str, Any] | None = None,
        read_only: bool = False,
        allowed_exceptions: tuple[type[Exception], ...] = ALLOWED_EXCEPTIONS,
        **kwargs: Any,
    ) -> FsspecStore:
        """A store for ``url`` (``s3://bucket/path``, ``https://…``, ``memory://…``, …)."""
        require_for_url(url, url.partition("://")[0].rpartition("::")[2])
        from fsspec import url_to_fs

        # An instance of our own: an async filesystem's session belongs to the loop that first
        # used it, and fsspec would otherwise hand the same cached instance to other code.
        options = {"asynchronous": True, "skip_instance_cache": True, **(storage_options or {})}
        # The client's own retries off (botocore's here, s3fs's below): ours see every throttle.
        options = fsspec_options_without_retries(url, options)
        protocol = url.partition("://")[0].lower()  # a chained URL's options are nested: left
        options = fsspec_options_with_pool(protocol, options, pool_size(kwargs))
        fs, path = url_to_fs(url, **options)
        turn_off_fsspec_retries(fs)
        store = cls(
            fs, read_only=read_only, path=path, allowed_exceptions=allowed_exceptions, **kwargs
        )
        store._owns_fs = True
        close_when_collected(store, fs)
        return store

    @classmethod
    def from_mapper(cls, fs_map: Any, read_only: bool = False, **kwargs: Any) -> FsspecStore:
        return cls(fs_map, read_only=read_only, **kwargs)

    @classmethod
    def from_upath(
        cls,
        upath: Any,
        read_only: bool = False,
        allowed_exceptions: tuple[type[Exception], ...] = ALLOWED_EXCEPTIONS,
        **kwargs: Any,
    ) -> FsspecStore:
        """A store at a ``upath.UPath`` (universal_pathlib): its filesystem and its path, as
        zarr's ``FsspecStore.from_upath``; ``kwargs`` (``max_concurrency=``, ``retry=``, …) go to
        the store. The filesystem is the path's own (shared, and closed by its owner)."""
        return cls(
            upath.fs,
            read_only=read_only,
            path=upath.path.rstrip("/"),
            allowed_exceptions=allowed_exceptions,
            **kwargs,
        )

    def _with_options(self, read_only: bool, options: dict[str, Any]) -> Self:
        copy = type(self)(
            self._filesystem(),
            read_only=read_only,
            path=self.path,
            allowed_exceptions=self.allowed_exceptions,
            **options,
        )
        # The copy reads through our filesystem: while it lives, its session stays open.
        copy._session_owner = self if self._owns_fs else self._session_owner
        return copy

    def __str__(self) -> str:
        """The URL of the store's root (``s3://bucket/path``), credentials in it shown as
        ``***``; `open_store` opens it again while this store lives."""
        try:
            return redact(str(self.fs.unstrip_protocol(self.path)))
        except Exception:  # a filesystem that cannot say: its repr
            return repr(self)

    def __repr__(self) -> str:
        return f"<FsspecStore({type(self.fs).__name__}, {redact(self.path)})>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, type(self))
            and self.path == other.path
            and self.read_only == other.read_only
            and self.fs == other.fs
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["fs"] = self._filesystem()
        del state["_fs_pid"]
        state["_session_owner"] = None  # the copy in another process has a filesystem of its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fs_pid = os.getpid()  # unpickling made the filesystem anew in this process
        if self._owns_fs:
            close_when_collected(self, self.fs)

    def _owned_session_on_bridge(self) -> bool:
        fs = self._filesystem()
        return self._owns_fs and bool(fs.async_impl) and self._loop() is None

    def close(self) -> None:
        """Close the store; a filesystem made by `from_url` also closes its network session
        (it opens a new one if the store is used again)."""
        if self._owned_session_on_bridge():
            run_blocking(lambda: close_session(self.fs))
        super().close()

    async def aclose(self) -> None:
        if self._owned_session_on_bridge():
            await run_on_loop(lambda: close_session(self.fs))
        super().close()

    # ---------------------------------------------------------------- calling the filesystem

    def _filesystem(self) -> Any:
        """``self.fs``, made anew (`_renewed`) the first time a forked child uses it.

        An async filesystem's session lives on an event loop whose thread the child does not
        have (the bridge's or fsspec's own), and its sockets are the parent's: used in the child
        it waited for ever, or would have mixed the two processes' requests on one connection.
        fsspec itself refuses such an instance in a child ("not fork-safe"). The old one is
        kept, never closed: closing it would unregister the parent's sockets from the epoll
        instance the two processes share. A sync filesystem (memory, local) is kept as it is.
        """
        if self._fs_pid != os.getpid():
            with _renew_lock:
                if self._fs_pid != os.getpid():
                    if self.fs.async_impl:
                        keep_inherited(self.fs)
                        self.fs = _renewed(self.fs)
                    self._fs_pid = os.getpid()
        return self.fs

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        # A sync instance of an async filesystem has its own loop thread (fsspec's); an async
        # instance gets the bridge's loop, so its session stays on one loop.
        fs = self._filesystem()
        asynchronous = getattr(fs, "asynchronous", False)
        loop: asyncio.AbstractEventLoop | None = None if asynchronous else fs.loop
        return loop

    def _requests_loop(self) -> asyncio.AbstractEventLoop | None:
        # An async filesystem's requests are made on its loop: its own, or the bridge's.
        if not self._filesystem().async_impl:
            return None
        return self._loop() or bridge_loop()

    async def _fs(self, method: str, *args: Any, _sent: int = 0, **kwargs: Any) -> Any:
        """Call ``fs.<method>`` (or its coroutine ``fs._<method>``) as one request (that sends
        ``_sent`` bytes)."""
        fs = self._filesystem()
        if fs.async_impl:
            coroutine_function = getattr(fs, f"_{method}")
            return await self._on_loop(lambda _: coroutine_function(*args, **kwargs), _sent)
        function = getattr(fs, method)
        return await self._request(
            lambda: run_in_worker(lambda _: function(*args, **kwargs)), sent=_sent
        )

    async def _on_loop(
        self,
        make: Callable[[Any], Coroutine[Any, Any, T]],
        sent: int = 0,
        *,
        retried: bool = True,
        patient: bool = False,
    ) -> T:
        """Await ``make(fs)`` on the async filesystem's loop, as one request (never retried if
        not ``retried``: a step that a repeat would get wrong; without a timeout if
        ``patient``)."""
        fs = self._filesystem()
        loop = self._loop()

        def start() -> Awaitable[T]:
            return run_on_loop(lambda: make(fs), loop)

        if retried:
            return await self._request(start, sent=sent)
        return await self._request_once(start, sent=sent, patient=patient)

    async def _files_under(self, folder: str) -> list[str]:
        """Every file under ``folder`` (a path in ``fs``), as paths in ``fs``; ``[folder]`` if
        ``folder`` is a file itself (fsspec's ``find`` gives that file: memory, local, and s3fs
        when nothing is under it)."""
        try:
            found = await self._fs("find", folder, withdirs=False, detail=False)
        except self.allowed_exceptions:
            return []
        return list(found)

    async def _is_file(self, path: str) -> bool:
        """Whether ``path`` is a file, as one request, retried and raising like any other.

        Not fsspec's ``isfile``/``exists``: they answer ``False`` for any failure, so a 429 or
        a 500 made a key that is there look absent (no retry, no error).
        """
        try:
            info = await self._fs("info", path)
        except self.allowed_exceptions as error:
            # fsspec's http ``info`` raises FileNotFoundError for any failure, the real one as
            # its cause: only a real "not found" is an answer.
            if describe(error).transient:
                raise
            return False
        return bool(info.get("type") == "file")

    def _path(self, key: str) -> str:
        """The path in ``fs`` of ``key`` (or of a folder of keys)."""
        if not key:
            return self.path
        if self._url_keys:
            key = urllib.parse.quote(key, safe="/")
        return _join(self.path, key)

    def _key_of(self, path: str) -> str | None:
        """The key that a listed ``path`` names, or ``None`` if it names none.

        A listing may hold names that no key can reach: outside the root, refused by the key
        rules (``../secret``, a NUL, a backslash, a 300-byte segment: `get` would refuse them),
        or, over http(s), a segment that decodes to more than one (``a%2Fb``, whose key ``a/b``
        is another object). A listing gives only keys that `get` takes and that name the listed
        object; the others are left out.
        """
        root = self.path.rstrip("/")
        path = path.lstrip("/") if not root.startswith("/") else path
        if root and not path.startswith(root + "/"):
            return None
        key = path[len(root) + 1 :] if root else path
        if self._url_keys:
            segments = [urllib.parse.unquote(segment) for segment in key.split("/")]
            if any("/" in segment for segment in segments):
                return None
            key = "/".join(segments)
        return key if is_valid_key(key) else None

    # ---------------------------------------------------------------- backend hooks

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        path = self._path(key)
        try:
            if _is_empty_range(byte_range):
                if not await self._is_file(path):
                    return None
                return prototype.buffer.from_bytes(b"")
            if byte_range is not None and self._checked_ranges:
                asked = byte_range
                data = await self._on_loop(lambda fs: get_range(fs, path, asked))
            else:
                start, end = _fetch_limits(byte_range)
                whole = self._whole_read_kwargs if start is None and end is None else {}
                data = await self._fs("cat_file", path, start=start, end=end, **whole)
        except self.allowed_exceptions:
            return None
        except Exception as error:
            # A range that starts past the end: HTTP 416, told by the status the client
            # carries (s3fs keeps botocore's answer as the cause of its OSError), never by the
            # text. zarr's answer is "what exists": nothing.
            if byte_range is not None and http_status(error) == 416:
                return prototype.buffer.from_bytes(b"")
            raise
        return prototype.buffer.from_bytes(data)

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        path = self._path(key)
        data = value.to_bytes()
        # A file system whose keys are paths cannot hold `x` beside `x/y`: the local one says so
        # (IsADirectoryError, NotADirectoryError; FileExistsError making the folders of `p/q`
        # below a file `p`), the memory one refuses `p/q` too but writes `x` over a folder of
        # keys, which then reads as absent.
        protocols = _protocols(self.fs)
        in_memory = "memory" in protocols
        of_files = in_memory or "file" in protocols or "local" in protocols
        if in_memory and list(await self._backend_list_prefix(key + "/")):
            raise await find_conflict(self, key, f"the store {self}")
        try:
            await self._put_value(path, data, exclusive=exclusive)
        except IsADirectoryError:
            # A folder that holds no file (emptied by deletes) is as if it were not there.
            if await self._fs("find", path):
                raise await find_conflict(self, key, f"the store {self}") from None
            await self._fs("rm", path, recursive=True)
            await self._put_value(path, data, exclusive=exclusive)
        except (NotADirectoryError, FileExistsError):
            if not of_files:
                raise
            raise await find_conflict(self, key, f"the store {self}") from None

    async def _put_value(self, path: str, data: bytes, *, exclusive: bool) -> None:
        if not exclusive:
            await self._fs("pipe_file", path, data, _sent=len(data))
            return
        if _protocols(self.fs) & {"s3", "s3a"}:
            # A conditional PUT (If-None-Match: *): atomic on S3.
            try:
                await self._fs("pipe_file", path, data, mode="create", _sent=len(data))
            except FileExistsError:
                pass
            except OSError as error:
                # s3fs raises FileExistsError only when S3 names the failed condition; a bare
                # 412 PreconditionFailed to our If-None-Match means the same: the key exists.
                failure = describe(error)
                if failure.status != 412 and failure.code != "PreconditionFailed":
                    raise
            return
        # Elsewhere fsspec has no atomic create: check, then write (documented).
        if not await self._is_file(path):
            await self._fs("pipe_file", path, data, _sent=len(data))

    def _is_s3(self) -> bool:
        return bool(_protocols(self.fs) & {"s3", "s3a"}) and bool(self.fs.async_impl)

    @property
    def _streams_writes(self) -> bool:
        return self._is_s3()

    # S3's smallest part of a multipart upload, all but the last.
    _min_part_size = 5 << 20

    @property
    def _whole_reads_twice(self) -> bool:
        # s3fs reads a whole object with aiohttp's ``read()``, which joins the body's pieces
        # into new bytes; `_read_parts` copies them into one slot instead (see `._pieces`).
        return self._is_s3()

    async def _backend_set_streamed(self, key: str, parts: AsyncIterator[Part]) -> None:
        if not self._is_s3():
            await super()._backend_set_streamed(key, parts)
            return
        # S3's multipart upload, a part sent as each comes (several small ones joined up to
        # the least S3 takes); a value that fits in one part is one PUT, as `set` makes it.
        path = self._path(key)
        pending = bytearray()
        first: bytes | None = None
        upload: _MultipartUpload | None = None
        try:
            async for part in parts:
                if not pending and len(part) >= self._min_part_size:
                    # Big enough alone: copied once to the bytes botocore takes (a view of
                    # the read pool's slot it does not), not staged as well.
                    data = bytes(part)
                else:
                    pending += part
                    if len(pending) < self._min_part_size:
                        continue
                    data = bytes(pending)
                    pending.clear()
                del part  # its slot of the read pool is free for the next part
                if first is None:
                    first = data
                else:
                    if upload is None:
                        upload = await _MultipartUpload.start(self, path)
                        await upload.send(first)
                        first = b""
                    await upload.send(data)
                del data
            if upload is None:
                await self._put_value(path, (first or b"") + pending, exclusive=False)
                return
            if pending:
                await upload.send(bytes(pending))
            await upload.complete()
        except BaseException:
            if upload is not None:
                await upload.abort()
            raise

    async def _backend_read_parts(
        self, key: str, start: int, size: int, part: int
    ) -> AsyncGenerator[memoryview, None]:
        if not self._is_s3():
            async with contextlib.aclosing(
                super()._backend_read_parts(key, start, size, part)
            ) as parts:
                async for data in parts:
                    yield data
                    del data  # see `AnyioStore._read_parts`
            return
        # One GET whose body is taken a part at a time (see ObjectStore's): botocore's
        # streaming body, read on the filesystem's loop; a failure in the middle goes on with
        # ranged reads from there, each retried.
        bucket, path_key, _ = self.fs.split_path(self._path(key))
        answer = await self._on_loop(
            lambda fs: fs._call_s3(
                "get_object", Bucket=bucket, Key=path_key, Range=f"bytes={start}-"
            )
        )
        body = answer["Body"]
        # aiohttp's pieces, each copied once into the part (`._pieces`). Asked for a part at
        # once, aiohttp joins what it holds into a new piece of up to the part: asked for
        # less, it gives what it has without a join.
        pieces = Pieces(lambda wanted: body.read(min(wanted, _PIECE)))

        async def next_piece(wanted: int) -> memoryview:
            return await self._on_loop(lambda _: pieces.part(wanted), retried=False)

        async def current_version() -> str | None:
            head = await self._on_loop(
                lambda fs: fs._call_s3("head_object", Bucket=bucket, Key=path_key)
            )
            return head.get("ETag")  # type: ignore[no-any-return]

        try:
            parts = self._streamed_parts(
                key, start, size, part, next_piece, answer.get("ETag"), current_version
            )
            async with contextlib.aclosing(parts):
                async for data in parts:
                    yield data
                    del data
        finally:
            with anyio.CancelScope(shield=True):
                await run_on_loop(lambda: _close(body), self._loop())

    async def _backend_checksum(self, key: str) -> str | None:
        if not self._is_s3():
            return None
        info = await self._fs("info", self._path(key))
        if info.get("type") != "file":
            raise FileNotFoundError(key)
        return etag_checksum(info.get("ETag"))

    async def _backend_delete(self, key: str) -> None:
        with contextlib.suppress(*self.allowed_exceptions):
            await self._fs("rm_file", self._path(key))

    async def _backend_exists(self, key: str) -> bool:
        return await self._is_file(self._path(key))

    async def _backend_getsize(self, key: str) -> int:
        info = await self._fs("info", self._path(key))
        if info.get("type") != "file":
            raise FileNotFoundError(key)
        return int(info["size"])

    async def _backend_list_prefix(self, prefix: str) -> Iterable[str]:
        # Keys that start with the string prefix: list the folder the prefix ends in, filter.
        folder = posixpath.dirname(prefix)
        paths = await self._files_under(self._path(folder))
        keys = (self._key_of(path) for path in paths)
        return [key for key in keys if key is not None and key.startswith(prefix)]

    def _pages_s3(self) -> bool:
        return (
            bool(_protocols(self.fs) & {"s3", "s3a"})
            and bool(self.fs.async_impl)
            and hasattr(self.fs, "_iterdir")
        )

    async def _backend_list_pages(self, prefix: str) -> AsyncGenerator[list[Entry], None]:
        if not self._pages_s3():
            async for page in super()._backend_list_pages(prefix):
                yield page
            return
        fs = self._filesystem()  # made anew in a forked child
        bucket, root, _ = fs.split_path(self.path)
        key_prefix = posixpath.join(root, prefix) if root else prefix
        if root and not key_prefix.endswith("/"):
            key_prefix += "/"
        strip = len(root.rstrip("/")) + 1 if root else 0
        # s3fs's own paged listing, an async generator that lives on the filesystem's loop: each
        # step below takes one page's worth of it there, through the bridge.
        objects: Any = None

        async def take_page() -> list[Entry]:
            nonlocal objects
            if objects is None:
                objects = fs._iterdir(bucket, delimiter="", prefix=key_prefix)
            page: list[Entry] = []
            while len(page) < PAGE_SIZE:
                try:
                    info = await objects.__anext__()
                except StopAsyncIteration:
                    break
                if info.get("type") == "file":
                    page.append((str(info["name"]).split("/", 1)[1][strip:], int(info["size"])))
            return page

        async def close() -> None:
            if objects is not None:
                await objects.aclose()

        loop = self._loop()
        try:
            while True:
                async with self._limit.current():
                    page = await run_on_loop(take_page, loop)
                if not page:
                    return
                yield page
        finally:
            with anyio.CancelScope(shield=True):
                await run_on_loop(close, loop)

    async def _backend_list_dir(self, prefix: str) -> Iterable[str]:
        folder = self._path(prefix.rstrip("/"))
        try:
            entries = await self._fs("ls", folder, detail=False)
        except self.allowed_exceptions:
            return []
        # Only the names of children of the folder that a key can have (see _key_of): an index
        # page's "../secret" or "a%2Fb" is none.
        parent = prefix.rstrip("/")
        parent = f"{parent}/" if parent else ""
        names = set()
        for entry in entries:
            key = self._key_of(str(entry).rstrip("/"))
            if key is not None and key.startswith(parent) and "/" not in key[len(parent) :]:
                names.add(key[len(parent) :])
        names.discard("")
        return sorted(names)

    async def _backend_delete_dir(self, prefix: str) -> None:
        # Never ``fs.rm(paths)``: it expands glob patterns, and "a*", "a[b]" or "a?" are node
        # names zarr allows, whose deletion then took their siblings with them.
        folder = self._path(prefix.rstrip("/"))
        paths = await self._files_under(folder)
        # The node's keys ("x/…"), never a key "x" itself, which `find` gives when "x" is one.
        inside = self._filesystem()._strip_protocol(folder).rstrip("/")
        if inside:  # not the file system's root, under which everything is
            paths = [path for path in paths if str(path).startswith(inside + "/")]
        if hasattr(self.fs, "_bulk_delete") and self.fs.async_impl:
            # s3fs: one DeleteObjects request per 1,000 keys, taking paths literally.
            batches = [
                paths[i : i + S3_DELETE_BATCH] for i in range(0, len(paths), S3_DELETE_BATCH)
            ]

            async def delete_batch(batch: list[str]) -> None:
                await self._fs("bulk_delete", batch)

            await self._for_each(batches, delete_batch)
            return

        async def delete_one(path: str) -> None:
            with contextlib.suppress(*self.allowed_exceptions):
                await self._fs("rm_file", path)

        await self._for_each(paths, delete_one)


async def _close(body: Any) -> None:
    body.close()


# The most a streamed body is asked for at once: aiohttp's own pieces are up to 64 KiB.
_PIECE = 64 << 10


class _MultipartUpload:
    """One S3 multipart upload through s3fs's client, each step one request of the store
    (retried: a part sent again under its number replaces itself)."""

    def __init__(self, store: FsspecStore, bucket: str, key: str, upload_id: str) -> None:
        self.store = store
        self.bucket = bucket
        self.key = key
        self.upload_id = upload_id
        self.parts: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, store: FsspecStore, path: str) -> _MultipartUpload:
        bucket, key, _ = store.fs.split_path(path)
        answer = await store._on_loop(
            lambda fs: fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        )
        return cls(store, bucket, key, str(answer["UploadId"]))

    async def send(self, data: bytes) -> None:
        number = len(self.parts) + 1
        answer = await self.store._on_loop(
            lambda fs: fs._call_s3(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=data,
            ),
            sent=len(data),
        )
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    async def complete(self) -> None:
        await self.store._on_loop(
            lambda fs: fs._call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            ),
            # Not retried: a completed upload is gone, and a repeat would fail as NoSuchUpload.
            retried=False,
            patient=True,
        )
        self.store.fs.invalidate_cache(f"{self.bucket}/{self.key}")

    async def abort(self) -> None:
        # Whatever stopped the upload, its parts go: shielded from the cancellation that may be
        # the reason, bounded in case the server is what failed.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(10),
            contextlib.suppress(Exception),
        ):
            await self.store._on_loop(
                lambda fs: fs._call_s3(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                )
            )
