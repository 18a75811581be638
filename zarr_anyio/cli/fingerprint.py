"""Whether a key at the destination holds the source's value: what ``--skip-existing`` asks.

The cheapest comparison that can tell, in this order (rclone's ``--checksum`` works the same
way: hashes where both sides keep one of the same kind, else it reads):

1. Both stores keep a checksum of the same kind: compare them, no value read. Two S3 stores:
   the ETags of values written by one PUT are their MD5s (`zarr_anyio.storage._checksum`).
   One HEAD request a side instead of one GET.
2. One store keeps one: read the other side's value and compute the same checksum (a folder or
   zip file to S3, S3 to a folder: the local bytes are hashed, the S3 value is not downloaded).
3. Neither does (folders, zip files, memory, S3 values written by a multipart upload, whose
   ETag is no MD5): read both values and compare their bytes.

A size that differs settles it before any of these (the listing's sizes, no request).
``--size-only`` stops there. Values are read in parts of the copy's part size
(`.copy_stream`), so comparing a 2 GiB value costs memory for two parts.

A zip member's CRC-32 is not used as a kept checksum: it is the one of what was written, not
of what is there now, and a member damaged after the copy must be found (reading the member
whole checks it). An S3 ETag is S3's own check of what it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Literal

import anyio
from zarr.core.buffer import BufferPrototype

from zarr_anyio.storage._base import AnyioStore

from .copy_plan import _DAMAGED_ERRORS, Damaged, read_back
from .copy_stream import SourceChanged, Vanished, ranged_parts

__all__ = ["Compared", "compare", "same_bytes"]

# Parts at least this big are hashed in a worker thread (hashlib lets go of the GIL): 1 MiB of
# MD5 takes ~1.5 ms, long enough to stall the other workers' requests on the event loop.
_HASH_IN_THREAD = 1 << 20


@dataclass(frozen=True)
class Compared:
    """The answer: the same value or not, and how it was found out."""

    same: bool
    by: Literal["checksum", "bytes", "missing"]


class _Missing:
    pass


_MISSING = _Missing()

# What reading a destination's value in parts raises when it is not the value it should be.
_NOT_WHOLE: tuple[type[Exception], ...] = (Vanished, SourceChanged, *_DAMAGED_ERRORS)
_NOT_WHOLE_OR_SHORT: tuple[type[Exception], ...] = (StopAsyncIteration, *_NOT_WHOLE)


async def _kept(store: AnyioStore, key: str) -> str | _Missing | None:
    try:
        return await store._checksum(key)
    except FileNotFoundError:
        return _MISSING


async def _digest(
    store: AnyioStore,
    key: str,
    size: int,
    part: int,
    kind: str,
    *,
    source: bool,
) -> str | None:
    """``kind:hex`` of the ``size`` bytes at ``key`` computed from its bytes. A destination
    value that is not whole there (missing, another size, damaged) gives ``None``; a source's
    raises `Vanished` or `SourceChanged`."""
    digest = hashlib.new(kind)
    try:
        async with contextlib.aclosing(ranged_parts(store, key, size, part)) as parts:
            async for data in parts:
                if len(data) >= _HASH_IN_THREAD:
                    await anyio.to_thread.run_sync(digest.update, data)
                else:
                    digest.update(data)
    except _NOT_WHOLE:
        if source:
            raise
        return None
    return f"{kind}:{digest.hexdigest()}"


async def same_bytes(
    src: AnyioStore,
    source_key: str,
    dst: AnyioStore,
    key: str,
    size: int,
    part: int,
    prototype: BufferPrototype,
) -> bool:
    """Whether ``key`` of ``dst`` holds the ``size`` bytes of ``source_key``, both read (in
    parts of ``part`` bytes when bigger). Raises `Vanished` if the source key is gone."""
    if size <= part:
        # Whole: a zip member read whole is checked against its CRC-32 as it is read.
        value = await src.get(source_key, prototype)
        if value is None:
            raise Vanished(source_key)
        found = await read_back(dst, key, prototype)
        if found is None or isinstance(found, Damaged):
            return False
        return len(found) == len(value) and found.to_bytes() == value.to_bytes()
    ours = ranged_parts(src, source_key, size, part)
    theirs = ranged_parts(dst, key, size, part)
    # The source's errors (Vanished, SourceChanged) are the copy's; the destination's are a
    # difference.
    async with contextlib.aclosing(ours), contextlib.aclosing(theirs):
        async for data in ours:
            try:
                there = await anext(theirs)
            except _NOT_WHOLE_OR_SHORT:
                return False
            if data != there:
                return False
        try:
            await anext(theirs)  # checks that nothing follows the last part
        except StopAsyncIteration:
            return True
        except _NOT_WHOLE:
            return False
    return False


async def compare(
    src: AnyioStore,
    source_key: str,
    dst: AnyioStore,
    key: str,
    size: int,
    part: int,
    prototype: BufferPrototype,
) -> Compared:
    """Whether ``key`` of ``dst`` holds the ``size`` bytes of ``source_key`` of ``src``.

    Raises `Vanished` if the source key is gone, `SourceChanged` if it changes as it is read.
    """
    theirs = await _kept(dst, key)
    if isinstance(theirs, _Missing):
        return Compared(False, "missing")
    ours = await _kept(src, source_key)
    if isinstance(ours, _Missing):
        raise Vanished(source_key)
    if ours is not None and theirs is not None and _kind(ours) == _kind(theirs):
        return Compared(ours == theirs, "checksum")
    if theirs is not None:
        computed = await _digest(src, source_key, size, part, _kind(theirs), source=True)
        return Compared(computed == theirs, "checksum")
    if ours is not None:
        computed = await _digest(dst, key, size, part, _kind(ours), source=False)
        return Compared(computed == ours, "checksum")
    return Compared(await same_bytes(src, source_key, dst, key, size, part, prototype), "bytes")


def _kind(checksum: str) -> str:
    return checksum.partition(":")[0]
