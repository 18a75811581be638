"""Sharded arrays through our codec pipeline, against zarr's own pipeline on the same arrays.

The property test draws shard and inner chunk shapes, the index's place and codecs, the inner
codecs, fill values, which shards and inner chunks exist, and every selection kind, and reads
them through both pipelines. The async tests run under every backend: the reads zarr_anyio's API
makes, how many requests a shard costs (coalescing, counted at the store), and cancellation.
"""

from __future__ import annotations

import inspect
import itertools
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numcodecs
import numpy as np
import pytest
import zarr
import zarr.codecs
import zarr.storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import ShardingCodec
from zarr.core.buffer import cpu
from zarr.core.sync import sync
from zarr.testing.strategies import basic_indices

import zarr_anyio
import zarr_anyio.api as za
from support.arrays import (
    BACKENDS,
    OURS,
    STORE_KINDS,
    ZARRS,
    CountingStore,
    compare_reads,
    new_store,
    opened,
    pipeline,
)
from support.remote import KINDS, http_store
from support.servers import HTTPServer
from zarr_anyio.arrays import _sharding, _zstd


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


INNER = ["raw", "zstd", "blosc", "gzip+crc32c", "transpose+zstd", "big-endian"]


def sharding(inner: tuple[int, ...], codecs: str, index: str, location: str) -> ShardingCodec:
    chain: list[Any] = [zarr.codecs.BytesCodec()]
    if codecs == "zstd":
        chain.append(zarr.codecs.ZstdCodec(level=1))
    elif codecs == "blosc":
        chain.append(zarr.codecs.BloscCodec(cname="lz4", clevel=1))
    elif codecs == "gzip+crc32c":
        chain += [zarr.codecs.GzipCodec(level=1), zarr.codecs.Crc32cCodec()]
    elif codecs == "transpose+zstd":
        order = tuple(reversed(range(len(inner))))
        chain = [zarr.codecs.TransposeCodec(order=order), *chain, zarr.codecs.ZstdCodec(level=1)]
    elif codecs == "big-endian":
        chain = [zarr.codecs.BytesCodec(endian="big")]
    index_codecs: list[Any] = [zarr.codecs.BytesCodec()]
    if index == "crc32c":
        index_codecs.append(zarr.codecs.Crc32cCodec())
    return ShardingCodec(
        chunk_shape=inner, codecs=chain, index_codecs=index_codecs, index_location=location
    )


def empty_sharded(
    store: Any,
    shape: tuple[int, ...],
    shards: tuple[int, ...],
    codec: ShardingCodec,
    dtype: str,
    fill_value: Any,
) -> tuple[zarr.Array[Any], np.ndarray]:
    """A new array of shards by ``codec`` that stores no chunk of only its fill value, and what
    it reads as (the fill value throughout)."""
    array = zarr.create_array(
        store,
        shape=shape,
        chunks=shards,
        serializer=codec,
        compressors=None,
        dtype=dtype,
        fill_value=fill_value,
        config={"write_empty_chunks": False},
    )
    return array, np.full(shape, fill_value, dtype=dtype)


@st.composite
def sharded_arrays(draw: st.DrawFn, tmp_root: Path) -> tuple[zarr.Array[Any], np.ndarray, Any]:
    ndim = draw(st.integers(1, 3))
    inner = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    shards = tuple(n * draw(st.integers(1, 3)) for n in inner)
    shape = tuple(draw(st.integers(1, 2 * n + 1)) for n in shards)
    codecs = draw(st.sampled_from(INNER))
    codec = sharding(
        inner,
        codecs,
        draw(st.sampled_from(["crc32c", "bytes"])),
        draw(st.sampled_from(["start", "end"])),
    )
    dtype = draw(st.sampled_from(["i2", "f4", "u1", "f8"]))
    if codecs == "big-endian" and dtype == "u1":
        dtype = "i4"
    fill_value = draw(st.integers(0, 5))
    store = new_store(draw(st.sampled_from(STORE_KINDS)), tmp_root)
    with pipeline(ZARRS):
        array, data = empty_sharded(store, shape, shards, codec, dtype, fill_value)
        values = (np.arange(int(np.prod(shape))).reshape(shape) % 7).astype(dtype)
        # Some shards written, some not; inside them, inner chunks holding only the fill value
        # are left out of the shard.
        for _ in range(draw(st.integers(0, 2))):
            region = draw(basic_indices(shape=shape, allow_ellipsis=False))
            data[region] = values[region]
            array[region] = values[region]
        region = draw(basic_indices(shape=shape, allow_ellipsis=False))
        data[region] = fill_value
        array[region] = fill_value
    return array, data, store


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_sharded_reads_match_zarrs_pipeline(data: st.DataObject, tmp_path: Path) -> None:
    _, expected, store = data.draw(sharded_arrays(tmp_path))
    ours, theirs = opened(store, OURS), opened(store, ZARRS)
    assert ours._async_array.codec_pipeline._sharded is not None  # type: ignore[attr-defined]
    np.testing.assert_array_equal(ours[...], expected)
    compare_reads(data, ours, theirs, expected)


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("str", np.array(["a", "bc", "", "dé", "x" * 10] * 13, dtype=object)),
        ("bool", np.arange(65) % 3 == 0),
        ("datetime64[s]", np.arange(65).astype("datetime64[s]")),
        ("complex128", np.arange(65) * (1 + 2j)),
    ],
)
def test_sharded_dtypes_match_zarrs_pipeline(dtype: str, values: np.ndarray) -> None:
    # Variable-length strings go through their own codec's decode; the others are their bytes.
    store = zarr_anyio.MemoryStore()
    with pipeline(ZARRS):
        zarr.create_array(store, shape=(65,), chunks=(4,), shards=(16,), dtype=dtype)[:40] = values[
            :40
        ]
    ours, theirs = opened(store, OURS), opened(store, ZARRS)
    for selection in (slice(None), slice(3, 50, 3), slice(20, 24)):
        np.testing.assert_array_equal(ours[selection], theirs[selection])


# ---------------------------------------------------------------- the async surface


class CountingDisk(zarr_anyio.LocalStore):
    """A LocalStore that records the reads of chunk keys it makes and how many run at once;
    each takes ``delay`` seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = 0.0
        self.reads: list[tuple[str, ByteRequest | None]] = []
        self.running = 0
        self.most = 0  # the most reads ever running at once
        self.lock = threading.Lock()

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> Any:
        if "/c/" not in f"/{key}":
            return super()._read_blocking(key, byte_range)
        with self.lock:
            self.reads.append((key, byte_range))
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return super()._read_blocking(key, byte_range)
        finally:
            with self.lock:
                self.running -= 1


async def _sharded(store: Any, **kwargs: Any) -> zarr_anyio.AsyncArray:
    """A 1-D array of 4 shards of 16 inner chunks of 4 values, all written but inner chunk 5."""
    arr = await za.create_array(
        store,
        shape=(256,),
        chunks=(4,),
        shards=(64,),
        dtype="i4",
        fill_value=-1,
        compressors=None,
        **kwargs,
    )
    values = np.arange(256, dtype="i4")
    values[20:24] = -1
    await arr.setitem(slice(None), values)
    return arr


def _expected() -> np.ndarray:
    values = np.arange(256, dtype="i4")
    values[20:24] = -1
    return values


@pytest.mark.anyio
async def test_inner_chunks_come_as_coalesced_ranges_through_the_store() -> None:
    store = CountingStore(max_concurrency=8)
    arr = await _sharded(store)
    assert type(arr.async_array.codec_pipeline).__name__ == "AnyioCodecPipeline"
    # Inner chunks 2 to 9 of the first shard (5 missing in between): its index, then one range.
    store.started = 0
    np.testing.assert_array_equal(await arr.getitem(slice(8, 40)), _expected()[8:40])
    assert store.started == 2
    # Every inner chunk of a shard: the whole shard in one request, index and all.
    store.started = 0
    np.testing.assert_array_equal(await arr.getitem(slice(None)), _expected())
    assert store.started == 4
    # A missing shard: one request to find it missing; the fill value.
    await store.delete("c/3")
    store.started = 0
    np.testing.assert_array_equal(await arr.getitem(slice(200, 210)), -1)
    assert store.started == 1


@pytest.mark.anyio
async def test_a_shard_costs_one_hop_and_two_reads_on_a_local_store(tmp_path: Path) -> None:
    store = CountingDisk(tmp_path / "a")
    arr = await _sharded(store)
    store.reads.clear()
    np.testing.assert_array_equal(
        await arr.getitem(slice(8, 40)), _expected()[8:40]
    )  # inner chunks 2..9
    index_size = 16 * 16 + 4  # 16 entries of two uint64, a crc32c
    # Chunks of 16 bytes, 5 left out: 2 to 9 are bytes 32 to 144, one range.
    assert sorted(store.reads, key=str) == sorted(
        [("c/0", SuffixByteRequest(index_size)), ("c/0", RangeByteRequest(32, 144))],
        key=str,
    )
    store.reads.clear()
    np.testing.assert_array_equal(await arr.getitem(slice(None)), _expected())
    assert sorted(store.reads, key=str) == [(f"c/{i}", None) for i in range(4)]


@pytest.mark.anyio
@pytest.mark.parametrize("tokens", [1, 4])
async def test_a_hop_on_a_local_store_takes_shard_after_shard(
    tmp_path: Path, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hops share the shards out among themselves in their threads, each taking the next
    # when it is done with one, up to `HOP_BYTES` of them a hop: a trip to the loop per hop,
    # not per shard. Every shard is read once, and no more reads run at once than the store
    # has tokens.
    store = CountingDisk(tmp_path / "a", max_concurrency=tokens)
    arr = await za.create_array(
        store, shape=(64 * 16,), chunks=(4,), shards=(16,), dtype="i4", compressors=None
    )
    await arr.setitem(slice(None), np.arange(64 * 16))
    hops = [0]
    original = _sharding.hop_with_token  # type: ignore[attr-defined]

    async def counted(*args: Any) -> Any:
        hops[0] += 1
        return await original(*args)

    monkeypatch.setattr(_sharding, "hop_with_token", counted)
    keys = sorted(f"c/{i}" for i in range(64))
    for hop_bytes, fewest, most in [(None, 1, 2), (3 * 64, 22, 24)]:  # a shard: 64 bytes
        if hop_bytes is not None:
            monkeypatch.setattr(_sharding, "HOP_BYTES", hop_bytes)
        store.reads.clear()
        hops[0] = store.most = 0
        np.testing.assert_array_equal(await arr.getitem(...), np.arange(64 * 16))
        assert sorted(key for key, _ in store.reads) == keys
        assert fewest <= hops[0] <= (most if tokens > 1 else fewest + 1)
        assert store.most <= tokens


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_remote_shard_costs_its_index_and_one_range(
    http_server: HTTPServer, kind: str
) -> None:
    source = zarr_anyio.MemoryStore()
    await _sharded(source)
    http_server.objects.update({key: value.to_bytes() for key, value in source._store_dict.items()})
    arr = await za.open_array(store=http_store(kind, http_server), mode="r")
    assert type(arr.async_array.codec_pipeline).__name__ == "AnyioCodecPipeline"

    async def requests_for(selection: slice) -> int:
        http_server.paths.clear()
        np.testing.assert_array_equal(await arr.getitem(selection), _expected()[selection])
        return sum(path.endswith("/c/0") for path in http_server.paths)

    one = await requests_for(slice(8, 12))  # inner chunk 2
    assert one == 2  # the index, then the chunk
    assert await requests_for(slice(8, 40)) == one  # inner chunks 2 to 9: one range still


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_sharded_reads_under_every_backend(tmp_path: Path, kind: str) -> None:
    for location in ("start", "end"):
        store: Any = (
            zarr_anyio.LocalStore(tmp_path / location)
            if kind == "local"
            else zarr_anyio.MemoryStore()
        )
        arr = await za.create_array(
            store,
            shape=(30, 20),
            chunks=(10, 10),
            serializer=sharding((5, 2), "zstd", "crc32c", location),
            compressors=None,
            dtype="f4",
            fill_value=7,
        )
        values = np.arange(600, dtype="f4").reshape(30, 20)
        await arr.setitem((slice(0, 12), slice(None)), values[:12])
        expected = np.full((30, 20), 7, dtype="f4")
        expected[:12] = values[:12]
        selections: list[tuple[Any, ...]] = [
            (slice(None), slice(None)),
            (slice(3, 25, 2), 5),
            (slice(4, 6), slice(1, 19)),
        ]
        for selection in selections:
            np.testing.assert_array_equal(await arr.getitem(selection), expected[selection])
        theirs = await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[:])  # noqa: B023
        np.testing.assert_array_equal(theirs, expected)


@pytest.mark.anyio
@pytest.mark.parametrize("whole", [True, False])
async def test_a_corrupt_shard_index_raises_zarrs_own_error(tmp_path: Path, whole: bool) -> None:
    store = zarr_anyio.LocalStore(tmp_path)
    arr = await _sharded(store)
    shard = tmp_path / "c" / "1"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # in the index, at the end: its checksum no longer matches
    shard.write_bytes(bytes(data))
    selection = slice(64, 128) if whole else slice(70, 80)
    with pytest.raises(ValueError) as theirs:  # noqa: PT011 (the message is compared below)
        await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[selection])
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        await arr.getitem(selection)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("cut", "whole", "message"),
    [
        ("middle", True, "its index names bytes up to"),
        ("to 250 bytes", True, "250 bytes where its index takes 260"),
        ("to 250 bytes", False, "250 bytes where its index takes 260"),
    ],
)
async def test_a_truncated_shard_raises_an_error_that_names_it(
    tmp_path: Path, cut: str, whole: bool, message: str
) -> None:
    # Before: numpy's "cannot reshape array of size 0 into shape (4,)", or (the index intact
    # at the end, bytes cut from before it) inner chunks read from the index's bytes.
    store = zarr_anyio.LocalStore(tmp_path)
    arr = await _sharded(store)
    shard = tmp_path / "c" / "1"
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + data[-260:] if cut == "middle" else data[:250])
    selection = slice(64, 128) if whole else slice(110, 128)
    with pytest.raises(ValueError, match=rf"the shard at '.*c/1' is corrupt: {message}"):
        await arr.getitem(selection)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_one_big_shard_read_in_parts(tmp_path: Path, kind: str) -> None:
    # One shard of 256 inner chunks, some missing: a read of it alone is decoded in several
    # parts at once (one per thread), into the result or into a buffer of the selection.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    arr = await za.create_array(
        store,
        shape=(64, 64),
        chunks=(64, 64),
        serializer=sharding((4, 4), "zstd", "crc32c", "end"),
        compressors=None,
        dtype="i4",
        fill_value=-3,
    )
    values = np.arange(64 * 64, dtype="i4").reshape(64, 64)
    await arr.setitem((slice(0, 50), slice(None)), values[:50])
    expected = np.full((64, 64), -3, dtype="i4")
    expected[:50] = values[:50]
    np.testing.assert_array_equal(await arr.getitem(...), expected)
    np.testing.assert_array_equal(
        await arr.getitem((slice(3, 61), slice(1, 63))), expected[3:61, 1:63]
    )
    rows, cols = np.arange(63, -1, -1), np.arange(64) % 7
    np.testing.assert_array_equal(
        await arr.get_coordinate_selection((rows, cols)), expected[rows, cols]
    )


@pytest.mark.anyio
async def test_a_cancelled_sharded_read_from_a_local_store_waits_for_its_threads(
    tmp_path: Path,
) -> None:
    store = CountingDisk(tmp_path / "a", max_concurrency=4)
    arr = await za.create_array(
        store, shape=(64 * 16,), chunks=(4,), shards=(16,), dtype="i4", compressors=None
    )
    await arr.setitem(slice(None), np.arange(64 * 16))
    store.reads.clear()
    store.delay = 0.02
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(arr.getitem, ...)
            while not store.reads:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    assert store.running == 0
    done = len(store.reads)
    assert 0 < done < 64
    await anyio.sleep(0.1)
    assert len(store.reads) == done
    assert store.limiter.statistics().borrowed_tokens == 0


# ---------------------------------------------------------------- inner chunks that are their bytes

RAW_DTYPES = ["u1", "i2", "f4", "f8", "c8", "bool"]


@contextmanager
def counting_box_copies() -> Iterator[list[int]]:
    """Counts the shards read by `_Shard._decode_box` (all of a shard's chunks in one copy)
    while it lasts."""
    original = _sharding._Shard._decode_box
    count = [0]

    def counted(shard: Any, target: np.ndarray) -> None:
        count[0] += 1
        original(shard, target)

    _sharding._Shard._decode_box = counted  # type: ignore[method-assign,assignment]
    try:
        yield count
    finally:
        _sharding._Shard._decode_box = original  # type: ignore[method-assign]


@st.composite
def raw_sharded_arrays(
    draw: st.DrawFn, tmp_root: Path, zstd: bool = False
) -> tuple[zarr.Array[Any], np.ndarray, Any, bool]:
    """An array whose inner chunks are only a ``bytes`` codec (native or not), and zstd if
    ``zstd``, inner chunks written in any order zarr has, some shards and inner chunks missing;
    whether any shard holds chunks whose bytes are their values once decompressed (so a read of
    it all copies them as rows, decompressed into them first)."""
    ndim = draw(st.integers(1, 3))
    inner = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    shards = tuple(n * draw(st.integers(1, 4)) for n in inner)
    shape = tuple(draw(st.integers(1, 2 * n + 1)) for n in shards)
    dtype = draw(st.sampled_from(RAW_DTYPES))
    native = dtype in ("u1", "bool") or draw(st.booleans())
    endian = sys.byteorder if native else ("big" if sys.byteorder == "little" else "little")
    kwargs: dict[str, Any] = {}
    if "subchunk_write_order" in inspect.signature(ShardingCodec).parameters:  # zarr >= 3.4
        kwargs["subchunk_write_order"] = draw(
            st.sampled_from(["morton", "unordered", "lexicographic", "colexicographic"])
        )
    codec = ShardingCodec(
        chunk_shape=inner,
        codecs=[
            zarr.codecs.BytesCodec(endian=endian),
            *([zarr.codecs.ZstdCodec(level=1)] if zstd else []),
        ],
        index_codecs=[zarr.codecs.BytesCodec(), zarr.codecs.Crc32cCodec()],
        index_location=draw(st.sampled_from(["start", "end"])),
        **kwargs,
    )
    fill_value = draw(st.sampled_from([0, 1, 3]))
    store = new_store(draw(st.sampled_from(STORE_KINDS)), tmp_root)
    with pipeline(ZARRS):
        array, data = empty_sharded(store, shape, shards, codec, dtype, fill_value)
        # Every value told apart from the others and from the fill value: a chunk in the
        # wrong place cannot go unseen (bool has two).
        count = int(np.prod(shape))
        if dtype == "bool":
            values = (np.arange(count) % 3 == 0).reshape(shape)
        else:
            values = (np.arange(count) % 240 + 5).reshape(shape).astype(dtype)
        # Often every chunk of a shard stored (all of it then copied in one), else some.
        regions: list[Any] = [...] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(0 if regions else 1, 3))):
            regions.append(draw(basic_indices(shape=shape, allow_ellipsis=False)))
        for region in regions:
            data[region] = values[region]
            array[region] = values[region]
        if draw(st.booleans()):
            region = draw(basic_indices(shape=shape, allow_ellipsis=False))
            data[region] = fill_value
            array[region] = fill_value
        # Inner chunks left out here and there: the others are then not in their grid's order.
        grid = [-(-n // c) for n, c in zip(shape, inner, strict=True)]
        for _ in range(draw(st.integers(0, 4))):
            corner = [draw(st.integers(0, n - 1)) * c for n, c in zip(grid, inner, strict=True)]
            hole = tuple(slice(a, a + c) for a, c in zip(corner, inner, strict=True))
            data[hole] = fill_value
            array[hole] = fill_value
    fill = np.asarray(fill_value).astype(dtype)
    stored = any(np.any(data[block] != fill) for block in _shard_blocks(shape, shards))
    return array, data, store, native and stored


def _shard_blocks(shape: tuple[int, ...], shards: tuple[int, ...]) -> list[tuple[slice, ...]]:
    starts = [range(0, n, s) for n, s in zip(shape, shards, strict=True)]
    return [
        tuple(slice(a, a + s) for a, s in zip(corner, shards, strict=True))
        for corner in itertools.product(*starts)
    ]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
@pytest.mark.parametrize("zstd", [False, True], ids=["raw", "zstd"])
def test_raw_inner_chunks_copied_as_rows_match_zarrs_pipeline(
    data: st.DataObject, tmp_path: Path, zstd: bool
) -> None:
    # Shards whose inner chunks are their values (zstd: once decompressed, each frame straight
    # into its row), read as a box (a basic selection of step 1): copied all at once, gathered
    # by the index in whatever order they were written, cut at the box's edges, the missing
    # ones filled. Anything else, one chunk at a time.
    _, expected, store, rows = data.draw(raw_sharded_arrays(tmp_path, zstd))
    ours, theirs = opened(store, OURS), opened(store, ZARRS)
    with counting_box_copies() as copies:
        np.testing.assert_array_equal(ours[...], expected)
        assert (copies[0] > 0) == rows
        for _ in range(3):
            box = tuple(
                slice(start, data.draw(st.integers(start + 1, n)))
                for n in expected.shape
                for start in [data.draw(st.integers(0, n - 1))]
            )
            np.testing.assert_array_equal(ours[box], theirs[box])
            np.testing.assert_array_equal(ours[box], expected[box])
        # An integer drops its axis; the shard's part of the selection is no box then.
        axis = data.draw(st.integers(0, expected.ndim - 1))
        where = data.draw(st.integers(0, expected.shape[axis] - 1))
        dropped = tuple(where if k == axis else slice(None) for k in range(expected.ndim))
        np.testing.assert_array_equal(ours[dropped], expected[dropped])
        compare_reads(data, ours, theirs, expected)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_raw_inner_chunks_out_of_grid_order_some_missing(tmp_path: Path, kind: str) -> None:
    # zarr writes a shard's chunks in Morton order: of a 4 x 4 grid, (1, 0) before (0, 1), and
    # with chunks left out the others move up. Boxes cut the shards' chunks at their edges.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    with pipeline(ZARRS):
        array = zarr.create_array(
            store,
            shape=(19, 22),
            chunks=(2, 3),
            shards=(8, 12),
            compressors=None,
            dtype="i4",
            fill_value=-7,
            config={"write_empty_chunks": False},
        )
        expected = np.arange(19 * 22, dtype="i4").reshape(19, 22)
        array[...] = expected
        for row, col in [(0, 0), (1, 2), (2, 1), (3, 3), (5, 1), (4, 6)]:
            hole = (slice(2 * row, 2 * row + 2), slice(3 * col, 3 * col + 3))
            expected[hole] = -7
            array[hole] = -7
    ours = opened(store, OURS)
    with counting_box_copies() as copies:
        for box in [
            (slice(None), slice(None)),
            (slice(1, 18), slice(2, 21)),
            (slice(3, 6), slice(4, 5)),
            (slice(7, 9), slice(11, 13)),
        ]:
            np.testing.assert_array_equal(ours[box], expected[box])
    assert copies[0] > 0


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_shard_that_holds_no_chunk_reads_as_its_fill_value(tmp_path: Path, kind: str) -> None:
    # zarr deletes such a shard; another writer may leave its index alone, every entry empty.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    codec = ShardingCodec(
        chunk_shape=(2, 2),
        codecs=[zarr.codecs.BytesCodec()],
        index_codecs=[zarr.codecs.BytesCodec()],
    )
    with pipeline(ZARRS):
        array = zarr.create_array(
            store,
            shape=(8, 4),
            chunks=(4, 4),
            serializer=codec,
            compressors=None,
            dtype="i2",
            fill_value=9,
        )
        array[...] = np.arange(32, dtype="i2").reshape(8, 4)
    empty = np.full(2 * 2 * 2, 2**64 - 1, dtype="<u8").tobytes()
    sync(store.set("c/1/0", cpu.Buffer.from_bytes(empty)))
    expected = np.arange(32, dtype="i2").reshape(8, 4)
    expected[4:] = 9
    ours = opened(store, OURS)
    np.testing.assert_array_equal(ours[...], expected)
    np.testing.assert_array_equal(ours[3:7, 1:3], expected[3:7, 1:3])


# ---------------------------------------------------------------- inner chunks that are zstd frames


def _zstd_sharded(
    store: Any, checksum: bool = True, zstd: bool = True
) -> tuple[zarr.Array[Any], np.ndarray]:
    """Two shards of 4 x 4 inner chunks, each a zstd frame over a native ``bytes`` codec (or
    the bytes alone, if not ``zstd``); the index with no checksum if not ``checksum`` (for a
    test to write it again)."""
    codec = ShardingCodec(
        chunk_shape=(2, 3),
        codecs=[zarr.codecs.BytesCodec(), *([zarr.codecs.ZstdCodec(level=1)] if zstd else [])],
        index_codecs=[
            zarr.codecs.BytesCodec(),
            *([zarr.codecs.Crc32cCodec()] if checksum else []),
        ],
    )
    values = np.arange(16 * 12, dtype="f4").reshape(16, 12)
    with pipeline(ZARRS):
        array = zarr.create_array(
            store,
            shape=values.shape,
            chunks=(8, 12),
            serializer=codec,
            compressors=None,
            dtype="f4",
        )
        array[...] = values
    return array, values


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_damaged_zstd_inner_chunk_raises_the_codecs_own_error(tmp_path: Path, kind: str) -> None:
    # A frame libzstd refuses goes to the codec's own decode: the error is zarr's, not one of
    # ours, and no values come back for it.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    _zstd_sharded(store)
    shard = sync(store.get("c/1/0", prototype=cpu.buffer_prototype))
    assert shard is not None
    data = bytearray(shard.to_bytes())
    magic = b"\x28\xb5\x2f\xfd"
    third = [m.start() for m in re.finditer(re.escape(magic), bytes(data))][2]
    data[third : third + 4] = b"\0\0\0\0"  # no longer a zstd frame
    sync(store.set("c/1/0", cpu.Buffer.from_bytes(bytes(data))))
    with pytest.raises(RuntimeError, match=r"[Zz]std") as theirs:
        opened(store, ZARRS)[...]
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        opened(store, OURS)[...]
    np.testing.assert_array_equal(opened(store, OURS)[:8], np.arange(96, dtype="f4").reshape(8, 12))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_zstd_inner_chunks_without_libzstd_at_hand_decode_one_by_one(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where libzstd is not to be had through ctypes (`_zstd.decompress_into` is None: Windows,
    # the portable mode), each chunk goes through the codec's own decode, into the result.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    _, values = _zstd_sharded(store)
    with counting_box_copies() as copies:
        np.testing.assert_array_equal(opened(store, OURS)[...], values)
    assert copies[0] == 2
    monkeypatch.setattr(_sharding, "decompress_into", None)
    with counting_box_copies() as copies:
        np.testing.assert_array_equal(opened(store, OURS)[...], values)
        np.testing.assert_array_equal(opened(store, OURS)[3:13, 1:11], values[3:13, 1:11])
    assert copies[0] == 0


def _relaid(store: Any, key: str, order: list[int], gap: int = 0) -> None:
    """The shard at ``key`` (4 x 4 inner chunks, its index at the end, no checksum) written
    again with its chunks in ``order`` (flat indices of its grid), ``gap`` junk bytes before
    each."""
    shard = sync(store.get(key, prototype=cpu.buffer_prototype))
    assert shard is not None
    data = shard.to_bytes()
    index = np.frombuffer(data[-16 * 16 :], dtype="<u8").reshape(16, 2)
    laid = bytearray()
    relaid = np.array(index)
    for flat in order:
        start, length = index[flat]
        laid += b"\xaa" * gap
        relaid[flat] = (len(laid), length)
        laid += data[int(start) : int(start + length)]
    laid += relaid.astype("<u8").tobytes()
    sync(store.set(key, cpu.Buffer.from_bytes(bytes(laid))))


def counting_decompressions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often libzstd is called for a read from now on: frame by frame, or a shard's
    frames at once."""
    original = _zstd.decompress_into
    assert original is not None
    calls = [0]

    def counted(target: int, size: int, source: int, length: int) -> bool:
        calls[0] += 1
        return original(target, size, source, length)

    monkeypatch.setattr(_sharding, "decompress_into", counted)
    return calls


MORTON_4X4 = [0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15]


@pytest.mark.parametrize("kind", ["local", "memory"])
@pytest.mark.parametrize(
    ("order", "gap", "calls"),
    [
        pytest.param(MORTON_4X4, 0, 1, id="morton"),  # as zarr writes them
        pytest.param(list(range(16)), 0, 1, id="grid-order"),
        pytest.param(list(reversed(range(16))), 0, 16, id="reversed"),
        pytest.param(MORTON_4X4, 3, 16, id="morton-with-gaps"),
        pytest.param(list(range(16)), 1, 16, id="grid-order-with-gaps"),
    ],
)
def test_a_whole_shard_of_frames_back_to_back_is_one_call(
    tmp_path: Path,
    kind: str,
    order: list[int],
    gap: int,
    calls: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Frames that lie back to back, in the grid's order or in zarr's own (Morton), are
    # decompressed by one call a shard; the Morton order's rows copied into the box as a view
    # (a box of whole chunks). In any other order, or apart, one call a frame.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    _, values = _zstd_sharded(store, checksum=False)
    for key in ["c/0/0", "c/1/0"]:
        _relaid(store, key, order, gap)
    np.testing.assert_array_equal(opened(store, ZARRS)[...], values)
    made = counting_decompressions(monkeypatch)
    np.testing.assert_array_equal(opened(store, OURS)[...], values)
    assert made[0] == 2 * calls
    # A box that cuts chunks: the grid's order is still copied from, Morton's is not.
    made[0] = 0
    np.testing.assert_array_equal(opened(store, OURS)[1:15, 2:11], values[1:15, 2:11])
    assert made[0] == 2 * (1 if order == list(range(16)) and not gap else 16)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_frame_of_another_size_among_back_to_back_frames_fails_as_in_zarr(
    tmp_path: Path, kind: str
) -> None:
    # Two frames among frames back to back that decompress to a chunk and a half and half a
    # chunk: decompressed at once, the shard's frames would still fill its rows exactly (the
    # chunks after them shifted). The frames' headers tell, and the read fails as zarr's does.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    _, values = _zstd_sharded(store, checksum=False)
    shard = sync(store.get("c/0/0", prototype=cpu.buffer_prototype))
    assert shard is not None
    data = shard.to_bytes()
    index = np.frombuffer(data[-16 * 16 :], dtype="<u8").reshape(16, 2)
    frames = [data[int(start) : int(start + length)] for start, length in index]
    frames[4] = numcodecs.Zstd(level=1).encode(np.zeros(9, dtype="f4"))
    frames[5] = numcodecs.Zstd(level=1).encode(np.zeros(3, dtype="f4"))
    laid = b"".join(frames)
    starts = np.cumsum([0] + [len(frame) for frame in frames[:-1]])
    relaid = np.stack([starts, [len(frame) for frame in frames]], axis=1).astype("<u8")
    sync(store.set("c/0/0", cpu.Buffer.from_bytes(laid + relaid.tobytes())))
    with pytest.raises(Exception) as theirs:  # noqa: PT011 (whatever zarr raises)
        opened(store, ZARRS)[...]
    with pytest.raises(type(theirs.value)):
        opened(store, OURS)[...]
    np.testing.assert_array_equal(opened(store, OURS)[8:], values[8:])


@pytest.mark.parametrize("count", [0, 1, 100, 255, 256, 1000, 65_791, 65_792, 300_000])
def test_the_size_a_zstd_frame_declares_is_read_as_libzstd_reads_it(count: int) -> None:
    # numcodecs' frames declare their size in a field of 1, 2 (the value less 256), 4 or 8
    # bytes, after a window byte or not; frames of one size, alike byte for byte, are taken
    # at once, any frame unlike the first is not.
    frame = numcodecs.Zstd(level=1).encode(np.arange(count, dtype="u1"))
    data = np.frombuffer(frame * 3, dtype=np.uint8)
    starts = np.arange(3, dtype=np.int64) * len(frame)
    lengths = np.full(3, len(frame), dtype=np.int64)
    assert _zstd.declared_size(data, starts, lengths) == count
    other = numcodecs.Zstd(level=1).encode(np.arange(count + 300, dtype="u2"))
    mixed = np.frombuffer(frame + other, dtype=np.uint8)
    assert _zstd.declared_size(mixed, starts[:2], np.array([len(frame), len(other)])) is None


@pytest.mark.parametrize(
    "header",
    [
        b"\x28\xb5\x2f\xfd\x00\x58",  # no size declared (a streamed frame)
        b"\x28\xb5\x2f\xfd\x21\x40",  # a dictionary
        b"\x28\xb5\x2f\xfd\x28\x40",  # the reserved bit
        b"\x28\xb5\x2f\xfe\x20\x40",  # no zstd magic (a skippable frame's, say)
        b"\x28\xb5\x2f\xfd\x60",  # cut short
    ],
    ids=["no-size", "dictionary", "reserved-bit", "no-magic", "cut-short"],
)
def test_a_frame_that_declares_no_plain_size_is_not_taken_at_once(header: bytes) -> None:
    data = np.frombuffer(header + b"\0" * 8, dtype=np.uint8)
    starts, lengths = np.zeros(1, dtype=np.int64), np.array([len(header)], dtype=np.int64)
    assert _zstd.declared_size(data, starts, lengths) is None


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_entries_that_cut_frames_where_their_header_recurs_fail_as_in_zarr(
    tmp_path: Path, kind: str
) -> None:
    # Two frames back to back, the index's entries cut at a copy of the first frame's header
    # inside the first (its chunk incompressible, so its bytes are there as they are): each
    # entry begins with a header alike, the entries lie back to back, and decompressed at once
    # the frames fill the rows. But no entry is a frame: zarr fails, and so must we (found by
    # a helper attacking the one call a shard).
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    n = 4096
    values = np.random.default_rng(0).integers(0, 256, 2 * n).astype("u1")
    header = numcodecs.Zstd(level=1).encode(values[:n])[:16]
    values[100:116] = np.frombuffer(header, dtype="u1")
    codec = ShardingCodec(
        chunk_shape=(n,),
        codecs=[zarr.codecs.BytesCodec(), zarr.codecs.ZstdCodec(level=1)],
        index_codecs=[zarr.codecs.BytesCodec()],
    )
    with pipeline(ZARRS):
        array = zarr.create_array(
            store, shape=(2 * n,), chunks=(2 * n,), serializer=codec, compressors=None, dtype="u1"
        )
        array[...] = values
    np.testing.assert_array_equal(opened(store, OURS)[...], values)
    shard = sync(store.get("c/0", prototype=cpu.buffer_prototype))
    assert shard is not None
    data = shard.to_bytes()
    index = np.frombuffer(data[-32:], dtype="<u8").reshape(2, 2)
    cut = data.find(data[:8], 1)
    assert 0 < cut < int(index[0, 1])
    entries = np.array([(0, cut), (cut, int(index[1].sum()) - cut)], dtype="<u8")
    sync(store.set("c/0", cpu.Buffer.from_bytes(data[:-32] + entries.tobytes())))
    with pytest.raises(RuntimeError, match=r"[Zz]std") as theirs:
        opened(store, ZARRS)[...]
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        opened(store, OURS)[...]


@pytest.mark.parametrize("kind", ["local", "memory"])
@pytest.mark.parametrize(
    ("order", "copied_as"),
    [
        pytest.param(MORTON_4X4, "morton", id="morton"),  # as zarr writes them
        pytest.param(list(range(16)), "grid", id="grid-order"),
        pytest.param(list(reversed(range(16))), "gathered", id="reversed"),
    ],
)
def test_a_whole_raw_shard_is_copied_without_gathering_its_chunks_first(
    tmp_path: Path, kind: str, order: list[int], copied_as: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Raw inner chunks as they lie in the shard: in the grid's order they are the grid, in
    # zarr's (Morton) a view of it; in any other order they are gathered into the grid first.
    store: Any = zarr_anyio.LocalStore(tmp_path) if kind == "local" else zarr_anyio.MemoryStore()
    _, values = _zstd_sharded(store, checksum=False, zstd=False)
    for key in ["c/0/0", "c/1/0"]:
        _relaid(store, key, order)
    copies: list[str] = []
    decode_box = _sharding._Shard._decode_box

    def noted(shard: Any, target: np.ndarray) -> None:
        gathered = shard.slots is not None and shard.morton is None
        copies.append("morton" if shard.morton else "gathered" if gathered else "grid")
        decode_box(shard, target)

    monkeypatch.setattr(_sharding._Shard, "_decode_box", noted)
    np.testing.assert_array_equal(opened(store, OURS)[...], values)
    assert copies == [copied_as] * 2
    copies.clear()
    # A box that cuts chunks: the grid's order is still copied from, Morton's gathered.
    np.testing.assert_array_equal(opened(store, OURS)[1:15, 2:11], values[1:15, 2:11])
    assert copies == ["gathered" if copied_as == "morton" else copied_as] * 2
