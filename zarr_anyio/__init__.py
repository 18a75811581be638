"""Zarr stores written against anyio: drop-in for ``zarr.storage``, under asyncio and trio.

``zarr_anyio.api`` is zarr's async array and group API for both; `AsyncArray` and `AsyncGroup`
wrap zarr's arrays and groups for it.
"""

from . import api
from ._adaptive import AdaptiveLimiter
from ._base import AnyioStore, BlockingStore, FetchRequest
from ._blocks import Block
from ._http_range import RangeNotHonoured
from ._keys import byte_range_slice, names_under
from ._limit import Limiter
from ._nodes import AsyncArray, AsyncGroup
from ._open import open_store, open_store_async
from ._remote import RemoteStore, RequestStats
from ._retry import NO_RETRY, RateLimit, Retry, RetryBudget
from .fsspec import FsspecStore
from .local import LeavesRoot, LocalStore
from .memory import MemoryStore
from .object import ObjectStore
from .zip import ZipStore

__all__ = [
    "NO_RETRY",
    "AdaptiveLimiter",
    "AnyioStore",
    "AsyncArray",
    "AsyncGroup",
    "Block",
    "BlockingStore",
    "FetchRequest",
    "FsspecStore",
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
    "ZipStore",
    "api",
    "byte_range_slice",
    "names_under",
    "open_store",
    "open_store_async",
]
__version__ = "0.1.0"
