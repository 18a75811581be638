"""``--verify``: read the destination back and check what the copy promises.

The promise is that the destination node reads what the source node reads, so the check covers
both directions: every key of the source is at the destination with the same bytes (``bytes``,
the default: both sides read, what the destination holds now, not the value the copy wrote) or
the same size (``sizes``: one size request per key, or none where the listing gives sizes), and
the destination holds no key the source does not. It runs after the copy, metadata included, so
a destination that dropped, truncated or mangled a write is caught, as is a key another writer
added.

It holds the set of the source's keys (a Python string per key) to find the extra keys in the
destination's listing; values are read within the copy's byte budget, those larger than a part
in parts (`.copy_stream`), so checking a 2 GiB value costs two parts of memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Literal

from zarr.core.buffer import default_buffer_prototype

from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._keys import is_valid_key
from zarr_anyio.storage._listing import Entry, list_node

from .copy import ByteBudget, CopyReport, _in_pool, relative_key, size_at
from .copy_plan import Damaged, read_back
from .copy_stream import Vanished, part_size
from .fingerprint import same_bytes

__all__ = ["Verify", "verify_node"]

Verify = Literal["bytes", "sizes"]


async def _entries(store: AnyioStore, prefix: str) -> AsyncGenerator[Entry, None]:
    async with contextlib.aclosing(list_node(store, prefix)) as pages:
        async for page in pages:
            for entry in page:
                yield entry


async def verify_node(
    src: AnyioStore,
    dst: AnyioStore,
    prefix: str,
    how: Verify,
    report: CopyReport,
    *,
    workers: int = 32,
    max_bytes: int = 64 << 20,
) -> None:
    """Compare the node ``prefix`` of ``src`` with the root of ``dst``; differences go to
    ``report`` (``mismatched_keys`` and examples), keys checked to ``keys_verified``."""
    prefix = prefix.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    budget = ByteBudget(max_bytes)
    part = part_size(max_bytes, dst)
    prototype = default_buffer_prototype()
    expected: set[str] = set()

    def mismatch(key: str, what: str) -> None:
        report.mismatched_keys += 1
        report.example("mismatched", f"{key}: {what}")

    async def source_keys() -> AsyncGenerator[Entry, None]:
        async with contextlib.aclosing(_entries(src, prefix)) as entries:
            async for source_key, size in entries:
                key = relative_key(source_key, prefix)
                if is_valid_key(source_key) and is_valid_key(key):
                    expected.add(key)
                    yield source_key, size

    async def check(entry: Entry) -> None:
        source_key, size = entry
        key = relative_key(source_key, prefix)
        if size is None:
            size = await size_at(src, source_key)
            if size is None:
                return  # gone from the source since it was listed: nothing to compare
        report.keys_verified += 1
        if how == "sizes":
            found = await size_at(dst, key)
            if found is None:
                mismatch(key, "missing")
            elif found != size:
                mismatch(key, f"{found} bytes, expected {size}")
            return
        if size > part:
            # Read in parts, as it was copied: a value of any size costs two parts.
            found = await size_at(dst, key)
            if found is None:
                mismatch(key, "missing")
            elif found != size:
                mismatch(key, f"{found} bytes, expected {size}")
            else:
                async with budget.take(2 * part):
                    try:
                        same = await same_bytes(src, source_key, dst, key, size, part, prototype)
                    except Vanished:
                        return
                if not same:
                    mismatch(key, "bytes differ")
            return
        async with budget.take(2 * size):
            value = await src.get(key=source_key, prototype=prototype)
            there = await read_back(dst, key, prototype)
            if value is None:
                return
            if there is None:
                mismatch(key, "missing")
            elif isinstance(there, Damaged):
                mismatch(key, "damaged")
            elif len(there) != len(value):
                mismatch(key, f"{len(there)} bytes, expected {len(value)}")
            elif there.to_bytes() != value.to_bytes():
                mismatch(key, "bytes differ")

    await _in_pool(source_keys(), check, workers)
    try:
        async with contextlib.aclosing(_entries(dst, "")) as entries:
            async for key, _ in entries:
                if is_valid_key(key) and key not in expected:
                    mismatch(key, "at DST only, not in SRC")
    except FileNotFoundError:
        pass  # a dry run's destination that does not exist: every key was reported missing
