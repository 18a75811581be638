"""Copying a Zarr node from one store to another: the engine behind ``zarr-anyio copy``.

Keys are listed a page at a time (`zarr_anyio.storage._listing`) and handed to ``workers`` tasks
in one task group through a small memory object stream, so a bucket of millions of keys costs
memory for a page and the values in flight, not for the listing. Values in flight are also
bounded in bytes (``max_bytes``), since 32 workers on 1 GiB chunks would otherwise hold 32 GiB;
a value larger than a part is copied in parts (`.copy_stream`) and costs one part of it and
its client's buffers (a value bigger than the budget that the destination takes only whole goes
alone). The default, 4 MiB, was measured on 64 chunks of 8 MiB from moto's S3 server to a
folder (``benchmarks/copy_cli.py``, median of 5, load 4): with obstore, two values at once in
parts of 1 MiB took 1.22 s at a 68 MiB peak, ``fs.get`` 1.28 s at 70 MiB; 64 MiB (eight values
read whole at once) took 0.91 s at 134 MiB, 16 MiB 1.08 s at 80 MiB. The default is the
budget at which a copy holds no more than ``fs.get``; a server far away, where each request
waits out a round trip, wants more values in flight: ``--max-memory`` is the knob.

What happens to a destination that already holds data (refused, brought up to date, replaced)
is `._copy_plan`'s to say; ``--verify`` is `._copy_verify`.

Each value is written with the destination's own atomic ``set`` (a temporary file renamed over
its target, one zip member appended under the archive lock, one PUT) or its streamed write (the
same temporary file filled a part at a time, a multipart upload), so a cancelled copy leaves
each key whole or absent. Whether a key the destination holds is up to date is
`.fingerprint`'s to say (a checksum where a store keeps one, else the bytes).

Metadata goes last, deepest nodes first and the root last (``.zattrs`` before ``.zarray``, a
consolidated ``.zmetadata`` after everything): until the data is all there the destination is
not a hierarchy that opens, so a half-finished copy never looks like a finished one with chunks
missing. A second, concurrent listing only counts keys and bytes, for the totals a progress bar
shows; it costs one request per 1,000 keys against the copy's two per key.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
from zarr.core.buffer import default_buffer_prototype

from zarr_anyio._core.errors import single_error
from zarr_anyio.storage import KeyConflict
from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._keys import validate_key
from zarr_anyio.storage._listing import Entry, list_node

from .copy_plan import (
    Compare,
    DestinationHoldsData,
    Existing,
    MetadataTakeDown,
    destination_keys,
)
from .copy_stream import Vanished, held, part_size, ranged_parts, streams
from .fingerprint import compare

__all__ = ["METADATA_NAMES", "ByteBudget", "CopyOptions", "CopyReport", "copy_node"]

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})
# The order metadata files are written in within one folder: attributes before the document that
# makes the node exist, consolidated metadata (written apart, after everything) last.
_RANK = {".zattrs": 0, ".zarray": 1, ".zgroup": 1, "zarr.json": 1, ".zmetadata": 2}
# How many examples of each kind of trouble a report keeps.
_EXAMPLES = 20


@dataclass(frozen=True)
class CopyOptions:
    """What `copy_node` does; see ``zarr-anyio copy --help`` for the user's view."""

    workers: int = 32
    existing: Existing = "refuse"
    compare: Compare = "bytes"
    dry_run: bool = False
    max_bytes: int = 4 << 20


@dataclass
class CopyReport:
    """How far a copy got; read while it runs (progress) and after (the summary)."""

    keys_total: int | None = None
    bytes_total: int | None = None
    keys_listed: int = 0
    bytes_listed: int = 0
    keys_copied: int = 0
    bytes_copied: int = 0
    keys_skipped: int = 0
    bytes_skipped: int = 0
    keys_deleted: int = 0
    keys_in_doubt: int = 0
    keys_verified: int = 0
    keys_compared_by_checksum: int = 0
    keys_vanished: int = 0
    invalid_keys: int = 0
    mismatched_keys: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    # A dry run's plan, every key of it: what the same command would write and delete.
    would_copy: list[str] = field(default_factory=list)
    would_delete: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    metadata_written: bool = False

    @property
    def keys_done(self) -> int:
        return self.keys_copied + self.keys_skipped + self.keys_vanished

    @property
    def bytes_done(self) -> int:
        return self.bytes_copied + self.bytes_skipped

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def example(self, kind: str, text: str) -> None:
        found = self.examples.setdefault(kind, [])
        if len(found) < _EXAMPLES:
            found.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "keys_total": self.keys_total,
            "bytes_total": self.bytes_total,
            "keys_copied": self.keys_copied,
            "bytes_copied": self.bytes_copied,
            "keys_skipped": self.keys_skipped,
            "bytes_skipped": self.bytes_skipped,
            "keys_deleted": self.keys_deleted,
            "keys_in_doubt": self.keys_in_doubt,
            "keys_verified": self.keys_verified,
            "keys_compared_by_checksum": self.keys_compared_by_checksum,
            "keys_vanished": self.keys_vanished,
            "invalid_keys": self.invalid_keys,
            "mismatched_keys": self.mismatched_keys,
            "metadata_written": self.metadata_written,
            "seconds": round(self.seconds, 3),
            "examples": self.examples,
        }


class ByteBudget:
    """At most ``limit`` bytes held at once, granted first come, first served.

    A request bigger than the whole budget is granted alone, so one huge value is copied rather
    than waited for forever. Used from one event loop.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the byte budget must be at least 1, got {limit}")
        self.limit = limit
        self.used = 0
        self.most_used = 0
        self._waiting: deque[tuple[int, anyio.Event]] = deque()

    @contextlib.asynccontextmanager
    async def take(self, size: int) -> AsyncIterator[None]:
        size = min(max(size, 0), self.limit)
        if self._waiting or self.used + size > self.limit:
            waiter = (size, anyio.Event())
            self._waiting.append(waiter)
            try:
                await waiter[1].wait()
            except BaseException:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                else:  # granted just as it was cancelled: hand it back
                    self._give_back(size)
                raise
        else:
            self._grant(size)
        try:
            yield
        finally:
            self._give_back(size)

    def _grant(self, size: int) -> None:
        self.used += size
        self.most_used = max(self.most_used, self.used)

    def _give_back(self, size: int) -> None:
        self.used -= size
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            size, event = self._waiting.popleft()
            self._grant(size)
            event.set()


def is_metadata(key: str) -> bool:
    return posixpath.basename(key) in METADATA_NAMES


def metadata_levels(keys: Iterable[str]) -> list[list[str]]:
    """Metadata keys in the order they are written: a list of levels, each written at once."""
    levels: dict[tuple[bool, int, int], list[str]] = {}
    for key in keys:
        name = posixpath.basename(key)
        consolidated = name == ".zmetadata"
        levels.setdefault((consolidated, -key.count("/"), _RANK[name]), []).append(key)
    return [sorted(levels[level]) for level in sorted(levels)]


def relative_key(key: str, prefix: str) -> str:
    return key[len(prefix) :] if prefix else key


async def size_at(store: AnyioStore, key: str) -> int | None:
    """The size of ``key`` in ``store``, ``None`` if it is not there."""
    try:
        return await store.getsize(key)
    except FileNotFoundError:
        return None


async def _listed(store: AnyioStore, prefix: str) -> AsyncGenerator[list[Entry], None]:
    async with contextlib.aclosing(list_node(store, prefix)) as pages:
        async for page in pages:
            yield page


async def count_node(store: AnyioStore, prefix: str, report: CopyReport) -> None:
    """Fill in the report's totals from a listing of its own (keys that are valid keys)."""
    keys = total = 0
    async for page in _listed(store, prefix):
        for key, size in page:
            if _valid(key):
                keys += 1
                total += size or 0
    report.keys_total, report.bytes_total = keys, total


def _valid(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


class _Copier:
    """One copy: the per-key work, shared by the data phase and the metadata phase."""

    def __init__(
        self,
        src: AnyioStore,
        dst: AnyioStore,
        src_prefix: str,
        options: CopyOptions,
        report: CopyReport,
        held: dict[str, int | None] | None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_prefix = src_prefix
        self.options = options
        self.report = report
        self.budget = ByteBudget(options.max_bytes)
        self.prototype = default_buffer_prototype()
        self.part = part_size(options.max_bytes, dst)
        # What the destination held before the copy (None: nothing), less what was taken down.
        self.held = held
        metadata = [key for key in held or () if is_metadata(key)]
        self.take_down = MetadataTakeDown(dst, held, metadata, options.dry_run)
        # The source's keys seen so far, relative: what the destination keeps.
        self.seen: set[str] | None = None if held is None else set()

    async def one(self, entry: Entry) -> None:
        source_key, size = entry
        key = relative_key(source_key, self.src_prefix)
        options, report = self.options, self.report
        if size is None:
            size = await size_at(self.src, source_key)
            if size is None:
                self._vanished(source_key)
                return
        try:
            if await self._up_to_date(source_key, key, size):
                self._skipped(size)
                return
            if options.dry_run:
                await self.take_down()
                report.keys_copied += 1
                report.bytes_copied += size
                report.example("would copy", key)
                report.would_copy.append(key)
                return
            await self._copy(source_key, key, size)
        except Vanished:
            self._vanished(source_key)

    async def _up_to_date(self, source_key: str, key: str, size: int) -> bool:
        """Whether ``--skip-existing`` leaves ``key`` as the destination holds it."""
        if self.options.existing != "skip" or self.held is None or key not in self.held:
            return False
        there = self.held[key]
        if there is None:
            there = await size_at(self.dst, key)
        if there != size:
            return False
        if self.options.compare == "size":
            return True
        async with self.budget.take(2 * min(size, self.part)):
            compared = await compare(
                self.src, source_key, self.dst, key, size, self.part, self.prototype
            )
        if compared.by == "checksum":
            self.report.keys_compared_by_checksum += 1
        return compared.same

    async def _copy(self, source_key: str, key: str, size: int) -> None:
        if not streams(self.src, self.dst, size, self.part):
            async with self.budget.take(size):
                value = await self.src.get(source_key, self.prototype)
                if value is None:
                    raise Vanished(source_key)

                async def put() -> None:
                    await self.dst.set(key, value)

                await self._write(key, len(value), put)
            return

        async def put_in_parts() -> None:
            parts = ranged_parts(self.src, source_key, size, self.part)
            async with contextlib.aclosing(parts):
                await self.dst._set_streamed(key, parts)

        async with self.budget.take(held(self.src, size, self.part)):
            await self._write(key, size, put_in_parts)

    async def _write(self, key: str, size: int, put: Callable[[], Awaitable[None]]) -> None:
        await self.take_down()
        try:
            await self._set(key, put)
        except Vanished:
            raise  # nothing was written: the source went away under the copy
        except BaseException:
            # Stopped or failed while writing: the key is whole or absent, but which of the
            # two only the destination knows (a PUT may land as its answer is cancelled).
            self.report.keys_in_doubt += 1
            self.report.example("in doubt", key)
            raise
        self.report.keys_copied += 1
        self.report.bytes_copied += size

    async def _set(self, key: str, put: Callable[[], Awaitable[None]]) -> None:
        try:
            await put()
        except KeyConflict as conflict:
            # A tree of files cannot hold `c/0` beside `c/0/0`: when what is in the way is what
            # the destination held before (an array of another shape, say), it goes now rather
            # than with the other extra keys at the end, which the write would never reach.
            in_way = self._held_in_way(key)
            if self.seen is not None and any(k in self.seen for k in in_way):
                raise conflict from None  # not the destination's old keys: the source's own
            if not in_way and conflict.other is None:
                raise conflict from None
            # (Nothing left in the way: another worker of this copy has just cleared it.)
            await self.dst._for_each(in_way, self._delete_held, self.options.workers)
            await put()

    def _held_in_way(self, key: str) -> list[str]:
        """Keys the destination held before the copy that a key ``key`` cannot stand beside:
        those below it, and those on its path."""
        if self.held is None:
            return []
        parts = key.split("/")
        above = {"/".join(parts[:i]) for i in range(1, len(parts))}
        return sorted(k for k in self.held if k in above or k.startswith(key + "/"))

    async def _delete_held(self, key: str) -> None:
        await self.dst.delete(key)
        # Gone: not an extra key to delete at the end. Two workers may both have found it in
        # the way; the first to be done counts it.
        if self.held is not None and key in self.held:
            del self.held[key]
            self._deleted("deleted", key)

    def _skipped(self, size: int) -> None:
        self.report.keys_skipped += 1
        self.report.bytes_skipped += size

    def _vanished(self, source_key: str) -> None:
        self.report.keys_vanished += 1
        self.report.example("vanished", source_key)

    async def delete_extra(self) -> None:
        """Delete what the destination held and the source does not have."""
        if self.held is None or self.seen is None:
            return
        seen = self.seen
        if any(key not in seen for key in self.held):
            await self.take_down()
        # Metadata the source does not have went with the take-down: gone all the same.
        gone = [key for key in self.take_down.metadata if key not in seen]
        if not self.take_down.done:
            gone = []
        extra = sorted(key for key in self.held if key not in seen)
        what = "would delete" if self.options.dry_run else "deleted"

        async def delete(key: str) -> None:
            if not self.options.dry_run:
                await self.dst.delete(key)
            self._deleted(what, key)

        await self.dst._for_each(extra, delete, self.options.workers)
        for key in gone:
            self._deleted(what, key)

    def _deleted(self, what: str, key: str) -> None:
        self.report.keys_deleted += 1
        self.report.example(what, key)
        if self.options.dry_run:
            self.report.would_delete.append(key)

    async def metadata_unchanged(self, entries: list[Entry]) -> bool:
        """Whether the destination holds every metadata key of the source as it is (skip)."""
        if self.take_down.done or self.held is None or self.options.existing != "skip":
            return False
        same = True

        async def check(entry: Entry) -> None:
            nonlocal same
            source_key, size = entry
            key = relative_key(source_key, self.src_prefix)
            if self.held is None or key not in self.held:
                same = False
                return
            if size is None:
                size = await size_at(self.src, source_key)
            try:
                if size is None or not await self._up_to_date(source_key, key, size):
                    same = False
            except Vanished:
                same = False

        await self.dst._for_each(entries, check, self.options.workers)
        return same


async def _in_pool(
    items: AsyncGenerator[Entry, None], work: Callable[[Entry], Awaitable[None]], n: int
) -> None:
    """``work`` on every item, ``n`` at a time, the items pulled as workers free up."""
    send, receive = anyio.create_memory_object_stream[Entry](n)

    async def feed() -> None:
        async with send, contextlib.aclosing(items):
            async for item in items:
                await send.send(item)

    async def worker() -> None:
        async for item in receive:
            await work(item)

    with single_error():
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(feed)
            for _ in range(n):
                tg.start_soon(worker)


async def copy_node(
    src: AnyioStore,
    dst: AnyioStore,
    prefix: str = "",
    options: CopyOptions | None = None,
    report: CopyReport | None = None,
) -> CopyReport:
    """Copy every key under the node ``prefix`` of ``src`` to the root of ``dst``.

    Raises ``FileNotFoundError`` if there is nothing under ``prefix``. ``report`` (made if not
    given) is filled in as the copy goes, so that it tells how far a copy got if it is cancelled
    or fails.
    """
    options = options or CopyOptions()
    report = report or CopyReport()
    prefix = prefix.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    held = await _destination(dst, options)
    copier = _Copier(src, dst, prefix, options, report, held)
    metadata: list[Entry] = []

    async def data_keys() -> AsyncGenerator[Entry, None]:
        async for page in _listed(src, prefix):
            for key, size in page:
                report.keys_listed += 1
                if not _valid(key) or not _valid(relative_key(key, prefix)):
                    report.invalid_keys += 1
                    report.example("invalid keys", key)
                    continue
                if copier.seen is not None:
                    copier.seen.add(relative_key(key, prefix))
                report.bytes_listed += size or 0
                if is_metadata(key):
                    metadata.append((key, size))
                else:
                    yield key, size

    with single_error():
        async with anyio.create_task_group() as tg:

            async def count() -> None:
                await count_node(src, prefix, report)

            tg.start_soon(count)
            await _in_pool(data_keys(), copier.one, options.workers)
            if report.keys_listed == 0:
                raise FileNotFoundError(f"nothing to copy: no keys under {prefix or 'the root'}")
            # The copy's own listing is complete: its count is the total.
            tg.cancel_scope.cancel()
    report.keys_total = report.keys_listed - report.invalid_keys
    report.bytes_total = report.bytes_listed
    await copier.delete_extra()
    if metadata and await copier.metadata_unchanged(metadata):
        for _, size in metadata:
            copier._skipped(size or 0)
    else:
        # Every metadata key is written again once anything changed, so that what opens at the
        # end is the source's node, whole.
        await copier.take_down()
        sizes = dict(metadata)
        for level in metadata_levels(sizes):
            await _in_pool(_entries(level, sizes), copier.one, options.workers)
        report.metadata_written = bool(metadata) and not options.dry_run
    report.finished = time.monotonic()
    return report


async def _destination(dst: AnyioStore, options: CopyOptions) -> dict[str, int | None] | None:
    """What the destination holds (``None``: nothing), or `DestinationHoldsData` if refused."""
    try:
        first = await _first_key(dst)
    except FileNotFoundError:
        return None  # a dry run onto a destination that does not exist yet
    if first is None:
        return None
    if options.existing == "refuse":
        raise DestinationHoldsData(first)
    return await destination_keys(dst)


async def _first_key(store: AnyioStore) -> str | None:
    # Closed here, not left to the garbage collector: the listing stops at its first page.
    async with contextlib.aclosing(_listed(store, "")) as pages:
        async for page in pages:
            for key, _ in page:
                if _valid(key):
                    return key
    return None


async def _entries(keys: list[str], sizes: dict[str, int | None]) -> AsyncGenerator[Entry, None]:
    for key in keys:
        yield key, sizes[key]
