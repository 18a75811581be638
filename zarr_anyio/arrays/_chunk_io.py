"""What the codec pipeline and the sharding reader share: the chunk items zarr hands a
pipeline, the one blocking store a batch of them reads, and a hop to a worker thread under a
token of the store's limiter."""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Sequence
from math import prod
from typing import Any, TypeVar

import numpy as np
from zarr.abc.store import ByteGetter, ByteSetter
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import NDBuffer
from zarr.core.config import config
from zarr.core.indexing import SelectorTuple
from zarr.storage import StorePath

from zarr_anyio._core.limit import Limiter, OneLoopLimiter
from zarr_anyio._core.threads import CheckCancelled, run_in_worker
from zarr_anyio.storage import AnyioStore, BlockingStore
from zarr_anyio.storage._keys import validate_key

__all__ = [
    "ReadItem",
    "WriteItem",
    "blocking_store_of",
    "decode_threads",
    "decoded_bytes",
    "fetchers_for",
    "fill_value_or_default",
    "get_status",
    "hop_with_token",
    "key_of",
    "store_of",
    "zarr_merge",
]

T = TypeVar("T")
S = TypeVar("S", bound=AnyioStore)

# zarr >= 3.4 keeps the chunk helpers in a module of their own, where the merge is a function;
# in zarr 3.1 the merge is a method of the batched pipeline.
zarr_merge: Callable[..., NDBuffer] | None
try:
    _chunk_utils = importlib.import_module("zarr.core.chunk_utils")
except ImportError:
    _chunk_utils = importlib.import_module("zarr.core.codec_pipeline")
    zarr_merge = None
else:
    zarr_merge = _chunk_utils._merge_chunk_array
fill_value_or_default: Callable[[ArraySpec], Any] = _chunk_utils.fill_value_or_default


ReadItem = tuple[ByteGetter, ArraySpec, SelectorTuple, SelectorTuple, bool]
WriteItem = tuple[ByteSetter, ArraySpec, SelectorTuple, SelectorTuple, bool]


def decode_threads() -> int:
    """How many batches are decoded at once: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def get_status(present: bool) -> dict[str, str]:
    # zarr >= 3.4's GetResult (a TypedDict); zarr 3.1 ignores what read gives.
    return {"status": "present" if present else "missing"}


def decoded_bytes(spec: ArraySpec) -> int:
    return prod(spec.shape) * np.dtype(spec.dtype.to_native_dtype()).itemsize


def key_of(getter: ByteGetter | ByteSetter | str) -> str:
    """The store key of a chunk item's getter: a `StorePath` (`blocking_store_of` saw to it),
    or the key itself (`._fast_read`'s items)."""
    if isinstance(getter, str):
        key = getter
    else:
        assert isinstance(getter, StorePath)
        key = getter.path
    validate_key(key)
    return key


async def hop_with_token(
    limiter: Limiter | OneLoopLimiter,
    work: Callable[[CheckCancelled, Callable[[], None]], T],
) -> T:
    """``work(check_cancelled, io_done)`` in a worker thread, holding one token of ``limiter``
    from before the hop until ``work`` calls ``io_done()`` (its I/O is over, its decoding is
    not), or the hop ends.

    Our `Limiter` can be given back from the worker thread, so the token covers the I/O only;
    an anyio limiter belongs to its loop, so it is given back when the hop is over."""
    await limiter.acquire()
    held = [True]
    lock = threading.Lock()

    def give_back() -> None:
        with lock:
            if not held[0]:
                return
            held[0] = False
        limiter.release()

    io_done = give_back if isinstance(limiter, Limiter) else (lambda: None)
    try:
        return await run_in_worker(lambda check_cancelled: work(check_cancelled, io_done))
    finally:
        give_back()


def store_of(batch: Sequence[ReadItem | WriteItem], kind: type[S]) -> S | None:
    """The one store of ``kind`` every chunk of the batch is a key of, if there is one."""
    first = batch[0][0]
    if not isinstance(first, StorePath) or not isinstance(first.store, kind):
        return None
    store = first.store
    for item in batch:
        getter = item[0]
        if not isinstance(getter, StorePath) or getter.store is not store:
            return None
    return store


def blocking_store_of(batch: Sequence[ReadItem | WriteItem]) -> BlockingStore | None:
    """The one BlockingStore every chunk of the batch is a key of, if there is one."""
    return store_of(batch, BlockingStore)  # type: ignore[type-abstract]


def fetchers_for(batch: list[ReadItem] | list[WriteItem]) -> int:
    first = batch[0][0]
    if isinstance(first, StorePath) and isinstance(first.store, AnyioStore):
        return first.store.max_concurrency
    return int(config.get("async.concurrency"))
