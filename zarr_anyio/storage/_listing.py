"""Listing a node of a store a page at a time, with sizes: what ``copy``, ``ls`` and ``info`` walk.

A store's ``list_prefix`` gives every key before the first one can be used (each backend
collects its whole listing: a Python string per key, ~100 bytes each, so 10 million keys are a
gigabyte before any work starts). The command line only ever needs the keys in passing, so this
module reads them where the backend pages: one folder at a time on a local disk (one worker-thread
hop per folder), one page of up to 1,000 objects per request from S3 through s3fs or obstore
(which also give each object's size, so no request per key is needed to know it). Other stores
(zip, memory, other fsspec filesystems) hold or fetch their listing whole anyway: it is taken
from ``list_prefix`` and given on in pages, sizes asked of the store.

Each page is one backend call made under one token of the store's limit, so listing counts
against ``max_concurrency`` like any other request. Nothing here holds a task group or cancel
scope across a ``yield``.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio._core.threads import run_in_worker

from ._base import AnyioStore
from ._fsspec import FsspecStore
from ._keys import directory_prefix
from ._local import Folder, LocalStore, scan_folder
from ._obstore import ObjectStore

__all__ = ["PAGE_SIZE", "Entry", "list_node"]

PAGE_SIZE = 1000
"""Keys per page: S3's own page size, and what one worker-thread hop takes of a local folder."""

Entry = tuple[str, int | None]
"""A key and its size in bytes (``None`` where the backend does not say)."""


async def list_node(store: AnyioStore, prefix: str = "") -> AsyncGenerator[list[Entry], None]:
    """Every key under the node ``prefix`` (``""``: the whole store), a page at a time."""
    prefix = directory_prefix(prefix)
    await store._ensure_open()
    if isinstance(store, LocalStore):
        pages = _local_pages(store, prefix)
    elif isinstance(store, ObjectStore):
        pages = _obstore_pages(store, prefix)
    elif isinstance(store, FsspecStore) and _pages_s3(store):
        pages = _s3fs_pages(store, prefix)
    else:
        pages = _listed_pages(store, prefix)
    async with contextlib.aclosing(pages):
        async for page in pages:
            if page:
                yield page


# ---------------------------------------------------------------- local folders


async def _local_pages(store: LocalStore, prefix: str) -> AsyncGenerator[list[Entry], None]:
    # Depth first, so what waits in memory is the folders not yet read, not their keys. Each
    # folder is read as the store lists (`scan_folder`): never through a link out of the root.
    root = os.fspath(store.root)
    pending: list[Folder] = [(prefix, frozenset())]
    while pending:
        folder = pending.pop()
        async with store._limit.current():
            files, folders = await run_in_worker(lambda _: scan_folder(root, folder))  # noqa: B023
        pending.extend(reversed(folders))
        entries: list[Entry] = list(files)
        for start in range(0, len(entries), PAGE_SIZE):
            yield entries[start : start + PAGE_SIZE]


# ---------------------------------------------------------------- obstore


async def _obstore_pages(store: ObjectStore, prefix: str) -> AsyncGenerator[list[Entry], None]:
    import obstore

    # obstore lists whole path segments: "a" means "a/...", which is what a node is.
    stream = obstore.list(store.store, prefix=prefix.rstrip("/") or None, chunk_size=PAGE_SIZE)

    def next_page() -> list[Entry] | None:
        batch = next(stream, None)
        return None if batch is None else [(meta["path"], int(meta["size"])) for meta in batch]

    while True:
        # The blocking API in a thread, as ObjectStore lists: one request per page.
        page = await store._call_blocking(next_page)
        if page is None:
            return
        yield page


# ---------------------------------------------------------------- s3fs


def _pages_s3(store: FsspecStore) -> bool:
    protocol = store.fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return (
        any(p in ("s3", "s3a") for p in protocols)
        and bool(store.fs.async_impl)
        and hasattr(store.fs, "_iterdir")
    )


async def _s3fs_pages(store: FsspecStore, prefix: str) -> AsyncGenerator[list[Entry], None]:
    fs = store.fs
    bucket, root, _ = fs.split_path(store.path)
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

    loop = store._loop()
    try:
        while True:
            async with store._limit.current():
                page = await run_on_loop(take_page, loop)
            if not page:
                return
            yield page
    finally:
        await _shielded(lambda: run_on_loop(close, loop))


async def _shielded(make: Callable[[], Any]) -> None:
    import anyio

    with anyio.CancelScope(shield=True):
        await make()


# ---------------------------------------------------------------- everything else


def _pages_of(keys: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(keys), PAGE_SIZE):
        yield keys[start : start + PAGE_SIZE]


async def _listed_pages(store: AnyioStore, prefix: str) -> AsyncGenerator[list[Entry], None]:
    keys = [key async for key in store.list_prefix(prefix)]
    for names in _pages_of(keys):
        sizes: dict[str, int | None] = {}

        async def size_of(key: str) -> None:
            try:
                sizes[key] = await store.getsize(key)  # noqa: B023
            except FileNotFoundError:
                pass  # gone since it was listed
            except ValueError:
                sizes[key] = None  # not a valid key: the caller decides what to do with it  # noqa: B023

        await store._for_each(names, size_of)
        yield [(key, sizes[key]) for key in names if key in sizes]
