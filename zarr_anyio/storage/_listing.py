"""Listing a node of a store a page at a time, with sizes: what ``copy``, ``ls`` and ``info`` walk.

A store's ``list_prefix`` gives every key before the first one can be used (each backend
collects its whole listing: a Python string per key, ~100 bytes each, so 10 million keys are a
gigabyte before any work starts). The command line only ever needs the keys in passing, so it
reads them where the backend pages, through each store's ``_backend_list_pages`` hook: one folder
at a time on a local disk (one worker-thread hop per folder), one page of up to 1,000 objects per
request from S3 through s3fs or obstore (which also give each object's size, so no request per
key is needed to know it). Other stores (zip, memory, other fsspec filesystems) hold or fetch
their listing whole anyway: the hook's default takes it from ``list_prefix`` and gives it on in
pages, sizes asked of the store.

Each page is one backend call made under one token of the store's limit, so listing counts
against ``max_concurrency`` like any other request. Nothing here holds a task group or cancel
scope across a ``yield``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from ._base import PAGE_SIZE, AnyioStore, Entry
from ._keys import directory_prefix

__all__ = ["PAGE_SIZE", "Entry", "list_node"]


async def list_node(store: AnyioStore, prefix: str = "") -> AsyncGenerator[list[Entry], None]:
    """Every key under the node ``prefix`` (``""``: the whole store), a page at a time."""
    prefix = directory_prefix(prefix)
    await store._ensure_open()
    pages = store._backend_list_pages(prefix)
    async with contextlib.aclosing(pages):
        async for page in pages:
            if page:
                yield page
