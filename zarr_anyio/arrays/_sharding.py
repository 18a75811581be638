"""Reads of sharded arrays in our codec pipeline: one shard index read per shard, the inner
chunks a selection needs fetched as few coalesced byte ranges, decoded in worker threads and
scattered straight into the result.

zarr's own pipeline, given a shard, reads its index, then (zarr 3.1) one request per inner chunk
the selection touches, each a coroutine on the event loop, then runs the inner pipeline with a
coroutine per inner chunk per codec, into a temporary array of the shard's selection, which it
copies into the result. Here:

* The shard's plan (which inner chunks, where each goes) is zarr's own indexer over the shard's
  inner grid, so every selection kind means exactly what it means to zarr; but a box (slices of
  step 1, what zarr gives each shard of a basic selection) is planned here, axis by axis, and
  its projections kept per box (most shards of a read are the same box: the whole shard).
* A selection that needs every inner chunk of a shard reads the whole shard in one request and
  finds the index in it; any other reads the index (one request, at the start or the end of the
  shard), then the chunks it needs, neighbours merged into one range while the gap between them
  is at most `MAX_GAP` and the range at most `MAX_RANGE` (zarr 3.4's defaults, and its array
  config's ``sharding_coalesce_*`` where it has them). Missing inner chunks read as the fill
  value, a missing shard too.
* On a `BlockingStore` (LocalStore, ZipStore) a hop to a worker thread reads and decodes shard
  after shard, each taken from those left when the last is done, up to `HOP_BYTES` of them;
  it holds one token of the store's limiter throughout; as many hops at once as
  `decode_threads()` (and tokens) allow. (A hop a shard cost each shard a trip to the event
  loop, ≈0.25 ms of Python under the GIL that the decoding threads want too.)
  On any other store a pool of shard tasks (the store's bound) fetches through
  ``get_partial_values`` (all of a shard's ranges in one call, under the store's limiter) and
  each shard is decoded in one hop, at most `decode_threads()` at once.
* Inner chunks are decoded by the inner codecs as blocking calls (`SyncChain`) and written into
  the result's own memory where the shard's place in it is a view (basic and orthogonal
  selections), else into a buffer of the shard's selection copied once, as zarr does.

* A call with fewer shards than threads (one big shard, say) decodes each shard in parts at
  once, one per thread. Inner chunks whose codecs end in a native-endian ``bytes`` codec are
  their decompressed bytes seen as an array: that codec's own decode, ≈25 µs of Python a chunk,
  was the larger part of a 16 KiB chunk's cost. Everything about a chunk's spec is resolved
  once a shard, not once a chunk (hashing an `ArraySpec` alone took ≈2 µs); zarr's zstd and
  blosc codecs are called as the numcodecs codec they wrap.
* A box whose inner chunks are only that ``bytes`` codec, all of one size and in one piece of
  the shard (as zarr writes them, in Morton or any order), is copied at once: the chunks
  gathered into a grid in their grid's order (`np.take`), then into the box with the grid's
  and the chunks' axes interleaved, cut at the box's edges, missing chunks filled. A few numpy
  calls a shard, each without the GIL, where chunk by chunk took ≈4 µs of Python a chunk.
  Every chunk there, once each, in the grid's order: the rows are the grid; in zarr's Morton
  order over whole chunks: copied into the box as a view of their grid, each axis split into
  its bits (`_morton`), not gathered first (a copy of the shard, ≈160 µs a MiB here: reads
  through the api took 0.91-0.95 of the time with the gather left out, interleaved).

* A box whose inner chunks are one zstd frame each over that ``bytes`` codec has each frame
  decompressed by libzstd (`._zstd`, through ctypes: without the GIL, a context kept per
  thread) straight into its row of a grid of the shard's chunks, then copied as above.
  numcodecs' zstd made a context per frame and held the GIL around Python that wraps it: two
  threads decoding 4,096 frames of 16 KiB took as long as one (78 ms), where libzstd this way
  takes 26 ms on two. Where the frames lie back to back, each declaring a chunk's size, in
  the grid's order or in the Morton order zarr writes (a box of whole chunks, each axis a
  power of two of them), one call decompresses them all (libzstd decodes frames in a row one
  after another), and rows in Morton order are copied into the box as a view of their grid:
  each axis split into its bits (`_morton`). A call a frame cost ≈1.5 µs of Python under
  the GIL that the decoding threads share.

Memory beside the result: the encoded bytes of the shards in flight, one per hop (at most one
per thread) or per fetching task (at most the store's bound, and `IN_FLIGHT_BYTES` in all), and
while a box is copied at once its grid of chunks (one per thread; a zstd shard's grid of
decompressed chunks, one per shard being decoded). A cancelled read leaves nothing running:
every hop waits for its thread, which checks between inner chunks.

Measured (64 shards of 64 inner chunks of 16 KiB from a LocalStore, a 4096 x 4096 float32
array, whole reads through the api, zarrs' pipeline in the same rounds; `benchmarks/
pipeline.py`, docs/pipeline.md): raw 0.87-0.97 of zarrs' time, zstd(1) 0.86-0.91 (0.87-0.98
and 0.98-1.08 before a shard's frames went in one call and its rows were copied without a
gather; 1.4-1.6 and 2.3 before the frames went through libzstd and a hop took many shards).

Not here: writes of sharded arrays and nested sharding go to zarr's pipeline; so do chains with
codecs outside the sharding codec (zarr cannot read parts of those either). The index is decoded
on the event loop: its codecs are fixed-size (bytes, crc32c) and never suspend.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable
from itertools import product
from math import prod
from typing import Any

import anyio
import numpy as np
from numpy.lib.stride_tricks import as_strided
from zarr.abc.store import ByteGetter, ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import ZstdCodec
from zarr.codecs.sharding import ShardingCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
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
from ._memo import Memo
from ._pipeline_codecs import SyncChain
from ._pipeline_write import all_slices
from ._zstd import declared_size, decompress_into

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
# A hop on a BlockingStore reads and decodes shards one after another up to this many bytes of
# them (decoded), as `_pipeline`'s hops take chunks: a trip to the event loop a shard cost ≈0.25
# ms of Python under the GIL, beside the threads' decoding.
HOP_BYTES = 64 << 20

# An index entry of a chunk the shard does not hold.
_EMPTY = 2**64 - 1
# Entries at least this large are not bytes of any shard (they would overflow as int64).
_HUGE = 2**62

Bytes = np.ndarray[Any, np.dtype[np.uint8]]
Coords = tuple[int, ...]
# A shard's selection as (start, stop) per axis (`_box`).
Box = tuple[tuple[int, int], ...]
# A box's chunk counts, flat indices, coordinates and runs per axis (`_Layout.box_plan`).
_BoxPlan = tuple[
    tuple[int, ...],
    np.ndarray[Any, np.dtype[np.intp]],
    list[Coords],
    list[list[tuple[int, int, int, int, int]]],
]


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
        self._inner: Memo[ArraySpec, SyncChain] = Memo(16)
        self._index: dict[tuple[int, ...], tuple[int, ArraySpec]] = {}
        self._layouts: Memo[ArraySpec, _Layout] = Memo(16)

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
        return self._inner.get(chunk_spec, lambda: _chain(self.codec.codecs, chunk_spec))

    def layout(self, spec: ArraySpec) -> _Layout:
        """What shards of ``spec`` share (made once a spec: a regular grid has one)."""
        return self._layouts.get(spec, lambda: _Layout(self, spec))

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


class _Layout:
    """What every shard of one spec shares (a regular grid has one spec): worked out once a
    spec, not once a shard; read-only once made, so shared by threads."""

    __slots__ = (
        "_boxes",
        "_plans",
        "at_start",
        "chain",
        "chunk_bytes",
        "chunk_shape",
        "chunk_spec",
        "decompress",
        "dtype",
        "fill",
        "frames",
        "index_dtype",
        "index_size",
        "index_spec",
        "index_undo",
        "per_shard",
        "raw",
    )

    def __init__(self, reader: ShardedReader, spec: ArraySpec) -> None:
        codec = reader.codec
        self.per_shard: tuple[int, ...] = tuple(codec._get_chunks_per_shard(spec))
        self.chunk_spec: ArraySpec = codec._get_chunk_spec(spec)
        self.chunk_shape: tuple[int, ...] = tuple(self.chunk_spec.shape)
        self.index_size, self.index_spec = reader.index_layout(self.per_shard)
        # The index too is its bytes once its checksum is checked (`SyncChain.bytes_dtype`).
        self.index_dtype = reader.index_chain.bytes_dtype(self.index_spec)
        self.index_undo = reader.index_chain.bytes_decoder(self.index_spec)
        self.at_start = index_at_start(codec)
        self.chain = reader.inner_chain(self.chunk_spec)
        # The dtype a chunk's decompressed bytes are seen as (`SyncChain.bytes_dtype`), and
        # whether its stored bytes already are (no bytes-to-bytes codec).
        self.dtype = self.chain.bytes_dtype(self.chunk_spec)
        self.raw = self.dtype is not None and not self.chain.bb
        self.chunk_bytes = prod(self.chunk_shape) * (
            0 if self.dtype is None else self.dtype.itemsize
        )
        self.fill: Any = fill_value_or_default(self.chunk_spec)
        self.decompress = self.chain.decompressor() if self.dtype is not None else None
        # Whether a chunk is one zstd frame over a native ``bytes`` codec, which libzstd can
        # decompress straight into a row of a grid of chunks (`_Shard._as_frames`).
        self.frames = (
            decompress_into is not None
            and self.dtype is not None
            and len(self.chain.bb) == 1
            and type(self.chain.bb[0]) is ZstdCodec
        )
        self._boxes: Memo[Box, tuple[list[Any], list[bool]]] = Memo(64)
        self._plans: Memo[Box, _BoxPlan] = Memo(64)

    def box_plan(self, box: Box) -> _BoxPlan:
        """A box's inner chunks: how many along each axis, their flat indices and coordinates
        (in the grid's order), and each axis as runs (`_axis_runs`); kept like projections."""
        return self._plans.get(box, lambda: self._plan(box))

    def _plan(self, box: Box) -> _BoxPlan:
        where = tuple(
            slice(start // size, (stop - 1) // size + 1)
            for (start, stop), size in zip(box, self.chunk_shape, strict=True)
        )
        counts = tuple(s.stop - s.start for s in where)
        flat = np.arange(prod(self.per_shard)).reshape(self.per_shard)[where].reshape(-1)
        wanted: list[Coords] = list(
            zip(*(a.tolist() for a in np.unravel_index(flat, self.per_shard)), strict=True)
        )
        runs = [
            _axis_runs(start, stop, size)
            for (start, stop), size in zip(box, self.chunk_shape, strict=True)
        ]
        return counts, flat, wanted, runs

    def box_projections(self, box: Box) -> tuple[list[tuple[Coords, Any, Any]], list[bool]]:
        """A box's projections (`_Shard.projections`) and which take a whole chunk; kept, as
        most shards of a read are the same box (the whole shard), read-only once made."""
        return self._boxes.get(box, lambda: self._projections(box))

    def _projections(self, box: Box) -> tuple[list[tuple[Coords, Any, Any]], list[bool]]:
        axes = [
            _axis_chunks(start, stop, size)
            for (start, stop), size in zip(box, self.chunk_shape, strict=True)
        ]
        projections: list[tuple[Coords, Any, Any]] = []
        full: list[bool] = []
        for combo in product(*axes):
            coords, chunk_sel, out_sel, whole = zip(*combo, strict=True)
            projections.append((coords, chunk_sel, out_sel))
            full.append(all(whole))
        return projections, full


def _box(chunk_sel: Any, shape: Coords) -> list[tuple[int, int]] | None:
    """A shard's selection as (start, stop) per axis, if it is one non-empty box of the shard
    (slices of step 1, as zarr gives for basic selections); else ``None``."""
    if not shape or not isinstance(chunk_sel, tuple) or len(chunk_sel) != len(shape):
        return None
    box: list[tuple[int, int]] = []
    for s, n in zip(chunk_sel, shape, strict=True):
        if type(s) is not slice or s.step not in (1, None):
            return None
        start = 0 if s.start is None else s.start
        stop = n if s.stop is None else s.stop
        if not isinstance(start, int | np.integer) or not isinstance(stop, int | np.integer):
            return None
        if not 0 <= start < stop <= n:
            return None
        box.append((int(start), int(stop)))
    return box


def _axis_chunks(start: int, stop: int, size: int) -> list[tuple[int, slice, slice, bool]]:
    """One axis of a box: each inner chunk it touches, the part of it taken, where that goes
    in the box, and whether it is the whole chunk."""
    found = []
    for j in range(start // size, (stop - 1) // size + 1):
        low, high = max(start, j * size), min(stop, (j + 1) * size)
        found.append(
            (
                j,
                slice(low - j * size, high - j * size, 1),
                slice(low - start, high - start),
                high - low == size,
            )
        )
    return found


def _axis_runs(start: int, stop: int, size: int) -> list[tuple[int, int, int, int, int]]:
    """One axis of a box as runs: a run of whole inner chunks, or a part of one chunk; each
    (first chunk, after its last chunk, part start, part stop, where it goes in the box), the
    chunks counted from the box's first."""
    first = start // size
    runs = []
    at = start
    while at < stop:
        j = at // size
        if at % size == 0 and stop - at >= size:
            count = (stop - at) // size
            runs.append((j - first, j - first + count, 0, size, at - start))
            at += count * size
        else:
            high = min(stop, (j + 1) * size)
            runs.append((j - first, j - first + 1, at - j * size, high - j * size, at - start))
            at = high
    return runs


@functools.lru_cache(maxsize=64)
def _morton(counts: Coords) -> tuple[np.ndarray[Any, np.dtype[np.intp]], tuple[int, ...]] | None:
    """Where zarr writes a grid of ``counts`` chunks (every count a power of two) in a shard:
    in Morton order, the bits of a chunk's place taken from its coordinates in turn, the
    lowest of each axis first, axes that run out of bits left out (zarr's ``decode_morton``).
    Gives each place's chunk (its index in the grid, C order) and, for rows of chunks in that
    order seen as an array with one axis of 2 for each bit of the place (the highest first)
    and then the chunk's own axes, the transposition that gives each axis of the grid as its
    bits (the highest first) followed by the chunk's same axis: so that rows in Morton order
    are a view of the grid, copied into a box without gathering them."""
    if not counts or any(count & (count - 1) for count in counts):
        return None
    bits = [count.bit_length() - 1 for count in counts]
    # Each bit of a place, lowest first: the axis and the coordinate's bit it holds.
    places = [
        (axis, bit) for bit in range(max(bits)) for axis in range(len(counts)) if bit < bits[axis]
    ]
    place = np.arange(prod(counts))
    coords = [np.zeros_like(place) for _ in counts]
    for k, (axis, bit) in enumerate(places):
        coords[axis] |= ((place >> k) & 1) << bit
    grid = np.ravel_multi_index(tuple(coords), counts) if counts else place
    high_first = len(places) - 1
    order = tuple(
        moved
        for axis in range(len(counts))
        for moved in (
            *(high_first - places.index((axis, bit)) for bit in reversed(range(bits[axis]))),
            len(places) + axis,
        )
    )
    return np.asarray(grid, dtype=np.intp), order


class _Shard:
    """One shard of a read: the inner chunks it needs and where each goes, then their bytes."""

    def __init__(self, read: _ShardedRead, position: int) -> None:
        _, spec, chunk_sel, out_sel, _ = read.batch[position]
        shape = tuple(spec.shape)
        layout = read.reader.layout(spec)
        self.read = read
        self.position = position
        self.spec = spec
        self.layout = layout
        self.per_shard = layout.per_shard
        self.chunk_spec = layout.chunk_spec
        self.index_size = layout.index_size
        self.at_start = layout.at_start
        self.out_sel: Any = out_sel
        # A box (the usual selection) is planned here; any other selection by zarr's own
        # indexer over the inner grid, so that it means exactly what it means to zarr.
        box = _box(chunk_sel, shape)
        self.box = None if box is None else tuple(box)
        self._projections: list[tuple[Coords, Any, Any]] | None = None
        self.full: list[bool] | None = None
        self.repeated: set[Coords] = set()
        if self.box is not None:
            self.shape: tuple[int, ...] = tuple(stop - start for start, stop in self.box)
            self.sel_shape = self.shape
            plan = layout.box_plan(self.box)
            self.counts: tuple[int, ...] = plan[0]
            self.flat: np.ndarray[Any, np.dtype[np.intp]] = plan[1]
            self.wanted: list[Coords] = plan[2]
        else:
            indexer = get_indexer(
                chunk_sel, shape=shape, chunk_grid=inner_chunk_grid(shape, layout.chunk_shape)
            )
            self._projections = [(tuple(p[0]), p[1], p[2]) for p in indexer]
            self.shape = tuple(indexer.shape)
            self.sel_shape = tuple(getattr(indexer, "sel_shape", self.shape))
            uses = Counter(coords for coords, _, _ in self._projections)
            self.repeated = {coords for coords, n in uses.items() if n > 1}
            self.wanted = sorted(uses)
            if self.per_shard and self.wanted:
                self.flat = np.asarray(
                    np.ravel_multi_index(tuple(np.array(self.wanted).T), self.per_shard),
                    dtype=np.intp,
                ).reshape(-1)
            else:
                self.flat = np.zeros(len(self.wanted), dtype=np.intp)
        self.whole = len(self.wanted) == prod(self.per_shard)
        self.chunks: dict[Coords, Bytes] = {}
        # Where each wanted chunk is (`_locate`), and whether one range holds them all.
        self.present = np.zeros(0, dtype=np.bool_)
        self.one_range = False
        self.starts = self.stops = np.zeros(0, dtype=np.int64)
        # The bytes of every wanted chunk in one piece, for `_decode_box`: the piece seen as
        # rows of one chunk each, and the row of each wanted chunk (-1: missing).
        self.rows: np.ndarray[Any, Any] | None = None
        self.slots: np.ndarray[Any, np.dtype[np.intp]] | None = None
        # Or the zstd frames of every wanted chunk in one piece, each to be decompressed into
        # its row of `rows` (`_as_frames`): the piece, and each chunk's (start, length) in it
        # (``None``: missing).
        self.frames: tuple[Bytes, list[tuple[int, int] | None]] | None = None
        # And if they can be decompressed in one call (`_as_one_run`): where they lie in the
        # piece, start and length.
        self.run: tuple[int, int] | None = None
        # The rows of such a run in Morton order (zarr's), as `_morton` gives them: copied into
        # the box as a view, not gathered first.
        self.morton: tuple[int, ...] | None = None
        self.ranges: list[tuple[int, int, list[tuple[int, int, Coords]]]] = []
        config = spec.config
        self.max_gap = int(getattr(config, "sharding_coalesce_max_gap_bytes", MAX_GAP))
        self.max_range = int(getattr(config, "sharding_coalesce_max_bytes", MAX_RANGE))

    @property
    def projections(self) -> list[tuple[Coords, Any, Any]]:
        """Each inner chunk the selection takes: its coordinates, what of it, where that goes."""
        if self._projections is None:
            assert self.box is not None
            self._projections, self.full = self.layout.box_projections(self.box)
        return self._projections

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
        layout = self.layout
        buffer_type = default_buffer_prototype().buffer
        buffer = (
            buffer_type(data) if buffer_type is cpu.Buffer else buffer_type.from_bytes(data.data)
        )
        if layout.index_dtype is not None:
            entries = layout.index_undo(buffer).as_numpy_array().view(layout.index_dtype)
            return entries.reshape(-1, 2)
        chunk = self.read.reader.index_chain.decode(buffer, layout.index_spec)
        return chunk.as_numpy_array().reshape(-1, 2)

    def _locate(self, index: np.ndarray[Any, np.dtype[np.uint64]]) -> bool:
        """Where the wanted chunks are, as arrays (in `wanted`'s order); ``False`` if an entry
        is too large for them (a damaged index: the span by span path reports it)."""
        entries = index[self.flat]
        offsets, lengths = entries[:, 0], entries[:, 1]
        present = offsets != _EMPTY
        if present.any() and (offsets[present].max() >= _HUGE or lengths[present].max() >= _HUGE):
            return False
        self.present = present
        self.starts = np.where(present, offsets, 0).astype(np.int64)
        self.stops = self.starts + np.where(present, lengths, 0).astype(np.int64)
        return True

    def _spans(self, index: np.ndarray[Any, np.dtype[np.uint64]]) -> list[tuple[int, int, Coords]]:
        entries = index[self.flat]
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
            if self._locate(index):
                beyond = self.present & (self.stops > end)
                if beyond.any():
                    self._check_within(int(self.stops[np.argmax(beyond)]), end)
                self._keep(data, 0)
                return []
            for start, stop, coords in self._spans(index):
                self._check_within(stop, end)
                self.chunks[coords] = data[start:stop]
            return []
        index = self._index(data)
        self.one_range = self._locate(index) and self._one_range()
        if self.one_range:
            starts = self.starts[self.present]
            self.ranges = [(int(starts.min()), int(self.stops[self.present].max()), [])]
        else:
            self.ranges = _coalesce(self._spans(index), self.max_gap, self.max_range)
        return [(low, high) for low, high, _ in self.ranges]

    def _one_range(self) -> bool:
        """Whether `_coalesce` would merge every wanted chunk present into one range."""
        starts, stops = self.starts[self.present], self.stops[self.present]
        if not len(starts):
            return False
        order = np.argsort(starts, kind="stable")
        starts, stops = starts[order], stops[order]
        gaps = starts[1:] - np.maximum.accumulate(stops)[:-1]
        return bool((gaps <= self.max_gap).all() and stops.max() - starts[0] <= self.max_range)

    def range_answers(self, answers: list[Bytes]) -> None:
        if self.one_range:
            ((low, _, _),) = self.ranges
            (data,) = answers
            beyond = self.present & (self.stops - low > len(data))
            if beyond.any():
                first = min(
                    zip(self.starts[beyond].tolist(), self.stops[beyond].tolist(), strict=True)
                )
                self._check_within(first[1] - low, len(data))
            self._keep(data, low)
            self.ranges = []
            return
        for (low, _, members), data in zip(self.ranges, answers, strict=True):
            for start, stop, coords in members:
                self._check_within(stop - low, len(data))
                self.chunks[coords] = data[start - low : stop - low]
        self.ranges = []

    def _keep(self, data: Bytes, low: int) -> None:
        """The wanted chunks, all present ones in ``data`` (which starts at byte ``low`` of the
        shard): as rows, if `_decode_box` can take them, else one by one."""
        if self._as_rows(data, low) or self._as_frames(data, low):
            return
        starts, stops = self.starts.tolist(), self.stops.tolist()
        wanted = self.wanted
        for i in np.flatnonzero(self.present).tolist():
            self.chunks[wanted[i]] = data[starts[i] - low : stops[i] - low]

    def _as_rows(self, data: Bytes, low: int) -> bool:
        layout = self.layout
        dtype = layout.dtype
        if self.box is None or not layout.raw or dtype != self.read.out_array.dtype:
            return False
        size = layout.chunk_bytes
        present = self.present
        starts = self.starts[present] - low
        if not size or (self.stops[present] - self.starts[present] != size).any():
            return False
        slots = np.full(len(present), -1, dtype=np.intp)
        if len(starts):
            base = int(starts.min())
            offsets = starts - base
            if (offsets % size).any() or not data.flags.c_contiguous:
                return False
            count = int(offsets.max()) // size + 1
            slots[present] = offsets // size
        else:
            base = count = 0
        assert dtype is not None
        rows = data[base : base + count * size].view(dtype)
        self.rows = rows.reshape(count, prod(layout.chunk_shape))
        self.slots = slots
        # Every chunk, each row once (no two entries of the index at the same bytes): in the
        # grid's order the rows are the grid, and in zarr's (Morton) they are copied as a view
        # of it; either way not gathered first (a copy of the shard: ≈160 µs a MiB here, more
        # than the copy into the result).
        if count != len(slots) or not present.all():
            return True
        in_place = np.argsort(slots)
        if (slots[in_place] == np.arange(count)).all():
            if (in_place == np.arange(count)).all():
                self.slots = None
            else:
                self.morton = self._in_morton_order(in_place)
        return True

    def _as_frames(self, data: Bytes, low: int) -> bool:
        if (
            self.box is None
            or not self.layout.frames
            or self.layout.dtype != self.read.out_array.dtype
            or not data.flags.c_contiguous
        ):
            return False
        starts, lengths = self.starts - low, self.stops - self.starts
        self.frames = (
            data,
            [
                (start, length) if present else None
                for start, length, present in zip(
                    starts.tolist(), lengths.tolist(), self.present.tolist(), strict=True
                )
            ],
        )
        self._as_one_run(data, starts, lengths)
        return True

    def _as_one_run(
        self,
        data: Bytes,
        starts: np.ndarray[Any, np.dtype[np.int64]],
        lengths: np.ndarray[Any, np.dtype[np.int64]],
    ) -> None:
        """If every wanted chunk is there, their frames lie back to back, each entry of the
        index is one frame (by its blocks) and declares a chunk's size, and they lie in the
        grid's order or in zarr's (Morton) over whole chunks, they are decompressed in one
        call (`run`), into rows in the order they lie: a call a frame cost ≈1.5 µs of Python
        each under the GIL, which the decoding threads share. Else frame by frame."""
        if not self.present.all() or not len(starts):
            return
        in_place = np.argsort(starts, kind="stable")
        first, last = starts[in_place], starts[in_place] + lengths[in_place]
        if (first[1:] != last[:-1]).any():
            return
        if (in_place != np.arange(len(in_place))).any():
            self.morton = self._in_morton_order(in_place)
            if self.morton is None:
                return
        if declared_size(data, first, lengths[in_place]) != self.layout.chunk_bytes:
            self.morton = None
            return
        self.run = (int(first[0]), int(last[-1] - first[0]))

    def _in_morton_order(
        self, in_place: np.ndarray[Any, np.dtype[np.intp]]
    ) -> tuple[int, ...] | None:
        """If the wanted chunks lie in zarr's (Morton) order over a box of whole chunks (the
        chunk at each place ``in_place`` gives, in order), the transposition `_copy_morton`
        takes their rows by."""
        morton = _morton(self.counts)
        if morton is None or len(in_place) != len(morton[0]) or not self._whole_chunks():
            return None
        return None if (in_place != morton[0]).any() else morton[1]

    def _whole_chunks(self) -> bool:
        """Whether the box is whole chunks along every axis (one run of them per axis)."""
        assert self.box is not None
        runs = self.layout.box_plan(self.box)[3]
        return all(
            len(axis) == 1 and axis[0][2] == 0 and axis[0][3] == size
            for axis, size in zip(runs, self.layout.chunk_shape, strict=True)
        )

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
        to keep every thread busy (or the chunks are copied as rows, at once), else up to one
        per thread, of at least `MIN_PART` each."""
        if self.rows is not None:
            return [range(len(self.wanted))]
        count = len(self.wanted) if self.frames is not None else len(self.projections)
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
        if self.frames is not None:
            # Every part decompresses its frames into its rows; `finish` copies the grid.
            layout = self.layout
            assert layout.dtype is not None
            self.rows = np.empty((len(self.wanted), prod(layout.chunk_shape)), layout.dtype)
        elif self.rows is None:
            self.projections  # noqa: B018 (made here, before threads share the shard)

    def _chunk_decoder(self) -> Callable[[Bytes], np.ndarray[Any, Any]]:
        """An inner chunk's bytes to its array, everything about its spec resolved once."""
        layout = self.layout
        dtype, shape, spec = layout.dtype, layout.chunk_shape, layout.chunk_spec
        if layout.raw:
            assert dtype is not None
            # Its bytes are its values: seen as an array, not copied.
            return lambda data: data.view(dtype).reshape(shape)
        buffer_type = spec.prototype.buffer
        # zarr's CPU buffer is its array: made directly, not through `from_bytes`.
        buffer_of: Callable[[Bytes], Buffer] = (
            buffer_type
            if buffer_type is cpu.Buffer
            else lambda data: buffer_type.from_bytes(data.data)
        )
        if dtype is not None and layout.decompress is not None and buffer_type is cpu.Buffer:
            decompress, as_dtype = layout.decompress, dtype
            return lambda data: np.frombuffer(decompress(data), dtype=as_dtype).reshape(shape)
        if dtype is not None:
            as_dtype = dtype
            # Bytes that are the chunk's values once decompressed are seen as an array of them:
            # the ``bytes`` codec's own decode costs more than a 16 KiB copy.
            undo = layout.chain.bytes_decoder(spec)
            return lambda data: undo(buffer_of(data)).as_numpy_array().view(as_dtype).reshape(shape)
        chain = layout.chain
        return lambda data: chain.decode(buffer_of(data), spec).as_numpy_array()

    def decode(self, part: range, check_cancelled: CheckCancelled) -> None:
        """Decode a part of the inner chunks and write them where they belong (blocking);
        parts of one shard may run at once, in several threads."""
        target = self.target
        assert target is not None
        if self.frames is not None:
            self._decompress_rows(part, check_cancelled)
            return
        if self.rows is not None:
            check_cancelled()
            self._decode_box(target)
            return
        decode = self._chunk_decoder()
        fill = self.layout.fill
        projections, full, repeated = self.projections, self.full, self.repeated
        chunks = self.chunks
        # An inner chunk is projected once, unless the selection comes back to it (coordinates
        # out of order): only then is it kept once decoded.
        again: dict[Coords, np.ndarray[Any, Any] | None] = {}
        for i in part:
            coords, chunk_sel, out_sel = projections[i]
            check_cancelled()
            if coords in again:
                chunk = again[coords]
            else:
                data = chunks.get(coords)
                chunk = None if data is None else decode(data)
                if coords in repeated:
                    again[coords] = chunk
            if chunk is None:
                target[out_sel] = fill
            elif full is not None and full[i]:
                target[out_sel] = chunk
            else:
                target[out_sel] = chunk[chunk_sel]

    def _decompress_rows(self, part: range, check_cancelled: CheckCancelled) -> None:
        """The frames of a part of the wanted chunks, each into its row (blocking); a missing
        chunk's row filled. A frame libzstd does not decompress to exactly a chunk goes to the
        codec's own decode: its result, or its error, is zarr's."""
        rows, frames = self.rows, self.frames
        assert rows is not None
        assert frames is not None
        assert decompress_into is not None
        data, where = frames
        size = self.layout.chunk_bytes
        source, target = data.ctypes.data, rows.ctypes.data
        if self.run is not None and len(part) == len(where):
            check_cancelled()
            start, length = self.run
            if decompress_into(target, rows.nbytes, source + start, length):
                return
            # Not each frame a chunk after all: frame by frame, into the grid's order, so
            # that the codec's own decode gives what zarr's would, or its error.
            self.morton = None
        decode: Callable[[Bytes], np.ndarray[Any, Any]] | None = None
        for i in part:
            if not i % MIN_PART:
                check_cancelled()
            spot = where[i]
            if spot is None:
                rows[i] = self.layout.fill
            elif not decompress_into(target + i * size, size, source + spot[0], spot[1]):
                decode = decode or self._chunk_decoder()
                rows[i] = decode(data[spot[0] : spot[0] + spot[1]]).reshape(-1)

    def _decode_box(self, target: np.ndarray[Any, Any]) -> None:
        """Every wanted chunk (their values in rows of one chunk: the shard's own bytes, or
        frames decompressed) into ``target`` at once: gathered into a grid of chunks in order
        (unless the rows are one, `slots` ``None``), then copied to the box with the grid's and
        the chunks' axes interleaved. A few numpy calls a shard where chunk by chunk took a few
        a chunk."""
        layout = self.layout
        rows, slots = self.rows, self.slots
        assert rows is not None
        if self.morton is not None:
            self._copy_morton(rows, target)
            return
        if slots is None:
            grid = rows
        elif (present := slots >= 0).all():
            grid = np.take(rows, slots, axis=0)
        elif len(rows):
            grid = np.take(rows, np.where(present, slots, 0), axis=0)
            grid[~present] = layout.fill
        else:  # a shard that holds none of them
            grid = np.full((len(slots), rows.shape[1]), layout.fill, dtype=rows.dtype)
        grid = grid.reshape(*self.counts, *layout.chunk_shape)
        ndim = len(self.counts)
        order = [axis for k in range(ndim) for axis in (k, ndim + k)]
        assert self.box is not None
        runs = layout.box_plan(self.box)[3]
        # Per axis, a run of whole chunks or a part of one: the box's edges may cut chunks.
        for combo in product(*runs):
            source = grid[
                tuple(slice(run[0], run[1]) for run in combo)
                + tuple(slice(run[2], run[3]) for run in combo)
            ]
            lengths = tuple((run[1] - run[0]) * (run[3] - run[2]) for run in combo)
            place = target[
                tuple(slice(run[4], run[4] + n) for run, n in zip(combo, lengths, strict=True))
            ]
            # as_strided checks nothing: a place cut short by the target's end would be written
            # past it (and a source cut short broadcast).
            sizes = tuple(r[1] - r[0] for r in combo) + tuple(r[3] - r[2] for r in combo)
            if place.shape != lengths or source.shape != sizes:
                raise AssertionError(f"a run of chunks out of its box: {combo} in {target.shape}")
            # Each axis of the place split in two (chunk, within it): a view, by its strides.
            split = as_strided(
                place,
                shape=[n for run in combo for n in (run[1] - run[0], run[3] - run[2])],
                strides=[
                    s
                    for run, stride in zip(combo, place.strides, strict=True)
                    for s in ((run[3] - run[2]) * stride, stride)
                ],
            )
            split[...] = source.transpose(order)

    def _copy_morton(self, rows: np.ndarray[Any, Any], target: np.ndarray[Any, Any]) -> None:
        """Rows of whole chunks in Morton order (`_morton`) into ``target`` at once: each axis
        of both seen as its bits of the chunk's place and the place within the chunk."""
        assert self.morton is not None
        shape = self.layout.chunk_shape
        bits = [count.bit_length() - 1 for count in self.counts]
        source = rows.reshape(*([2] * sum(bits)), *shape)
        lengths = [count * size for count, size in zip(self.counts, shape, strict=True)]
        place = target[tuple(slice(0, n) for n in lengths)]
        if place.shape != tuple(lengths):
            raise AssertionError(f"chunks out of their box: {lengths} in {target.shape}")
        split = as_strided(
            place,
            shape=[n for k, size in enumerate(bits) for n in (*([2] * size), shape[k])],
            strides=[
                s
                for k, (size, stride) in enumerate(zip(bits, place.strides, strict=True))
                for s in (
                    *(shape[k] * (1 << bit) * stride for bit in reversed(range(size))),
                    stride,
                )
            ],
        )
        split[...] = source.transpose(self.morton)

    def finish(self) -> None:
        """The buffer of the selection, if there is one, into the result; the bytes dropped."""
        self.chunks = {}
        if self.frames is not None and self.target is not None:
            self._decode_box(self.target)
        self.rows = self.slots = self.frames = self.run = self.morton = None
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
        taking = threading.Lock()
        taken = [False]  # every shard taken

        def next_position() -> int | None:
            with taking:
                position = next(positions, None)
                taken[0] = position is None
                return position

        def one(
            position: int, check_cancelled: CheckCancelled
        ) -> tuple[_Shard, list[range]] | None:
            """Read a shard and decode it; or, if it is to be decoded in parts, give them."""
            shard = _Shard(self, position)
            key = key_of(self.batch[position][0])
            check_cancelled()
            first = store._read_blocking(key, shard.first_request())
            if not first:  # no shard (zarr 3.1 takes an empty one for none too)
                shard.missing()
                return None
            answers: list[Bytes] = []
            for low, high in shard.first_answer(_as_array(first)):
                check_cancelled()
                data = store._read_blocking(key, RangeByteRequest(low, high))
                if data is None:  # deleted since its index was read
                    shard.missing()
                    return None
                answers.append(_as_array(data))
            shard.range_answers(answers)
            shard.prepare()
            parts = shard.parts(len(self.batch))
            if len(parts) > 1:
                return shard, parts
            shard.decode(parts[0], check_cancelled)
            shard.finish()
            return None

        def work(
            check_cancelled: CheckCancelled, io_done: Callable[[], None]
        ) -> tuple[_Shard, list[range]] | None:
            """Shards one after the other, each taken when the last is done, until there are
            none left or the hop has decoded `HOP_BYTES`: the hoppers share them out
            among themselves without a trip to the event loop per shard (≈0.25 ms of the
            loops' Python each, under the GIL the decoding threads want too). The hop holds its
            token throughout, as a batch of chunks does (`_pipeline._Read._hop`)."""
            decoded = 0
            try:
                while decoded < HOP_BYTES and (position := next_position()) is not None:
                    left = one(position, check_cancelled)
                    if left is not None:
                        return left
                    decoded += decoded_bytes(self.batch[position][1])
            finally:
                io_done()
            return None

        # A shard's other parts, when there are too few shards for the threads, are decoded in
        # hops of their own, beside the hoppers'.
        decoding = anyio.CapacityLimiter(decode_threads())

        async def hopper() -> None:
            while not taken[0]:
                left = await hop_with_token(limiter, work)
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
