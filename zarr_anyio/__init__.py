"""Zarr stores written against anyio: drop-in for ``zarr.storage``, under asyncio and trio."""

from ._base import AnyioStore, FetchRequest
from .local import LocalStore
from .memory import MemoryStore
from .zip import ZipStore

__all__ = ["AnyioStore", "FetchRequest", "LocalStore", "MemoryStore", "ZipStore"]
__version__ = "0.1.0"
