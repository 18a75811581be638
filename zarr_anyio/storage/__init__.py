"""The stores: zarr_anyio's ``zarr.storage``.

One private module per backend (`_memory`, `_local`, `_zip`, `_fsspec`, `_obstore`), each holding
only what is particular to its backend, with its helpers beside it (`_localfs` and `_beneath`:
file-system calls beneath a root; `_zipformat` and `_zipread`: writing and reading the zip
format); what the stores share lives once: `_base` (`AnyioStore`, `BlockingStore`: opening,
validation, the limit, bulk calls, the sync surface), `_remote` (`RemoteStore`: retries, the
adaptive window, counters), `_keys` (keys are untrusted input), `_retry`, `_listing` (a node a
page at a time), `_open` (`open_store`).
"""

from ._base import AnyioStore, BlockingStore, FetchRequest
from ._beneath import LeavesRoot
from ._client_retries import ClientRetriesWarning
from ._conflicts import FolderIsAKey, KeyConflict, KeyIsAFolder
from ._fsspec import FsspecStore
from ._http_range import RangeNotHonoured
from ._keys import byte_range_slice, names_under
from ._local import LocalStore
from ._memory import MemoryStore
from ._obstore import ObjectStore
from ._open import open_store, open_store_async
from ._remote import RemoteStore, RequestStats
from ._retry import DEFAULT_DEADLINE, NO_RETRY, DeadlineExceeded, RateLimit, Retry, RetryBudget
from ._zip import ArchiveLocked, RewriteRefused, ZipNotRewrittenWarning, ZipStore

__all__ = [
    "DEFAULT_DEADLINE",
    "NO_RETRY",
    "AnyioStore",
    "ArchiveLocked",
    "BlockingStore",
    "ClientRetriesWarning",
    "DeadlineExceeded",
    "FetchRequest",
    "FolderIsAKey",
    "FsspecStore",
    "KeyConflict",
    "KeyIsAFolder",
    "LeavesRoot",
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
    "byte_range_slice",
    "names_under",
    "open_store",
    "open_store_async",
]
