"""Zarr stores written against anyio: drop-in for ``zarr.storage``, under asyncio and trio."""

from ._adaptive import AdaptiveLimiter
from ._base import AnyioStore, BlockingStore, FetchRequest
from ._keys import byte_range_slice, names_under
from ._limit import Limiter
from ._open import open_store, open_store_async
from ._remote import RemoteStore, RequestStats
from ._retry import NO_RETRY, RateLimit, Retry, RetryBudget
from .fsspec import FsspecStore
from .local import LocalStore
from .memory import MemoryStore
from .object import ObjectStore
from .zip import ZipStore

__all__ = [
    "NO_RETRY",
    "AdaptiveLimiter",
    "AnyioStore",
    "BlockingStore",
    "FetchRequest",
    "FsspecStore",
    "Limiter",
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "RateLimit",
    "RemoteStore",
    "RequestStats",
    "Retry",
    "RetryBudget",
    "ZipStore",
    "byte_range_slice",
    "names_under",
    "open_store",
    "open_store_async",
]
__version__ = "0.1.0"
