"""What a copy does to a destination that already holds data, and how it checks the result.

The promise: a copy that exits 0 leaves the destination node reading exactly what the source node
reads (the same keys, the same bytes); a copy that refuses leaves the destination untouched. For
Zarr a key the source does not have is not harmless clutter, as it is for a folder of files: a
chunk left from an older array is read back as data where the source reads the fill value. So
the rules are `rclone sync`'s and `aws s3 sync --delete`'s, never `rclone copy`'s:

- ``refuse`` (the default): a destination that holds any key is refused before anything is
  written, with a message naming the two choices below.
- ``overwrite``: every key of the source is written, keys the destination has and the source
  does not are deleted.
- ``skip``: keys the destination already has with the same content are left as they are (a
  checksum or the bytes compared, `.fingerprint`; only the sizes with ``compare="size"``), the
  others are written, keys the source does not have are deleted. This is how an interrupted
  copy is resumed.

Nothing half-done is visible: before the first key is written or deleted, the destination's
metadata is taken down (so the old node no longer opens), and the source's metadata is written
after everything else. A destination that already matches is not touched at all.

Knowing which keys to delete costs a listing of the destination held in memory (a Python string
and a size per key, ~100 bytes) and the set of the source's keys seen so far; an empty
destination, the common case, costs neither.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Literal

import anyio
from zarr.core.buffer import Buffer, BufferPrototype

from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._keys import is_valid_key
from zarr_anyio.storage._listing import Entry, list_node

__all__ = [
    "Compare",
    "Damaged",
    "DestinationHoldsData",
    "Existing",
    "MetadataTakeDown",
    "destination_keys",
    "read_back",
]

Existing = Literal["refuse", "overwrite", "skip"]
"""What to do with a destination node that already holds keys."""

Compare = Literal["bytes", "size"]
"""How ``skip`` decides that a key at the destination is the same as the source's."""


class DestinationHoldsData(Exception):
    """The destination holds keys and the copy was not told what to do with them."""

    def __init__(self, example: str) -> None:
        self.example = example
        super().__init__(
            f"DST already holds data (such as {example!r}), nothing was written: pass "
            "--skip-existing to keep the keys that match SRC and copy the rest, or --overwrite "
            "to write every key again (both delete the keys SRC does not have)"
        )


async def _pages(store: AnyioStore) -> AsyncGenerator[list[Entry], None]:
    async with contextlib.aclosing(list_node(store, "")) as pages:
        async for page in pages:
            yield page


async def destination_keys(store: AnyioStore) -> dict[str, int | None]:
    """Every valid key the destination holds, with its size where the listing gives it.

    Objects whose names are not keys (``a//b`` in a bucket) are no part of a Zarr node: they are
    neither counted as data nor deleted.
    """
    found: dict[str, int | None] = {}
    async for page in _pages(store):
        for key, size in page:
            if is_valid_key(key):
                found[key] = size
    return found


@dataclass(frozen=True)
class Damaged:
    """A value the destination holds but cannot give back whole (its checksum fails)."""

    reason: str


# What a store raises for one value whose stored checksum fails (the zip's CRC-32): for a copy,
# a value to write again, for --verify a difference, not a reason to stop.
_DAMAGED_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile,)


async def read_back(
    store: AnyioStore, key: str, prototype: BufferPrototype
) -> Buffer | Damaged | None:
    """The value at ``key`` as the destination gives it back, ``None`` if absent."""
    try:
        return await store.get(key, prototype)
    except _DAMAGED_ERRORS as error:
        return Damaged(str(error))


class MetadataTakeDown:
    """Deletes the destination's metadata once, before the first key is written or deleted.

    Until then the destination is the node it was; from then on it opens as nothing until the
    copy writes the source's metadata, last. In a dry run the keys are only forgotten, so that
    the dry run counts what the real copy would write.
    """

    def __init__(
        self,
        dst: AnyioStore,
        held: dict[str, int | None] | None,
        metadata: Iterable[str],
        dry_run: bool,
    ) -> None:
        self.dst = dst
        self.held = held
        self.metadata = sorted(metadata)
        self.dry_run = dry_run
        self.done = False
        self._lock = anyio.Lock()

    async def __call__(self) -> None:
        if self.done:
            return
        async with self._lock:
            if self.done:
                return
            if not self.dry_run:
                # The root's first: the hierarchy stops opening before anything below it changes.
                root = [key for key in self.metadata if "/" not in key]
                below = [key for key in self.metadata if "/" in key]
                await self.dst._for_each(root, self.dst.delete)
                await self.dst._for_each(below, self.dst.delete)
            if self.held is not None:
                for key in self.metadata:
                    self.held.pop(key, None)
            self.done = True
