"""Reads of sharded arrays in our codec pipeline: one shard index read per shard, the inner
chunks a selection needs fetched as few coalesced byte ranges, decoded in worker threads and
scattered straight into the result.

zarr's own pipeline, given a shard, reads its index, then (zarr 3.1) one request per inner chunk
the selection touches, each a coroutine on the event loop, then runs the inner pipeline with a
coroutine per inner chunk per codec, into a temporary array of the shard's selection, which it
copies into the result. Here:

* The shard's plan (which inner chunks, where each goes) is zarr's own indexer over the shard's
  inner grid, so every selection kind means exactly what it means to zarr.
* A selection that needs every inner chunk of a shard reads the whole shard in one request and
  finds the index in it; any other reads the index (one request, at the start or the end of the
  shard), then the chunks it needs, neighbours merged into one range while the gap between them
  is at most `MAX_GAP` and the range at most `MAX_RANGE` (zarr 3.4's defaults, and its array
  config's ``sharding_coalesce_*`` where it has them). Missing inner chunks read as the fill
  value, a missing shard too.
* On a `BlockingStore` (LocalStore, ZipStore) one shard is one hop to a worker thread: its reads
  hold one token of the store's limiter and give it back when they are done, then the same
  thread decodes and scatters; as many hops at once as `decode_threads()` (and tokens) allow.
  On any other store a pool of shard tasks (the store's bound) fetches through
  ``get_partial_values`` (all of a shard's ranges in one call, under the store's limiter) and
  each shard is decoded in one hop, at most `decode_threads()` at once.
* Inner chunks are decoded by the inner codecs as blocking calls (`SyncChain`) and written into
  the result's own memory where the shard's place in it is a view (basic and orthogonal
  selections), else into a buffer of the shard's selection copied once, as zarr does.

* A call with fewer shards than threads (one big shard, say) decodes each shard in parts at
  once, one per thread. Inner chunks whose codecs end in a native-endian ``bytes`` codec are
  their decompressed bytes seen as an array: that codec's own decode, ≈25 µs of Python a chunk,
  was the larger part of a 16 KiB chunk's cost.

Memory beside the result: the encoded bytes of the shards in flight, one per hop (at most one
per thread) or per fetching task (at most the store's bound, and `IN_FLIGHT_BYTES` in all). A
cancelled read leaves nothing running: every hop waits for its thread, which checks between
inner chunks.

Measured (benchmarks/pipeline.py, 64 shards of 64 inner chunks of 16 KiB, whole-array reads,
medians of 5, 2 shared cores at load 6-8): raw 0.11-0.19 of zarr's time, 0.58-1.66 of zarrs';
zstd(1) 0.10-0.18 of zarr's, 0.76-1.35 of zarrs'.

Not here: writes of sharded arrays and nested sharding go to zarr's pipeline; so do chains with
codecs outside the sharding codec (zarr cannot read parts of those either). The index is decoded
on the event loop: its codecs are fixed-size (bytes, crc32c) and never suspend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from math import prod
from typing import Any

import anyio
import numpy as np
from zarr.abc.store import ByteGetter, ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs.sharding import ShardingCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.core.indexing import get_indexer
from zarr.storage import StorePath

from zarr_anyio._core.threads import CheckCancelled, run_in_worker
from zarr_anyio.storage import BlockingStore

from ._chunk_io import (
    ReadItem,
    blocking_store_of,
    decode_threads,
    decoded_bytes,
    fetchers_for,
    fill_value_or_default,
    get_status,
    hop_with_token,
    key_of,
)
from ._compat import index_at_start, inner_chunk_grid
from ._pipeline_codecs import SyncChain
from ._pipeline_write import all_slices

__all__ = ["IN_FLIGHT_BYTES", "MAX_GAP", "MAX_RANGE", "MIN_PART", "ShardedReader", "sharded_reader"]

# Two wanted inner chunks this close are read as one range (the bytes between thrown away): a
# request costs more than reading 1 MiB more from a disk or a nearby server.
MAX_GAP = 1 << 20
MAX_RANGE = 16 << 20

# What the shards fetched at once through a store's own calls may hold, in all (by their decoded
# size): a pool as wide as a remote store's bound times shards of 64 MiB would not fit in memory.
IN_FLIGHT_BYTES = 256 << 20

# A shard decoded in several threads at once (when the call has fewer shards than threads) is
# split into parts of at least this many inner chunks: a hop costs about what decoding a few
# small chunks does.
MIN_PART = 16

# An index entry of a chunk the shard does not hold.
_EMPTY = 2**64 - 1

Bytes = np.ndarray[Any, np.dtype[np.uint8]]
Coords = tuple[int, ...]


def _as_array(data: Buffer | bytes | memoryview) -> Bytes:
    if isinstance(data, Buffer):
        return data.as_numpy_array().view(np.uint8).reshape(-1)
    return np.frombuffer(data, dtype=np.uint8)


def _chain(codecs: Any, spec: ArraySpec | None = None) -> SyncChain:
    if spec is not None:
        codecs = [codec.evolve_from_array_spec(array_spec=spec) for codec in codecs]
    pipeline = BatchedCodecPipeline.from_codecs(codecs)
    return SyncChain(
        pipeline.array_array_codecs, pipeline.array_bytes_codec, pipeline.bytes_bytes_codecs
    )


def _coalesce(
    spans: list[tuple[int, int, Coords]], max_gap: int, max_range: int
) -> list[tuple[int, int, list[tuple[int, int, Coords]]]]:
    """Chunks' byte spans (start, stop, coords), merged into ranges of neighbours."""
    ranges: list[tuple[int, int, list[tuple[int, int, Coords]]]] = []
    for span in sorted(spans):
        start, stop, _ = span
        if ranges:
            low, high, members = ranges[-1]
            if start - high <= max_gap and max(stop, high) - low <= max_range:
                members.append(span)
                ranges[-1] = (low, max(stop, high), members)
                continue
        ranges.append((start, stop, [span]))
    return ranges


class ShardedReader:
    """What a pipeline whose codecs are one sharding codec needs to read: the codec, the chains
    of its index and inner codecs (made once)."""

    def __init__(self, codec: ShardingCodec) -> None:
        self.codec = codec
        self.index_chain = _chain(codec.index_codecs)
        self._inner: dict[ArraySpec, SyncChain] = {}
        self._index: dict[tuple[int, ...], tuple[int, ArraySpec]] = {}

    def index_layout(self, per_shard: tuple[int, ...]) -> tuple[int, ArraySpec]:
        """The size of a shard's index and the spec it is decoded with, for shards of
        ``per_shard`` inner chunks (zarr makes a pipeline to size it: once per shape here)."""
        found = self._index.get(per_shard)
        if found is None:
            codec = self.codec
            size = int(codec._shard_index_size(per_shard))
            found = self._index[per_shard] = (size, codec._get_index_chunk_spec(per_shard))
        return found

    def inner_chain(self, chunk_spec: ArraySpec) -> SyncChain:
        try:
            found = self._inner.get(chunk_spec)
        except TypeError:  # a spec that does not hash (an odd fill value)
            return _chain(self.codec.codecs, chunk_spec)
        if found is None:
            if len(self._inner) > 16:
                self._inner.clear()
            found = self._inner[chunk_spec] = _chain(self.codec.codecs, chunk_spec)
        return found

    async def read(
        self,
        batch: list[ReadItem],
        out_array: np.ndarray[Any, Any],
        drop_axes: tuple[int, ...],
    ) -> tuple[dict[str, str], ...]:
        read = _ShardedRead(self, batch, out_array, drop_axes)
        store = blocking_store_of(batch)
        if store is not None:
            await read.from_blocking_store(store)
        else:
            await read.from_getters(fetchers_for(batch))
        return tuple(get_status(present) for present in read.present)


def sharded_reader(pipeline: BatchedCodecPipeline) -> ShardedReader | None:
    """A reader for this pipeline's arrays if its codecs are one sharding codec (no codec
    around it) whose inner codecs are not sharded again; else ``None``."""
    codec = pipeline.array_bytes_codec
    if not isinstance(codec, ShardingCodec):
        return None
    if pipeline.array_array_codecs or pipeline.bytes_bytes_codecs:
        return None
    if any(isinstance(inner, ShardingCodec) for inner in codec.codecs):
        return None
    return ShardedReader(codec)


class _Shard:
    """One shard of a read: the inner chunks it needs and where each goes, then their bytes."""

    def __init__(self, read: _ShardedRead, position: int) -> None:
        reader = read.reader
        codec = reader.codec
        _, spec, chunk_sel, out_sel, _ = read.batch[position]
        shape = tuple(spec.shape)
        self.read = read
        self.position = position
        self.spec = spec
        self.per_shard: tuple[int, ...] = tuple(codec._get_chunks_per_shard(spec))
        self.chunk_spec: ArraySpec = codec._get_chunk_spec(spec)
        self.index_size, self.index_spec = reader.index_layout(self.per_shard)
        self.at_start = index_at_start(codec)
        indexer = get_indexer(
            chunk_sel, shape=shape, chunk_grid=inner_chunk_grid(shape, tuple(codec.chunk_shape))
        )
        self.projections = [(tuple(p[0]), p[1], p[2]) for p in indexer]
        self.shape = tuple(indexer.shape)
        self.sel_shape = tuple(getattr(indexer, "sel_shape", self.shape))
        self.out_sel: Any = out_sel
        self.uses = Counter(coords for coords, _, _ in self.projections)
        self.wanted = sorted(self.uses)
        self.whole = len(self.wanted) == prod(self.per_shard)
        self.chunks: dict[Coords, Bytes] = {}
        self.ranges: list[tuple[int, int, list[tuple[int, int, Coords]]]] = []
        config = spec.config
        self.max_gap = int(getattr(config, "sharding_coalesce_max_gap_bytes", MAX_GAP))
        self.max_range = int(getattr(config, "sharding_coalesce_max_bytes", MAX_RANGE))

    # ------------------------------------------------------------------ reading, step by step

    def first_request(self) -> ByteRequest | None:
        """The whole shard (``None``) if every inner chunk is wanted, else its index."""
        if self.whole:
            return None
        if self.at_start:
            return RangeByteRequest(0, self.index_size)
        return SuffixByteRequest(self.index_size)

    def _index(self, data: Bytes) -> np.ndarray[Any, np.dtype[np.uint64]]:
        if len(data) != self.index_size:
            raise ValueError(
                f"{self._where()} is corrupt: {len(data)} bytes where its index "
                f"takes {self.index_size}; the shard is truncated"
            )
        chunk = self.read.reader.index_chain.decode(
            default_buffer_prototype().buffer.from_bytes(data.data), self.index_spec
        )
        return chunk.as_numpy_array().reshape(-1, 2)

    def _spans(self, index: np.ndarray[Any, np.dtype[np.uint64]]) -> list[tuple[int, int, Coords]]:
        if self.per_shard:
            flat = np.ravel_multi_index(tuple(np.array(self.wanted).T), self.per_shard)
        else:
            flat = np.zeros(len(self.wanted), dtype=np.intp)
        entries = index[np.asarray(flat, dtype=np.intp)]
        return [
            (int(offset), int(offset) + int(length), coords)
            for coords, (offset, length) in zip(self.wanted, entries.tolist(), strict=True)
            if offset != _EMPTY
        ]

    def first_answer(self, data: Bytes) -> list[tuple[int, int]]:
        """Take the first answer (the whole shard, or its index); give the ranges still to read."""
        if self.whole:
            if len(data) < self.index_size:
                index = self._index(data)  # too short to hold it: raises, saying so
            elif self.at_start:
                index = self._index(data[: self.index_size])
            else:
                index = self._index(data[len(data) - self.index_size :])
            # Inner chunks lie outside the index: where it is at the end, before it.
            end = len(data) if self.at_start else len(data) - self.index_size
            for start, stop, coords in self._spans(index):
                self._check_within(stop, end)
                self.chunks[coords] = data[start:stop]
            return []
        self.ranges = _coalesce(self._spans(self._index(data)), self.max_gap, self.max_range)
        return [(low, high) for low, high, _ in self.ranges]

    def range_answers(self, answers: list[Bytes]) -> None:
        for (low, _, members), data in zip(self.ranges, answers, strict=True):
            for start, stop, coords in members:
                self._check_within(stop - low, len(data))
                self.chunks[coords] = data[start - low : stop - low]
        self.ranges = []

    def _where(self) -> str:
        return f"the shard at {key_of(self.read.batch[self.position][0])!r}"

    def _check_within(self, stop: int, size: int) -> None:
        # An index entry past the bytes there are (a shard cut short, or an index that lies)
        # would otherwise give an inner chunk of the wrong length: numpy's "cannot reshape".
        if stop > size:
            raise ValueError(
                f"{self._where()} is corrupt: its index names bytes up to {stop}, "
                f"but it holds {size}; the shard is truncated or its index damaged"
            )

    # ------------------------------------------------------------------ into the result

    def _target(self) -> np.ndarray[Any, Any] | None:
        """The result's own memory for this shard's selection, if it is a view of it."""
        if self.sel_shape != self.shape or not all_slices(self.out_sel):
            return None
        # The ellipsis keeps a view where every axis is taken by an index (a scalar otherwise).
        where: tuple[Any, ...] = (*self.out_sel, Ellipsis)
        view = self.read.out_array[where]
        if self.read.drop_axes:
            view = np.expand_dims(view, self.read.drop_axes)
        return view if view.shape == self.shape else None

    def missing(self) -> None:
        self.read.out_array[self.out_sel] = fill_value_or_default(self.spec)
        self.read.present[self.position] = False

    def parts(self, shards: int) -> list[range]:
        """The shard's inner chunks (projections) in as many parts as can be decoded at once
        beside the ``shards`` other shards of the call: one part when there are enough shards
        to keep every thread busy, else up to one per thread, of at least `MIN_PART` each."""
        count = len(self.projections)
        if not count:
            return [range(0)]
        threads = decode_threads()
        parts = 1 if shards >= threads else max(1, min(threads, count // MIN_PART))
        size = -(-count // parts)
        return [range(start, min(start + size, count)) for start in range(0, count, size)]

    def prepare(self) -> None:
        """Where the decoded chunks go: the result itself, or a buffer of the selection."""
        self.target = self._target()
        self.buffer: np.ndarray[Any, Any] | None = None
        if self.target is None:
            self.buffer = self.target = np.empty(self.shape, dtype=self.read.out_array.dtype)

    def decode(self, part: range, check_cancelled: CheckCancelled) -> None:
        """Decode a part of the inner chunks and write them where they belong (blocking);
        parts of one shard may run at once, in several threads."""
        target = self.target
        assert target is not None
        spec = self.chunk_spec
        chain = self.read.reader.inner_chain(spec)
        prototype = spec.prototype
        # Bytes that are the chunk's values once decompressed are seen as an array of them: the
        # ``bytes`` codec's own decode costs more than a 16 KiB copy.
        as_dtype = chain.bytes_dtype(spec)
        fill = fill_value_or_default(spec)
        # An inner chunk is projected once, unless the selection comes back to it (coordinates
        # out of order): only then is it kept once decoded.
        again: dict[Coords, np.ndarray[Any, Any] | None] = {}
        for coords, chunk_sel, out_sel in self.projections[part.start : part.stop]:
            check_cancelled()
            if coords in again:
                chunk = again[coords]
            else:
                data = self.chunks.get(coords)
                chunk = None
                if data is not None:
                    buffer_in = prototype.buffer.from_bytes(data.data)
                    if as_dtype is None:
                        chunk = chain.decode(buffer_in, spec).as_numpy_array()
                    else:
                        decompressed = chain.decode_bytes(buffer_in, spec).as_numpy_array()
                        chunk = decompressed.view(as_dtype).reshape(spec.shape)
                if self.uses[coords] > 1:
                    again[coords] = chunk
            if chunk is None:
                target[out_sel] = fill
            else:
                target[out_sel] = chunk[chunk_sel]

    def finish(self) -> None:
        """The buffer of the selection, if there is one, into the result; the bytes dropped."""
        self.chunks = {}
        if self.buffer is not None:
            result = self.buffer.reshape(self.sel_shape)
            if self.read.drop_axes:
                result = result.squeeze(axis=self.read.drop_axes)
            self.read.out_array[self.out_sel] = result
        self.buffer = self.target = None

    async def decode_in_parts(self, parts: list[range], decoding: anyio.CapacityLimiter) -> None:
        """Each part in a worker thread, at most ``decoding`` at once; then `finish`."""

        async def one(part: range) -> None:
            async with decoding:
                await run_in_worker(lambda check_cancelled: self.decode(part, check_cancelled))

        async with anyio.create_task_group() as tg:
            for part in parts:
                tg.start_soon(one, part)
        await run_in_worker(lambda _: self.finish())


class _ShardedRead:
    """One call's read of shards."""

    def __init__(
        self,
        reader: ShardedReader,
        batch: list[ReadItem],
        out_array: np.ndarray[Any, Any],
        drop_axes: tuple[int, ...],
    ) -> None:
        self.reader = reader
        self.batch = batch
        self.out_array = out_array
        self.drop_axes = drop_axes
        self.present = [True] * len(batch)

    # ------------------------------------------------------------------ from a BlockingStore

    async def from_blocking_store(self, store: BlockingStore) -> None:
        await store._ensure_open()
        limiter = store.limiter
        positions = iter(range(len(self.batch)))

        def work(
            position: int, check_cancelled: CheckCancelled, io_done: Callable[[], None]
        ) -> tuple[_Shard, list[range]] | None:
            """Read a shard and decode it; or, if it is to be decoded in parts, give them."""
            shard = _Shard(self, position)
            key = key_of(self.batch[position][0])
            try:
                check_cancelled()
                first = store._read_blocking(key, shard.first_request())
                if not first:  # no shard (zarr 3.1 takes an empty one for none too)
                    io_done()
                    shard.missing()
                    return None
                answers: list[Bytes] = []
                for low, high in shard.first_answer(_as_array(first)):
                    check_cancelled()
                    data = store._read_blocking(key, RangeByteRequest(low, high))
                    if data is None:  # deleted since its index was read
                        io_done()
                        shard.missing()
                        return None
                    answers.append(_as_array(data))
                shard.range_answers(answers)
            finally:
                io_done()
            shard.prepare()
            parts = shard.parts(len(self.batch))
            if len(parts) > 1:
                return shard, parts
            shard.decode(parts[0], check_cancelled)
            shard.finish()
            return None

        # A shard's other parts, when there are too few shards for the threads, are decoded in
        # hops of their own, beside the hoppers'.
        decoding = anyio.CapacityLimiter(decode_threads())

        async def hopper() -> None:
            for position in positions:  # shared: each hopper takes the next shard
                left = await hop_with_token(
                    limiter,
                    lambda check, done: work(position, check, done),  # noqa: B023
                )
                if left is not None:
                    await left[0].decode_in_parts(left[1], decoding)

        hops = max(1, min(decode_threads(), limiter.total_tokens, len(self.batch)))
        async with anyio.create_task_group() as tg:
            for _ in range(hops):
                tg.start_soon(hopper)

    # ------------------------------------------------------------------ from any byte getter

    async def from_getters(self, fetchers: int) -> None:
        decoding = anyio.CapacityLimiter(decode_threads())
        positions = iter(range(len(self.batch)))

        async def fetch(getter: ByteGetter, shard: _Shard) -> bool:
            prototype = shard.chunk_spec.prototype
            first = await getter.get(prototype=prototype, byte_range=shard.first_request())
            if first is None or len(first) == 0:
                return False
            ranges = shard.first_answer(_as_array(first))
            if not ranges:
                return True
            requests = [RangeByteRequest(low, high) for low, high in ranges]
            answers: list[Buffer | None]
            if isinstance(getter, StorePath):
                answers = list(
                    await getter.store.get_partial_values(
                        prototype, [(getter.path, request) for request in requests]
                    )
                )
            else:
                answers = [await getter.get(prototype, request) for request in requests]
            if any(answer is None for answer in answers):  # deleted since its index was read
                return False
            shard.range_answers([_as_array(answer) for answer in answers if answer is not None])
            return True

        async def worker() -> None:
            for position in positions:  # shared
                shard = _Shard(self, position)
                if not await fetch(self.batch[position][0], shard):
                    shard.missing()
                    continue
                shard.prepare()
                await shard.decode_in_parts(shard.parts(len(self.batch)), decoding)

        async with anyio.create_task_group() as tg:
            # As many shards in flight as the store allows, but not more bytes than
            # `IN_FLIGHT_BYTES` of them (shards can be large).
            per_shard = max(1, decoded_bytes(self.batch[0][1]))
            tasks = min(fetchers, len(self.batch), IN_FLIGHT_BYTES // per_shard)
            for _ in range(max(1, tasks)):
                tg.start_soon(worker)
