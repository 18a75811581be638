"""Zarr stores written against anyio: drop-in for ``zarr.storage``, under asyncio and trio.

``zarr_anyio.api`` is zarr's async array and group API for both; `AsyncArray` and `AsyncGroup`
wrap zarr's arrays and groups for it.

The package is layered, and imports run one way (``cli → storage → _core``, ``api → arrays →
storage → _core``): `zarr_anyio._core` is the concurrency engine (loops, limiters, worker
threads, the asyncio bridge), `zarr_anyio.storage` the stores, `zarr_anyio.arrays` zarr's arrays
and groups from any event loop, `zarr_anyio.cli` the ``zarr-anyio`` command. Every public name is
re-exported here.
"""

from . import api
from ._core.adaptive import AdaptiveLimiter
from ._core.limit import Limiter
from .arrays import AsyncArray, AsyncGroup, Block
from .storage import (
    NO_RETRY,
    AnyioStore,
    ArchiveLocked,
    BlockingStore,
    FetchRequest,
    FolderIsAKey,
    FsspecStore,
    KeyConflict,
    KeyIsAFolder,
    LeavesRoot,
    LocalStore,
    MemoryStore,
    ObjectStore,
    RangeNotHonoured,
    RateLimit,
    RemoteStore,
    RequestStats,
    Retry,
    RetryBudget,
    RewriteRefused,
    ZipNotRewrittenWarning,
    ZipStore,
    byte_range_slice,
    names_under,
    open_store,
    open_store_async,
)

__all__ = [
    "NO_RETRY",
    "AdaptiveLimiter",
    "AnyioStore",
    "ArchiveLocked",
    "AsyncArray",
    "AsyncGroup",
    "Block",
    "BlockingStore",
    "FetchRequest",
    "FolderIsAKey",
    "FsspecStore",
    "KeyConflict",
    "KeyIsAFolder",
    "LeavesRoot",
    "Limiter",
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "RangeNotHonoured",
    "RateLimit",
    "RemoteStore",
    "RequestStats",
    "Retry",
    "RetryBudget",
    "RewriteRefused",
    "ZipNotRewrittenWarning",
    "ZipStore",
    "api",
    "byte_range_slice",
    "names_under",
    "open_store",
    "open_store_async",
]
__version__ = "0.1.0"
