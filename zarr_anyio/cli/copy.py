"""Copying a Zarr node from one store to another: the engine behind ``zarr-anyio copy``.

Keys are listed a page at a time (`zarr_anyio.storage._listing`) and handed to ``workers`` tasks
in one task group through a small memory object stream, so a bucket of millions of keys costs
memory for a page and the values in flight, not for the listing. Values in flight are also
bounded in bytes (``max_bytes``; a value bigger than the budget goes alone), since 32 workers on
1 GiB chunks would otherwise hold 32 GiB. The default, 64 MiB, was measured on 64 chunks of 8
MiB from moto's S3 server (``benchmarks/copy_cli.py``, obstore, median of 3): 1.45 s at a peak
of 156 MiB, where 256 MiB gave 1.86 s at 320 MiB: past a handful of big values in flight, more
only costs memory.

Each value is written with the destination's own atomic ``set`` (a temporary file renamed over
its target, one zip member appended under the archive lock, one PUT), so a cancelled copy
leaves each key whole or absent.

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
from typing import Any, Literal

import anyio
from zarr.core.buffer import Buffer, default_buffer_prototype

from zarr_anyio._core.errors import single_error
from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._keys import validate_key
from zarr_anyio.storage._listing import Entry, list_node

__all__ = ["METADATA_NAMES", "ByteBudget", "CopyOptions", "CopyReport", "copy_node"]

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})
# The order metadata files are written in within one folder: attributes before the document that
# makes the node exist, consolidated metadata (written apart, after everything) last.
_RANK = {".zattrs": 0, ".zarray": 1, ".zgroup": 1, "zarr.json": 1, ".zmetadata": 2}
# How many examples of each kind of trouble a report keeps.
_EXAMPLES = 20

Verify = Literal["sizes", "bytes"]


@dataclass(frozen=True)
class CopyOptions:
    """What `copy_node` does; see ``zarr-anyio copy --help`` for the user's view."""

    workers: int = 32
    skip_existing: bool = False
    verify: Verify | None = None
    dry_run: bool = False
    max_bytes: int = 64 << 20


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
    keys_verified: int = 0
    keys_vanished: int = 0
    invalid_keys: int = 0
    mismatched_keys: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
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
            "keys_verified": self.keys_verified,
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
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_prefix = src_prefix
        self.options = options
        self.report = report
        self.budget = ByteBudget(options.max_bytes)
        self.prototype = default_buffer_prototype()

    async def one(self, entry: Entry) -> None:
        source_key, size = entry
        key = relative_key(source_key, self.src_prefix)
        options, report = self.options, self.report
        if size is None:
            size = await size_at(self.src, source_key)
            if size is None:
                report.keys_vanished += 1
                report.example("vanished", source_key)
                return
        existing = None
        if options.skip_existing or (options.dry_run and options.verify):
            existing = await size_at(self.dst, key)
        if options.skip_existing and existing == size:
            report.keys_skipped += 1
            report.bytes_skipped += size
            if options.verify == "bytes":
                await self._compare_bytes(source_key, key, size)
            elif options.verify == "sizes":
                report.keys_verified += 1
            return
        if options.dry_run:
            report.keys_copied += 1
            report.bytes_copied += size
            report.example("would copy", key)
            if options.verify == "sizes":
                self._check(key, existing, size)
            elif options.verify == "bytes":
                await self._compare_bytes(source_key, key, size)
            return
        async with self.budget.take(size):
            value = await self.src.get(source_key, self.prototype)
            if value is None:
                report.keys_vanished += 1
                report.example("vanished", source_key)
                return
            await self.dst.set(key, value)
            report.keys_copied += 1
            report.bytes_copied += len(value)
            if options.verify == "sizes":
                self._check(key, await size_at(self.dst, key), len(value))
            elif options.verify == "bytes":
                written = await self.dst.get(key, self.prototype)
                self._check_bytes(key, value, written)

    def _check(self, key: str, found: int | None, expected: int) -> None:
        self.report.keys_verified += 1
        if found != expected:
            what = "missing" if found is None else f"{found} bytes, expected {expected}"
            self._mismatch(key, what)

    def _check_bytes(self, key: str, expected: Buffer | None, found: Buffer | None) -> None:
        self.report.keys_verified += 1
        if found is None:
            self._mismatch(key, "missing")
        elif expected is None or found.to_bytes() != expected.to_bytes():
            self._mismatch(key, "bytes differ")

    async def _compare_bytes(self, source_key: str, key: str, size: int) -> None:
        async with self.budget.take(2 * size):
            expected = await self.src.get(source_key, self.prototype)
            found = await self.dst.get(key, self.prototype)
        self._check_bytes(key, expected, found)

    def _mismatch(self, key: str, what: str) -> None:
        self.report.mismatched_keys += 1
        self.report.example("mismatched", f"{key}: {what}")


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
    copier = _Copier(src, dst, prefix, options, report)
    metadata: list[Entry] = []

    async def data_keys() -> AsyncGenerator[Entry, None]:
        async for page in _listed(src, prefix):
            for key, size in page:
                report.keys_listed += 1
                if not _valid(key) or not _valid(relative_key(key, prefix)):
                    report.invalid_keys += 1
                    report.example("invalid keys", key)
                elif is_metadata(key):
                    report.bytes_listed += size or 0
                    metadata.append((key, size))
                else:
                    report.bytes_listed += size or 0
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
    sizes = dict(metadata)
    for level in metadata_levels(sizes):
        await _in_pool(_entries(level, sizes), copier.one, options.workers)
    report.metadata_written = bool(metadata) and not options.dry_run
    report.finished = time.monotonic()
    return report


async def _entries(keys: list[str], sizes: dict[str, int | None]) -> AsyncGenerator[Entry, None]:
    for key in keys:
        yield key, sizes[key]
