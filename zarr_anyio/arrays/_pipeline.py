"""A zarr codec pipeline of our own: chunk reads in batches, decodes in worker threads.

Select it for zarr's own API with one line::

    zarr.config.set({"codec_pipeline.path": "zarr_anyio.arrays.AnyioCodecPipeline"})

(importing `zarr_anyio` registers it; in a process that has not, zarr finds it by the package's
``zarr.codec_pipeline`` entry point). zarr's `BatchedCodecPipeline` spends ≈60 µs of Python per
chunk on the event loop (a coroutine per chunk per codec, a task per fetch) around a ≈13 µs read,
and decodes on the loop or one hop per chunk. Here the cost is per *batch*:

* On a `BlockingStore` (LocalStore, ZipStore) a batch of chunks is one hop to a worker thread,
  holding one token of the store's limiter while it reads (`BlockingStore._read_many_blocking`:
  a LocalStore opens its root once a batch); the thread gives the token back as soon as its
  reads are done, then decodes and scatters the batch into the result. No task, future or
  coroutine per chunk. A raw chunk (only a native-endian ``bytes`` codec) is read straight into
  its place in the result (`BlockingStore._read_into_array_blocking`): one read where that place
  is contiguous, one ``preadv`` into its rows where it is not (`zarr_anyio.storage._scatter`),
  so a 2-D chunk costs the kernel's copy alone, not a read and a copy. Small chunks go one hop
  at a time, large ones (or small ones whose reads are seen to wait on a device) in parallel
  hops: see `PARALLEL_CHUNK_BYTES`.
* On any other store (ours or zarr's, remote or in memory, and the inner chunks of a shard) a
  pool of fetching tasks (as many as the store's bound, else zarr's ``async.concurrency``) feeds
  a bounded stream; a few decoding tasks each take what has arrived, up to a batch, to a worker
  thread.

Bounds: a batch holds at most `BATCH_BYTES` of chunks (or `MAX_BATCH` chunks); at most
`decode_threads()` batches are decoded at once, each holding one decoded chunk at a time, so the
memory beside the result is the in-flight window, not the array. Every hop waits for its thread
(`run_in_worker`): a cancelled read or write leaves no fetch, decode or write running.

Writes go a batch at a time too. Where the store gives blocking writes
(`BlockingStore._set_many_blocking`: LocalStore's atomic writes, its folders opened once a
batch), a batch of chunks the caller's array covers whole is one hop under one token, each
chunk encoded from that array (a raw one's bytes taken as they are) and written before the next;
a batch with chunks to merge reads the old chunks in a hop, runs zarr's own merge and our
encode, and is written in a second hop. Other stores: the old chunks through the store's own
calls, the merge and encode in a worker thread, the writes through the store's own calls
(`._pipeline_write` says where zarr's write spends its time).

Reads of sharded arrays (a chain that is one sharding codec) are `._sharding`'s: one index read
per shard, the wanted inner chunks as coalesced byte ranges, decoded in worker threads straight
into the result.

What it does not speed up it hands to zarr's own `BatchedCodecPipeline`, unchanged: writes of
sharded arrays and chains with codecs around a sharding codec (the inner chunks come back
through this pipeline, so they are decoded in our threads), an output that is not a NumPy array
(GPU buffers), and partial encodes.

Measured reads: benchmarks/pipeline.py; the tables (min / median / max over rounds, against
zarr, zarrs and tensorstore) are in docs/pipeline.md. Through `zarr_anyio.api` a region of
slices does not even go through zarr's own per-chunk Python (`._fast_read`).

Measured writes (whole arrays into an empty folder): the table in docs/pipeline.md. Of a 4 KiB
chunk's write the file system is most: a file with no name created, written, named and closed
(`storage._localfs._write_unnamed`); the pipeline's own Python is ≈60 µs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self, cast

import anyio
import anyio.abc
import numpy as np
from zarr.abc.codec import Codec, CodecPipeline
from zarr.codecs.sharding import ShardingCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline

from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio._core.errors import single_error
from zarr_anyio._core.limit import Limiter, OneLoopLimiter
from zarr_anyio._core.loops import current_loop_key
from zarr_anyio._core.threads import CheckCancelled, run_in_worker
from zarr_anyio.storage import AnyioStore, BlockingStore

from ._chunk_io import (
    ReadItem,
    WriteItem,
    blocking_store_of,
    decode_threads,
    decoded_bytes,
    fetchers_for,
    fill_value_or_default,
    get_status,
    hop_with_token,
    key_of,
    store_of,
    zarr_merge,
)
from ._pipeline_codecs import SyncChain
from ._pipeline_write import all_equal, all_slices, contiguous, is_whole, whole_chunk

__all__ = ["AnyioCodecPipeline"]

# One hop takes chunks up to this many bytes (decoded size) or this many chunks. 4 KiB chunks:
# 256 a hop (≈6 µs each, so ≈1.5 ms against a ≈30-100 µs hop); 1 MiB chunks: 4 a hop.
BATCH_BYTES = 4 << 20
MAX_BATCH = 256
# A hop that holds one chunk at a time (raw chunks read straight into the result, chunks
# decoded as they come, whole chunks encoded and written one by one) takes more of them: fewer
# hops, fewer wake-ups of the loop and of the threads. Measured on 512 x 1 MiB (benchmarks/
# pipeline.py's 2-D raw read, zarr 3.1.6): 4 MiB a hop 0.156 s, 16 MiB 0.115 s, 64 MiB 0.101 s;
# 256 x 1 MiB zstd through the api, against zarrs in the same rounds: 0.96-0.98 at 4 MiB a
# hop, 0.87-0.88 at 64.
DIRECT_BATCH_BYTES = 64 << 20
# Hops at once on a BlockingStore, per decoding thread: while one hop's thread waits for the
# loop to hand it the next batch, another's is reading (measured: 1 a thread left a core idle
# a fifth of the time, 2 a tenth).
HOPS_PER_THREAD = 2
# Chunks at least this large are read in parallel hops from the start; smaller ones one hop at
# a time until reads are seen to wait (`_Read.from_blocking_store`). Measured, whole reads of
# 1-D arrays from the page cache, one hop against four: raw, 16 KiB chunks 0.053 s against
# 0.080, 64 KiB 0.071 against 0.083, 256 KiB 0.040 against 0.030; zstd (decoded in threads,
# without the GIL), 4 KiB 0.31 against 0.45, 16 KiB 0.117 against 0.117, 32 KiB 0.077
# against 0.065, 64 KiB 0.122 against 0.082.
PARALLEL_CHUNK_BYTES = 128 << 10
PARALLEL_DECODED_BYTES = 16 << 10
# A read slower than this, a chunk (smaller than `PARALLEL_CHUNK_BYTES`), waited for a device:
# a 4 KiB chunk from the page cache takes 6-8 µs, a 64 KiB one 30. A chunk whose decoding takes
# longer (a 64 KiB gzip one: ≈240 µs) is worth a thread of its own as well.
WAITING_READ = 100e-6
PROBE_CHUNKS = 4
# A raw chunk fetched on the event loop (a remote store's, an in-memory one's) up to this size
# is copied into the result right there: a memcpy (≈3 µs for 64 KiB), no decoding. Sent to a
# decoding task and taken in a hop to a worker thread, it cost the stream's hand-over, the hop,
# the thread's wake-up and its GIL (2,000 x 64 KiB over HTTP, 64 in flight: the api's read cost
# ≈70 µs of CPU a chunk more than the store's own gets, zarr's items included). Larger chunks
# go to the threads: a copy of a few MiB would hold the loop up.
INLINE_COPY_BYTES = 256 << 10


def _batches(
    count: int, chunk_bytes: int, hops: int, budget: int = BATCH_BYTES, first: int = 0
) -> Iterator[range]:
    """Consecutive index ranges, sized by bytes (``budget`` a range), and small enough that
    ``hops`` hops share the work when there is little of it; the first ``first`` long, if
    that is given (a probe)."""
    size = max(1, min(MAX_BATCH, budget // max(1, chunk_bytes), -(-count // (2 * hops))))
    if first:
        yield range(min(first, count))
    for start in range(min(first, count), count, size):
        yield range(start, min(start + size, count))


# Each worker thread's buffer for a chunk `_Read._decode_plain` decodes: reused chunk after
# chunk, as the decoded values are copied into the result before the next is decoded.
_decoded = threading.local()


def _same_dtype(raw: np.dtype[Any] | None, out: np.dtype[Any]) -> bool:
    # Not ``raw == out``: NumPy takes ``None`` for float64 there.
    return raw is not None and raw == out


class _Read:
    """One call's read: what every chunk is, where it goes, and the blocking work on it."""

    def __init__(
        self,
        chain: SyncChain,
        batch: list[ReadItem],
        out: NDBuffer,
        out_array: np.ndarray[Any, Any],
        drop_axes: tuple[int, ...],
    ) -> None:
        self.chain = chain
        self.batch = batch
        self.out = out
        self.out_array = out_array
        self.drop_axes = drop_axes
        self.present = [True] * len(batch)
        self._raw: tuple[object, bool] = (None, False)
        # A chunk of zarr's zstd or blosc over a native ``bytes`` codec: numcodecs decodes it
        # into a buffer of this thread's, seen as the chunk (`_decode_plain`).
        self._decompress = chain.decompressor()
        self._plain: tuple[object, np.dtype[Any] | None] = (None, None)

    def direct_target(self, index: int) -> np.ndarray[Any, Any] | None:
        """The result's memory a raw chunk's bytes can be read straight into, if there is one:
        a whole chunk, no dropped axis, its place in the result a view of it (contiguous or
        not: the store fills it in C order, `BlockingStore._read_into_array_blocking`)."""
        _, spec, chunk_sel, out_sel, _ = self.batch[index]
        straight = self.straight_in(spec)
        if not straight or not is_whole(chunk_sel, spec.shape) or not all_slices(out_sel):
            return None
        view = self.out_array[out_sel]
        return view if view.shape == spec.shape else None

    def straight_in(self, spec: ArraySpec) -> bool:
        """Whether a whole chunk of ``spec`` is read straight into the result: a raw chain of
        the result's dtype, no dropped axis, a result that can be written. Worked out once per
        data type (zarr makes a spec per chunk, all of one data type)."""
        data_type, direct = self._raw
        if spec.dtype is not data_type:
            direct = (
                not self.drop_axes
                and bool(self.out_array.flags.writeable)
                and _same_dtype(self.chain.raw_dtype(spec), self.out_array.dtype)
            )
            self._raw = (spec.dtype, direct)
        return direct

    def scatter(self, index: int, chunk: NDBuffer | np.ndarray[Any, Any] | None) -> None:
        # What zarr's pipeline does with a decoded chunk, on the same NDBuffer calls (a NumPy
        # array takes them as well).
        _, spec, chunk_sel, out_sel, _ = self.batch[index]
        if chunk is None:
            self.out[out_sel] = fill_value_or_default(spec)
            self.present[index] = False
            return
        selected = chunk[chunk_sel]
        if self.drop_axes:
            selected = selected.squeeze(axis=self.drop_axes)
        self.out[out_sel] = selected

    def copied_in(self, index: int, data: Buffer) -> bool:
        """Whether a small raw chunk fetched on the event loop was copied there straight into
        its place in the result (`direct_target`): a copy of at most `INLINE_COPY_BYTES`,
        where the stream to a decoding task and its hop to a thread that it skips cost more
        (see `INLINE_COPY_BYTES`). A chunk of another size is left to the decoder, which says
        what is wrong with it."""
        target = self.direct_target(index)
        if target is None or target.nbytes > INLINE_COPY_BYTES:
            return False
        chunk = data.as_numpy_array()
        if chunk.nbytes != target.nbytes or chunk.dtype != np.uint8:
            return False
        target[...] = chunk.view(target.dtype).reshape(target.shape)
        return True

    def decode_and_scatter(self, index: int, data: Buffer | bytes | memoryview | None) -> None:
        if data is None:
            self.scatter(index, None)
            return
        spec = self.batch[index][1]
        if self._decompress is not None and not isinstance(data, Buffer):
            chunk = self._decode_plain(spec, data)
            if chunk is not None:
                self.scatter(index, chunk)
                return
        buffer = data if isinstance(data, Buffer) else spec.prototype.buffer.from_bytes(data)
        self.scatter(index, self.chain.decode(buffer, spec))

    def _decode_plain(
        self, spec: ArraySpec, data: bytes | memoryview
    ) -> np.ndarray[Any, Any] | None:
        """A zstd or blosc chunk decoded by numcodecs straight into this thread's buffer and
        seen as the chunk (valid until the thread decodes the next); ``None`` if the chain is
        not just that compressor over a native ``bytes`` codec: zarr's decode wraps each chunk
        in Buffers, and makes new bytes of it. Measured on 256 x 1 MiB blosc chunks (perf
        stat, 20 reads): the CPU of a read over zarrs' from 1.28 to 1.12."""
        data_type, dtype = self._plain
        if spec.dtype is not data_type:
            dtype = self.chain.bytes_dtype(spec)
            self._plain = (spec.dtype, dtype)
        if dtype is None:
            return None
        assert self._decompress is not None
        size = decoded_bytes(spec)
        buffer: np.ndarray[Any, Any] | None = getattr(_decoded, "buffer", None)
        if buffer is None or len(buffer) != size:
            buffer = _decoded.buffer = np.empty(size, dtype=np.uint8)
        self._decompress(data, out=buffer)
        return buffer.view(dtype).reshape(spec.shape)

    # ------------------------------------------------------------------ from a BlockingStore

    async def from_blocking_store(self, store: BlockingStore) -> None:
        await store._ensure_open()
        limiter = store.limiter
        spec = self.batch[0][1]
        chunk_bytes = decoded_bytes(spec)
        raw = self.chain.raw_dtype(spec)
        # A batch holds no more than `BATCH_BYTES` of chunks read as bytes (`_hop` decodes them
        # as they come beyond that), so it may be as long as a direct read's.
        budget = DIRECT_BATCH_BYTES
        most = max(1, min(HOPS_PER_THREAD * decode_threads(), limiter.total_tokens))
        # Small chunks read from the page cache are system calls and Python, each call letting
        # go of the GIL: two threads at it pass the GIL to and fro at every call (two context
        # switches a call), and one thread alone is faster (8,192 x 4 KiB: 0.098 s against
        # 0.18). Reads that wait (a cold disk, a network file system) want many at once, and so
        # does decoding that takes its time (a codec lets go of the GIL): a batch whose reads
        # and decoding took longer than `WAITING_READ` a chunk starts the other hops, and the
        # first batch is a few chunks, to see that soon.
        spread = chunk_bytes >= (
            PARALLEL_CHUNK_BYTES if raw is not None else PARALLEL_DECODED_BYTES
        )
        probe = 0 if spread else PROBE_CHUNKS
        ranges = _batches(len(self.batch), chunk_bytes, most, budget, probe)

        async def hopper(tg: anyio.abc.TaskGroup | None) -> None:
            nonlocal spread
            slow = 0
            for indices in ranges:  # shared: each hopper takes the next batch
                waited = await self._hop(store, limiter, indices)
                slow = slow + 1 if waited > WAITING_READ * len(indices) else 0
                # Two slow batches in a row, not one: the probe's few chunks are slow whenever
                # the thread was put off the core for a moment (a loaded machine), and two
                # threads at small chunks from the page cache take twice as long.
                if tg is not None and not spread and slow >= 2:
                    spread = True
                    for _ in range(most - 1):
                        tg.start_soon(hopper, None)

        async with anyio.create_task_group() as tg:
            if spread:
                for _ in range(most):
                    tg.start_soon(hopper, None)
            else:
                tg.start_soon(hopper, tg)

    async def _hop(
        self, store: BlockingStore, limiter: Limiter | OneLoopLimiter, indices: range
    ) -> float:
        """Read a batch and decode it, in a worker thread; how long that took."""

        def work(check_cancelled: CheckCancelled, reads_done: Callable[[], None]) -> float:
            read: list[tuple[int, bytes | memoryview | None]] = []

            def decode_read() -> None:
                for position, (index, data) in enumerate(read):
                    check_cancelled()
                    read[position] = (index, None)  # drop the encoded bytes as we go
                    self.decode_and_scatter(index, data)
                read.clear()

            started = time.perf_counter()
            reads = store._read_many_blocking(
                (key_of(self.batch[index][0]), self.direct_target(index)) for index in indices
            )
            held = 0
            try:
                for index in indices:
                    check_cancelled()
                    got = next(reads)
                    if not isinstance(got, int):  # missing, or not read into the result: decode
                        read.append((index, got))
                        held += 0 if got is None else len(got)
                        if held > BATCH_BYTES:
                            # Batches are sized for chunks that hold nothing
                            # (`DIRECT_BATCH_BYTES`): those read as bytes are decoded as they
                            # come, so that a batch holds no more than `BATCH_BYTES` of them.
                            decode_read()
                            held = 0
            finally:
                reads.close()
                reads_done()
            decode_read()
            # The decoding counts too: timed on the reads alone, small compressed chunks from
            # the page cache were decoded in one thread, one hop at a time, however long each
            # took (1,024 gzip chunks of 64 KiB, two cores: 0.32 s against 0.21 in parallel
            # hops).
            return time.perf_counter() - started

        return await hop_with_token(limiter, work)

    # ------------------------------------------------------------------ from any byte getter

    async def from_getters(self, fetchers: int) -> None:
        # A store whose requests are all made on a loop of its own (an fsspec filesystem's:
        # the bridge's) would be hopped to and from for each chunk: the whole read goes there
        # instead, one hop (2,000 x 64 KiB over HTTP through zarr's sync API, 64 in flight at
        # 20 ms: 62-72% of the window before, 87-89% after, with the other changes of the same
        # commit; docs/pipeline.md). The bridge waits for it to end, and cancels it with its
        # caller.
        home = _requests_loop(self.batch)
        if home is not None and home is not current_loop_key():
            await run_on_loop(lambda: self.from_keys(fetchers), home)
            return
        await self.from_keys(fetchers)

    async def from_keys(self, fetchers: int, store: AnyioStore | None = None) -> None:
        """Fetch every chunk, ``fetchers`` at a time, on this loop, and decode it: each item's
        first member a `ByteGetter`, or with ``store`` a key of it (`._fast_read`'s items)."""
        count = len(self.batch)
        decoders = decode_threads()
        per_hop = next(_batches(count, decoded_bytes(self.batch[0][1]), decoders)).stop
        send, receive = anyio.create_memory_object_stream[tuple[int, Buffer | None]](fetchers)
        indices = iter(range(count))

        async def fetcher() -> None:
            for index in indices:  # shared
                getter, spec = self.batch[index][0], self.batch[index][1]
                if store is not None:
                    data = await store.get(cast("str", getter), spec.prototype)
                else:
                    data = await getter.get(prototype=spec.prototype)
                if data is None or not self.copied_in(index, data):
                    await send.send((index, data))

        async def fetch_all() -> None:
            async with send, anyio.create_task_group() as tg:
                for _ in range(min(fetchers, count)):
                    tg.start_soon(fetcher)

        async def decoder() -> None:
            async for first in receive:
                taken = [first]
                while len(taken) < per_hop:
                    try:
                        taken.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break

                def work(check_cancelled: CheckCancelled) -> None:
                    for position, (index, data) in enumerate(taken):  # noqa: B023
                        check_cancelled()
                        taken[position] = (index, None)  # noqa: B023
                        self.decode_and_scatter(index, data)

                await run_in_worker(work)

        with receive:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch_all)
                for _ in range(decoders):
                    tg.start_soon(decoder)


def _requests_loop(batch: list[ReadItem]) -> asyncio.AbstractEventLoop | None:
    """The loop the requests of a batch's store are all made on, if it has one
    (`AnyioStore._requests_loop`) and the batch is of that one store."""
    store = store_of(batch, AnyioStore)  # type: ignore[type-abstract]
    if store is None:
        return None
    # A caller's anyio limiter works on the loop that first took it: zarr's, here.
    if isinstance(store.limiter, OneLoopLimiter):
        return None
    return store._requests_loop()


async def _for_each(items: Iterable[Any], action: Callable[[Any], Any], workers: int) -> None:
    """``await action(item)`` for every item, ``workers`` at a time, in one task group."""
    iterator = iter(items)

    async def worker() -> None:
        for item in iterator:
            await action(item)

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)


class AnyioCodecPipeline(CodecPipeline):
    """zarr's `CodecPipeline`, reading and writing chunks in batches in worker threads (see the
    module's notes); what it does not speed up goes to zarr's `BatchedCodecPipeline`."""

    def __init__(self, inner: BatchedCodecPipeline) -> None:
        self.inner = inner
        codecs = list(inner)
        self._chain: SyncChain | None = None
        # Imported here: the sharded read builds on this module's helpers.
        from ._sharding import sharded_reader

        self._sharded = sharded_reader(inner)
        if not any(isinstance(codec, ShardingCodec) for codec in codecs):
            self._chain = SyncChain(
                inner.array_array_codecs, inner.array_bytes_codec, inner.bytes_bytes_codecs
            )

    # ------------------------------------------------------------------ what zarr asks of it

    @classmethod
    def from_codecs(cls, codecs: Iterable[Codec], **kwargs: Any) -> Self:
        return cls(BatchedCodecPipeline.from_codecs(codecs, **kwargs))

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        return type(self)(self.inner.evolve_from_array_spec(array_spec))

    @property
    def supports_partial_decode(self) -> bool:
        return self.inner.supports_partial_decode

    @property
    def supports_partial_encode(self) -> bool:
        return self.inner.supports_partial_encode

    def __iter__(self) -> Iterator[Codec]:
        return iter(self.inner)

    def validate(self, **kwargs: Any) -> None:
        self.inner.validate(**kwargs)

    def compute_encoded_size(self, byte_length: int, array_spec: ArraySpec) -> int:
        return self.inner.compute_encoded_size(byte_length, array_spec)

    async def decode(
        self, chunk_bytes_and_specs: Iterable[tuple[Buffer | None, ArraySpec]]
    ) -> Iterable[NDBuffer | None]:
        return await self.inner.decode(chunk_bytes_and_specs)

    async def encode(
        self, chunk_arrays_and_specs: Iterable[tuple[NDBuffer | None, ArraySpec]]
    ) -> Iterable[Buffer | None]:
        return await self.inner.encode(chunk_arrays_and_specs)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.inner == self.inner

    def __hash__(self) -> int:
        return hash((type(self), self.inner))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.inner,))

    # ------------------------------------------------------------------ reads

    async def read(  # zarr 3.1 wants None, zarr 3.4 a status per chunk: Any fits both
        self,
        batch_info: Iterable[ReadItem],
        out: NDBuffer,
        drop_axes: tuple[int, ...] = (),
    ) -> Any:
        batch = list(batch_info)
        out_array = out.as_ndarray_like()
        if batch and self._sharded is not None and isinstance(out_array, np.ndarray):
            with single_error():
                return await self._sharded.read(batch, out_array, drop_axes)
        if not batch or self._chain is None or not isinstance(out_array, np.ndarray):
            return await self.inner.read(batch, out, drop_axes)
        reader = _Read(self._chain, batch, out, out_array, drop_axes)
        store = blocking_store_of(batch)
        with single_error():
            if store is not None:
                await reader.from_blocking_store(store)
            else:
                await reader.from_getters(fetchers_for(batch))
        return tuple(get_status(present) for present in reader.present)

    async def _read_keys(
        self,
        store: BlockingStore,
        batch: list[tuple[str, ArraySpec, Any, Any, bool]],
        out: NDBuffer,
    ) -> None:
        """`read` of items whose first member is the chunk's key in ``store`` (a `BlockingStore`)
        rather than a `StorePath` (`._fast_read`'s, for a chain without sharding)."""
        assert self._chain is not None
        out_array = out.as_ndarray_like()
        assert isinstance(out_array, np.ndarray)
        reader = _Read(self._chain, cast("list[ReadItem]", batch), out, out_array, ())
        with single_error():
            await reader.from_blocking_store(store)

    async def _read_remote_keys(
        self,
        store: AnyioStore,
        batch: list[tuple[str, ArraySpec, Any, Any, bool]],
        out: NDBuffer,
    ) -> None:
        """`_read_keys` for a store that is no `BlockingStore` (a remote one): the chunks
        fetched on this loop, ``max_concurrency`` at a time."""
        assert self._chain is not None
        out_array = out.as_ndarray_like()
        assert isinstance(out_array, np.ndarray)
        reader = _Read(self._chain, cast("list[ReadItem]", batch), out, out_array, ())
        with single_error():
            await reader.from_keys(store.max_concurrency, store)

    # ------------------------------------------------------------------ writes

    def _merge_and_encode(
        self,
        item: WriteItem,
        existing: Buffer | None,
        value: NDBuffer,
        drop_axes: tuple[int, ...],
    ) -> Buffer | None:
        """zarr's own merge of the new values into a chunk, then our encode (blocking)."""
        chain = self._chain
        assert chain is not None
        _, spec, chunk_sel, out_sel, complete = item
        old = None if existing is None else chain.decode(existing, spec)
        if zarr_merge is not None:
            merged = zarr_merge(old, value, out_sel, spec, chunk_sel, complete, drop_axes)
        else:
            merged = self.inner._merge_chunk_array(  # type: ignore[attr-defined, unused-ignore]
                old, value, out_sel, spec, chunk_sel, complete, drop_axes
            )
        return self._encode(merged, spec)

    def _encode(self, chunk: NDBuffer, spec: ArraySpec) -> Buffer | None:
        """A chunk's stored bytes, ``None`` for none (a chunk of its fill value, not kept)."""
        chain = self._chain
        assert chain is not None
        if not spec.config.write_empty_chunks and all_equal(chunk, fill_value_or_default(spec)):
            return None
        return chain.encode(chunk, spec)

    def _encode_whole(self, chunk: np.ndarray[Any, Any], spec: ArraySpec) -> Buffer | None:
        """`_encode` of a whole chunk of the caller's array, from a C-contiguous copy in a reused
        buffer where the chunk is not contiguous there (`contiguous`)."""
        nd_buffer = spec.prototype.nd_buffer
        if not spec.config.write_empty_chunks and all_equal(
            nd_buffer.from_numpy_array(chunk), fill_value_or_default(spec)
        ):
            return None
        source = contiguous(chunk)
        encoded = self._encode(nd_buffer.from_numpy_array(source), spec)
        if source is not chunk and encoded is not None:
            stored = encoded.as_numpy_array()
            if np.may_share_memory(source, stored):  # the buffer is reused: keep no view of it
                encoded = spec.prototype.buffer.from_bytes(stored.tobytes())
        return encoded

    async def write(
        self,
        batch_info: Iterable[WriteItem],
        value: NDBuffer,
        drop_axes: tuple[int, ...] = (),
    ) -> None:
        batch = list(batch_info)
        if (
            not batch
            or self._chain is None
            or self.supports_partial_encode
            or not isinstance(value.as_ndarray_like(), np.ndarray)
        ):
            await self.inner.write(batch, value, drop_axes)
            return
        threads = decode_threads()
        writer = _Write(self, batch, value, drop_axes)
        store = blocking_store_of(batch)
        # Whole chunks written to a BlockingStore hold one encoded chunk at a time in a hop
        # (`_Write.to_blocking_store`), so a hop takes as many as a direct read's. Measured,
        # 512 x 1 MiB raw 2-D written to a LocalStore: 4 MiB a hop 0.177 s, 16 MiB 0.150 s,
        # 64 MiB 0.121 s.
        budget = BATCH_BYTES
        if store is not None and store._sets_blocking and all(item[4] for item in batch):
            budget = DIRECT_BATCH_BYTES
        ranges = _batches(len(batch), decoded_bytes(batch[0][1]), threads, budget)
        with single_error():
            if store is not None and store._sets_blocking:
                store._check_writable()
                await store._ensure_open()
                blocking_store = store
                await _for_each(
                    ranges, lambda r: writer.to_blocking_store(blocking_store, r), threads
                )
            else:
                fetchers = fetchers_for(batch)
                await _for_each(ranges, lambda r: writer.through_setters(fetchers, r), threads)


class _Raw:
    """The mark of a raw chunk that the caller's array covers whole: the write hop takes its
    bytes from that array (`_Write.stored`), nothing is encoded ahead."""


RAW = _Raw()


class _Write:
    """One call's write, a batch of chunks at a time: the old chunks a partial write needs, then
    zarr's merge and our encode in a worker thread, then the stores. A chunk the caller's array
    covers whole is not merged: it is encoded from that array (`._pipeline_write`)."""

    def __init__(
        self,
        pipeline: AnyioCodecPipeline,
        batch: list[WriteItem],
        value: NDBuffer,
        drop_axes: tuple[int, ...],
    ) -> None:
        self.pipeline = pipeline
        self.batch = batch
        self.value = value
        # A NumPy array (`AnyioCodecPipeline.write` saw to it): the same memory, no copy.
        self.array: np.ndarray[Any, Any] = np.asarray(value.as_ndarray_like())
        self.drop_axes = drop_axes
        self._raw: tuple[object, bool] = (None, False)

    def is_raw(self, spec: ArraySpec) -> bool:
        data_type, raw = self._raw
        if spec.dtype is not data_type:  # once per data type, as `_Read.direct_target`
            chain = self.pipeline._chain
            assert chain is not None
            raw = chain.raw_dtype(spec) is not None
            self._raw = (spec.dtype, raw)
        return raw

    def whole(self, index: int) -> np.ndarray[Any, Any] | None:
        _, spec, chunk_sel, out_sel, complete = self.batch[index]
        return whole_chunk(self.array, spec, chunk_sel, out_sel, complete, self.drop_axes)

    def prepare(
        self, index: int, existing: Buffer | bytes | memoryview | None, *, direct: bool = True
    ) -> Buffer | _Raw | None:
        """What a chunk is stored as: `RAW` (its bytes are the caller's, see `stored`), its
        encoded bytes, or ``None`` (its key deleted). Not ``direct``: always zarr's merge."""
        spec = self.batch[index][1]
        chunk = self.whole(index) if direct else None
        if chunk is not None:
            return RAW if self.is_raw(spec) else self.pipeline._encode_whole(chunk, spec)
        if existing is not None and not isinstance(existing, Buffer):
            existing = spec.prototype.buffer.from_bytes(existing)
        return self.pipeline._merge_and_encode(
            self.batch[index], existing, self.value, self.drop_axes
        )

    def stored(self, index: int, prepared: Buffer | _Raw | None) -> memoryview | None:
        """The bytes to store for a prepared chunk, ``None`` to delete its key. A raw chunk's
        are the caller's own, or a reused buffer's: write them before the next is taken."""
        if prepared is None:
            return None
        if isinstance(prepared, Buffer):
            return memoryview(prepared.as_buffer_like()).cast("B")
        spec = self.batch[index][1]
        chunk = self.whole(index)
        assert chunk is not None
        if not spec.config.write_empty_chunks and all_equal(
            spec.prototype.nd_buffer.from_numpy_array(chunk), fill_value_or_default(spec)
        ):
            return None
        return contiguous(chunk).reshape(-1).view(np.uint8).data

    async def to_blocking_store(self, store: BlockingStore, indices: range) -> None:
        """Chunks the caller's value covers whole: one hop (holding a token) encodes each and
        writes it before the next, so a hop holds one encoded chunk at a time (a raw chunk's
        bytes are the caller's, a copy at most). Measured, 256 x 1 MiB zstd(1) 2-D: 0.200 s
        in an encoding hop and then a writing one, 4 MiB a hop; 0.180 s in one; 0.149 s in one
        taking 64 MiB (`AnyioCodecPipeline.write`): the writes' system calls no longer wait for
        the GIL while the other thread encodes, and the loop hands out a quarter as many hops.

        A batch with chunks to merge: one hop reads the old chunks (holding a token) and encodes
        them all, one writes them (holding a token)."""
        limiter = store.limiter

        def encoded() -> Iterator[tuple[str, memoryview | None]]:
            for index in indices:
                yield key_of(self.batch[index][0]), self.stored(index, self.prepare(index, None))

        if all(self.batch[index][4] for index in indices):
            await hop_with_token(
                limiter,
                lambda check_cancelled, _: store._set_many_blocking(encoded(), check_cancelled),
            )
            return
        prepared: list[tuple[int, Buffer | _Raw | None]] = []

        def prepare_all(check_cancelled: CheckCancelled, reads_done: Callable[[], None]) -> None:
            old: dict[int, bytes | memoryview | None] = {}
            try:
                for index in indices:
                    if not self.batch[index][4]:
                        check_cancelled()
                        old[index] = store._read_blocking(key_of(self.batch[index][0]), None)
            finally:
                reads_done()
            for index in indices:
                check_cancelled()
                prepared.append((index, self.prepare(index, old.pop(index, None))))

        await hop_with_token(limiter, prepare_all)

        def merged() -> Iterator[tuple[str, memoryview | None]]:
            for position, (index, data) in enumerate(prepared):
                prepared[position] = (index, None)  # drop the encoded bytes as we go
                yield key_of(self.batch[index][0]), self.stored(index, data)

        await hop_with_token(
            limiter, lambda check_cancelled, _: store._set_many_blocking(merged(), check_cancelled)
        )

    async def through_setters(self, fetchers: int, indices: range) -> None:
        old: dict[int, Buffer | None] = {}

        async def fetch(index: int) -> None:
            setter, spec = self.batch[index][0], self.batch[index][1]
            old[index] = await setter.get(prototype=spec.prototype)

        incomplete = [index for index in indices if not self.batch[index][4]]
        await _for_each(incomplete, fetch, min(fetchers, len(incomplete)))
        encoded: dict[int, Buffer | _Raw | None] = {}

        def encode_all(check_cancelled: CheckCancelled) -> None:
            for index in indices:
                check_cancelled()
                # The store may keep the buffer it is given (a MemoryStore does): never one
                # that is the caller's array or a reused buffer.
                encoded[index] = self.prepare(index, old.pop(index, None), direct=False)

        await run_in_worker(encode_all)

        async def store(index: int) -> None:
            setter, data = self.batch[index][0], encoded.pop(index)
            if data is None:
                await setter.delete()
            else:
                assert isinstance(data, Buffer)
                await setter.set(data)

        await _for_each(indices, store, min(fetchers, len(indices)))


# Its public name: zarr finds a pipeline by ``module.class``, which is what users write in
# ``codec_pipeline.path`` (and what pickling looks up).
AnyioCodecPipeline.__module__ = "zarr_anyio.arrays"
register_pipeline(AnyioCodecPipeline)
