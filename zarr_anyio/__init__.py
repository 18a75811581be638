"""Zarr stores written against anyio: drop-in for ``zarr.storage``, under asyncio and trio."""

from ._base import AnyioStore, FetchRequest, RemoteStore
from ._limit import Limiter
from ._limits import NO_RETRY, RateLimit, Retry
from ._open import open_store
from .fsspec import FsspecStore
from .local import LeavesRoot, LocalStore
from .memory import MemoryStore
from .object import ObjectStore
from .zip import ZipStore

__all__ = [
    "NO_RETRY",
    "AnyioStore",
    "FetchRequest",
    "FsspecStore",
    "LeavesRoot",
    "Limiter",
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "RateLimit",
    "RemoteStore",
    "Retry",
    "ZipStore",
    "open_store",
]
__version__ = "0.1.0"
