"""Our codec pipeline against zarr's own, on the same arrays and selections.

Each property test builds an array with zarr's default pipeline, then reads (or writes) a random
selection through ours and through zarr's, and compares: the values, the chunks stored, which
chunks are missing. The async tests drive the pipeline directly, under asyncio and trio, for what
zarr's API cannot show: the store's bound, cancellation, errors.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import subprocess
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
import zarr.codecs
import zarr.storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.abc.codec import BytesBytesCodec
from zarr.abc.store import ByteRequest
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.storage import StorePath
from zarr.testing.strategies import basic_indices, orthogonal_indices

import zarr_anyio
from support.arrays import (
    CODECS,
    OURS,
    ZARRS,
    arrays_and_data,
    compare_reads,
    create_kind,
    opened,
    pipeline,
)
from zarr_anyio.arrays import AnyioCodecPipeline
from zarr_anyio.storage import _localfs
from zarr_anyio.storage._localfs import TEMP_FOLDER
from zarr_anyio.storage._oscalls import PORTABLE

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    return tmp_path


@SETTINGS
@given(data=st.data())
def test_reads_match_zarrs_pipeline(data: st.DataObject, tmp_root: Path) -> None:
    _, expected, store = data.draw(arrays_and_data(tmp_root))
    ours, theirs = opened(store, OURS), opened(store, ZARRS)
    np.testing.assert_array_equal(ours[...], expected)
    compare_reads(data, ours, theirs, expected)


def _stored(store: Any, *, metadata: bool = False) -> dict[str, bytes]:
    async def collect() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        async for key in store.list():
            if not metadata and key.endswith(("zarr.json", ".zarray", ".zattrs", ".zgroup")):
                continue
            value = await store.get(key, default_buffer_prototype())
            found[key] = value.to_bytes()
        return found

    return zarr.core.sync.sync(collect())


@SETTINGS
@given(data=st.data())
def test_writes_match_zarrs_pipeline(data: st.DataObject, tmp_root: Path) -> None:
    # Not gzip: its header holds the second of the write, so two writes a second apart differ.
    codecs = [kind for kind in CODECS if not kind.startswith("gzip")]
    array, _, store = data.draw(arrays_and_data(tmp_root, codecs))
    # The same array again, byte for byte, in memory: written through zarr's pipeline.
    twin_store = zarr.storage.MemoryStore()
    for key, stored in _stored(store, metadata=True).items():
        zarr.core.sync.sync(
            twin_store.set(key, default_buffer_prototype().buffer.from_bytes(stored))
        )
    ours = opened(store, OURS)
    theirs = opened(twin_store, ZARRS)
    for _ in range(2):
        kind = data.draw(st.sampled_from(["basic", "orthogonal", "scalar", "coordinate"]))
        if kind in ("basic", "scalar"):
            selection = data.draw(basic_indices(shape=array.shape, allow_ellipsis=False))
            target = np.empty(array.shape)[selection].shape
            value: Any = (
                data.draw(st.integers(0, 9))
                if kind == "scalar"
                else (np.arange(int(np.prod(target))).reshape(target) % 5).astype(array.dtype)
            )
            ours[selection] = value
            theirs[selection] = value
        elif kind == "orthogonal":
            zarr_sel, _ = data.draw(orthogonal_indices(shape=array.shape))
            ours.oindex[zarr_sel] = 3
            theirs.oindex[zarr_sel] = 3
        else:
            coords = tuple(np.array([n - 1, 0]) for n in array.shape)
            ours.vindex[coords] = 4
            theirs.vindex[coords] = 4
        np.testing.assert_array_equal(ours[...], theirs[...])
    assert _stored(store) == _stored(twin_store)


# ---------------------------------------------------------------- the async surface, both backends


class SlowDisk(zarr_anyio.LocalStore):
    """A LocalStore whose reads take a while and are counted while they run."""

    delay = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.done = 0
        self.into = 0

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay)
            yield
        finally:
            with self.lock:
                self.running -= 1
                self.done += 1

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> Any:
        with self._counted():
            return super()._read_blocking(key, byte_range)

    def _set_many_blocking(
        self, items: Iterable[tuple[str, memoryview | None]], check_cancelled: Any
    ) -> None:
        for item in items:
            check_cancelled()
            with self._counted():
                super()._set_many_blocking([item], check_cancelled)

    def _read_many_blocking(self, requests: Iterable[Any]) -> Generator[Any, None, None]:
        # The pipeline's batches (LocalStore's own reads, its root opened once): each read
        # counted while it runs, and those read straight into the result in ``into``.
        reads = super()._read_many_blocking(requests)
        try:
            while True:
                with self._counted():
                    got = next(reads, _END)
                if got is _END:
                    return
                self.into += isinstance(got, int)
                yield got
        finally:
            reads.close()


_END = object()


def _items(array: zarr.Array[Any], store: Any, start: int, stop: int) -> list[Any]:
    """What zarr gives a pipeline to read ``array[start:stop]`` of a 1-D array."""
    (chunk,) = array.chunks
    spec = ArraySpec(
        shape=(chunk,),
        dtype=array.metadata.data_type,  # type: ignore[union-attr]
        fill_value=array.fill_value,
        config=ArrayConfig.from_dict({}),
        prototype=default_buffer_prototype(),
    )
    items = []
    for index in range(start // chunk, -(-stop // chunk)):
        low, high = max(start, index * chunk), min(stop, (index + 1) * chunk)
        key = f"{array.path}/{array.metadata.encode_chunk_key((index,))}".lstrip("/")
        items.append(
            (
                StorePath(store, key),
                spec,
                (slice(low - index * chunk, high - index * chunk, 1),),
                (slice(low - start, high - start),),
                high - low == chunk,
            )
        )
    return items


async def _made(
    store: Any,
    length: int,
    chunk: int,
    dtype: str,
    values: Any,
    upto: int | None = None,
    **kwargs: Any,
) -> tuple[zarr.Array[Any], AnyioCodecPipeline]:
    """A 1-D array written up to ``upto``, and our pipeline for it (made by zarr's sync API, in
    a thread: it must not run on the test's event loop)."""

    def make() -> tuple[zarr.Array[Any], AnyioCodecPipeline]:
        array = zarr.create_array(store, shape=(length,), chunks=(chunk,), dtype=dtype, **kwargs)
        array[:upto] = values[:upto] if isinstance(values, np.ndarray) else values
        with pipeline(OURS):
            found = zarr.open_array(store, mode="r")._async_array.codec_pipeline
        assert isinstance(found, AnyioCodecPipeline)
        return array, found

    return await anyio.to_thread.run_sync(make)


def _out(length: int, dtype: Any) -> Any:
    return default_buffer_prototype().nd_buffer.create(
        shape=(length,), dtype=np.dtype(dtype), fill_value=99
    )


@pytest.mark.anyio
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_read_under_both_backends(tmp_path: Path, compressed: bool, kind: str) -> None:
    store: Any = (
        zarr_anyio.LocalStore(tmp_path / "a") if kind == "local" else zarr_anyio.MemoryStore()
    )
    values = np.arange(1000, dtype="i4")
    compressors = zarr.codecs.ZstdCodec(level=1) if compressed else None
    # The chunks after 700 are missing.
    array, ours = await _made(
        store, 1000, 7, "i4", values, 700, fill_value=5, compressors=compressors
    )
    out = _out(990, "i4")
    statuses = await ours.read(_items(array, store, 3, 993), out)
    expected = np.where(np.arange(1000) < 700, values, 5)[3:993]
    np.testing.assert_array_equal(out.as_numpy_array(), expected)
    missing = [s["status"] for s in statuses].count("missing")
    assert missing == len(range(700 // 7, -(-993 // 7)))


@pytest.mark.anyio
async def test_reads_hold_the_stores_limiter(tmp_path: Path) -> None:
    # Three tokens, two of them held by someone else: one left for the pipeline's hops.
    limiter = zarr_anyio.Limiter(3)
    store = SlowDisk(tmp_path / "a", limiter=limiter)
    array, ours = await _made(store, 4000, 10, "u1", 1, compressors=None)
    store.delay = 0.0005
    store.peak = 0
    out = _out(4000, "u1")
    limiter.acquire_nowait()
    limiter.acquire_nowait()
    try:
        await ours.read(_items(array, store, 0, 4000), out)
    finally:
        limiter.release()
        limiter.release()
    assert store.peak == 1  # one read at a time, however many hops the pipeline runs
    np.testing.assert_array_equal(out.as_numpy_array(), 1)
    assert limiter.statistics().borrowed_tokens == 0


@pytest.mark.anyio
async def test_a_cancelled_read_leaves_nothing_running(tmp_path: Path) -> None:
    store = SlowDisk(tmp_path / "a")
    array, ours = await _made(store, 20000, 10, "u1", 1, compressors=None)
    store.delay = 0.001
    before = store.done
    out = _out(20000, "u1")

    async def read_then_cancel() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ours.read, _items(array, store, 0, 20000), out)
            while store.done == before:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()

    await read_then_cancel()
    assert store.running == 0  # every hop waited for its thread
    done = store.done
    assert 0 < done - before < 2000
    await anyio.sleep(0.05)
    assert store.done == done  # and none goes on reading afterwards
    assert store.limiter.statistics().borrowed_tokens == 0


@pytest.mark.anyio
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_write_under_both_backends(tmp_path: Path, compressed: bool, kind: str) -> None:
    store: Any = (
        zarr_anyio.LocalStore(tmp_path / "a") if kind == "local" else zarr_anyio.MemoryStore()
    )
    compressors = zarr.codecs.ZstdCodec(level=1) if compressed else None
    values = np.arange(1000, dtype="i4")
    array, ours = await _made(
        store, 1000, 7, "i4", values, 500, fill_value=5, compressors=compressors
    )
    new = default_buffer_prototype().nd_buffer.from_numpy_array(-values[3:993])
    await ours.write(_items(array, store, 3, 993), new)
    expected = np.concatenate([values[:3], -values[3:993], np.full(7, 5)])
    expected[993:] = 5
    got = np.asarray(await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[:]))
    np.testing.assert_array_equal(got, expected)
    # The chunks wholly past 993 were never written: still missing.
    keys = await anyio.to_thread.run_sync(lambda: sorted(_stored(store)))
    assert len(keys) == -(-993 // 7)


@pytest.mark.anyio
async def test_a_cancelled_write_leaves_nothing_running(tmp_path: Path) -> None:
    store = SlowDisk(tmp_path / "a")
    array, ours = await _made(store, 20000, 10, "u1", 1, 10, compressors=None)
    store.delay = 0.001
    before = store.done
    new = default_buffer_prototype().nd_buffer.from_numpy_array(np.full(20000, 2, dtype="u1"))

    async def write_then_cancel() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ours.write, _items(array, store, 0, 20000), new)
            while store.done == before:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()

    await write_then_cancel()
    assert store.running == 0
    done = store.done
    assert 0 < done - before < 2000
    await anyio.sleep(0.05)
    assert store.done == done
    assert store.limiter.statistics().borrowed_tokens == 0
    # Each chunk holds its old value or its new one, never a torn one.
    got = np.asarray(await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[:]))
    assert set(np.unique(got)) <= {0, 1, 2}
    assert all(len(set(got[i : i + 10])) == 1 for i in range(0, 20000, 10))


class SlowMemory(zarr_anyio.MemoryStore):
    """A MemoryStore whose reads wait a little, counted while they run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running = self.peak = self.done = 0

    async def _backend_get(self, key: str, prototype: Any, byte_range: Any) -> Any:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(0.002)
            return await super()._backend_get(key, prototype, byte_range)
        finally:
            self.running -= 1
            self.done += 1


@pytest.mark.anyio
async def test_fetches_through_the_store_are_bounded_and_cancelled() -> None:
    store = SlowMemory(max_concurrency=4)
    array, ours = await _made(store, 3000, 10, "i2", 1)
    store.peak = 0
    out = _out(3000, "i2")
    await ours.read(_items(array, store, 0, 3000), out)
    np.testing.assert_array_equal(out.as_numpy_array(), 1)
    assert store.peak == 4  # as many fetches as the store's bound, no more
    before = store.done

    async def read_then_cancel() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ours.read, _items(array, store, 0, 3000), out)
            while store.done == before:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()

    await read_then_cancel()
    assert store.running == 0
    done = store.done
    await anyio.sleep(0.02)
    assert store.done == done < before + 300


@pytest.mark.anyio
async def test_a_failing_read_raises_its_own_error(tmp_path: Path) -> None:
    store = zarr_anyio.LocalStore(tmp_path / "a")
    array, ours = await _made(store, 100, 10, "i4", 1, compressors=None)
    # A chunk of the wrong length: zarr's bytes codec cannot shape it.
    (tmp_path / "a" / "c" / "3").write_bytes(b"xyz")
    with pytest.raises(ValueError) as theirs:  # noqa: PT011 (the message is compared below)
        await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[:])
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        await ours.read(_items(array, store, 0, 100), _out(100, "i4"))


def test_sync_api_through_zarr_anyio_and_zarrs_stores(tmp_path: Path) -> None:
    # zarr's own sync API on zarr's own LocalStore: our pipeline through the generic path.
    store = zarr.storage.LocalStore(tmp_path / "z")
    values = np.arange(64 * 64, dtype="f4").reshape(64, 64)
    with pipeline(OURS):
        array = zarr.create_array(store, shape=(64, 64), chunks=(16, 8), dtype="f4")
        array[:] = values
        np.testing.assert_array_equal(array[:], values)
        np.testing.assert_array_equal(array[5:50:3, 7], values[5:50:3, 7])
    assert len(os.listdir(tmp_path / "z" / "c")) == 4


@pytest.mark.parametrize("chunks", [(4, 16), (4, 8), (1, 16), (4, 64), (4, 128)])
@pytest.mark.parametrize("dtype", ["f4", "u1"])
def test_whole_raw_chunks_are_read_straight_into_the_result(
    tmp_path: Path, chunks: tuple[int, int], dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SlowDisk(tmp_path / "a")
    values = np.arange(40 * 128).reshape(40, 128).astype(dtype)
    with pipeline(ZARRS):
        zarr.create_array(store, shape=(40, 128), chunks=chunks, dtype=dtype, compressors=None)[
            :
        ] = values
    scattered = _count_calls(monkeypatch, _localfs, "read_scattered")
    ours = opened(store, OURS)
    # Contiguous in the result (whole rows of chunks) or not (its rows apart there): read
    # into it all the same, the rows of at least 256 bytes by the kernel (one preadv).
    np.testing.assert_array_equal(ours[:], values)
    across = 128 // chunks[1]
    assert store.into == 40 // chunks[0] * across
    rows = chunks[1] * np.dtype(dtype).itemsize
    assert (scattered.count > 0) == (
        not PORTABLE and chunks[0] > 1 and rows >= 256 and chunks[1] < 128
    )
    # A part of a chunk goes through a buffer.
    store.into = 0
    np.testing.assert_array_equal(ours[1:39], values[1:39])
    assert store.into == (38 if chunks[0] == 1 else 40 // chunks[0] - 2) * across


class _Calls:
    count = 0


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> _Calls:
    calls = _Calls()
    real = getattr(module, name)
    if real is None:  # not on this system (the portable mode): nothing is called
        return calls

    def counted(*args: Any) -> Any:
        done = real(*args)
        calls.count += done is not None  # None: it declined (runs too short)
        return done

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(
    ("dtype", "values", "kwargs"),
    [
        ("str", np.array(["a", "bc", "", "dé", "x" * 10, "y"], dtype=object), {}),
        ("bool", np.array([True, False, True, True, False, False]), {}),
        ("complex128", np.arange(6) * (1 + 2j), {}),
        ("datetime64[s]", np.arange(6).astype("datetime64[s]"), {}),
        ("f8", np.array([np.nan, 1, 2, np.nan, 4, 5]), {"fill_value": np.nan}),
        ("i4", np.arange(6, dtype="i4"), {"zarr_format": 2, "order": "F"}),
    ],
)
def test_dtypes_match_zarrs_pipeline(
    tmp_path: Path, dtype: str, values: np.ndarray, kwargs: dict[str, Any]
) -> None:
    for store in (zarr_anyio.LocalStore(tmp_path / "a"), zarr.storage.MemoryStore()):
        with pipeline(ZARRS):
            theirs = zarr.create_array(
                store, shape=(6,), chunks=(4,), dtype=dtype, overwrite=True, **kwargs
            )
            theirs[:5] = values[:5]
        ours = opened(store, OURS)
        np.testing.assert_array_equal(ours[:], theirs[:])
        ours[5:] = values[5:]
        ours[1:3] = values[3:5]
        expected = values.copy()
        expected[1:3] = values[3:5]
        np.testing.assert_array_equal(theirs[:], expected)


@pytest.mark.anyio
async def test_zarr_anyio_api_reads_through_our_pipeline(tmp_path: Path) -> None:
    import zarr_anyio.api as za

    store = SlowDisk(tmp_path / "a")
    arr = await za.create_array(store, shape=(100,), chunks=(10,), dtype="i4", compressors=None)
    await arr.setitem(slice(None), np.arange(100))
    np.testing.assert_array_equal(await arr.getitem(slice(None)), np.arange(100))
    assert store.into == 10  # each chunk read straight into the result
    assert type(arr.async_array.codec_pipeline) is AnyioCodecPipeline
    # A zarr array the user wraps keeps the pipeline it has.
    theirs = await anyio.to_thread.run_sync(
        lambda: zarr.open_array(zarr_anyio.LocalStore(tmp_path / "a"), mode="r")
    )
    assert zarr_anyio.AsyncArray(theirs).async_array is theirs._async_array
    assert type(theirs._async_array.codec_pipeline) is BatchedCodecPipeline


def _read_in_child(path: str, queue: Any) -> None:
    with pipeline(OURS):
        queue.put(np.asarray(zarr.open_array(zarr_anyio.LocalStore(path), mode="r")[:]).sum())


def test_reads_in_a_forked_child(tmp_path: Path) -> None:
    import multiprocessing

    values = np.arange(1000, dtype="i4")
    with pipeline(OURS):
        array = zarr.create_array(
            zarr_anyio.LocalStore(tmp_path), shape=(1000,), chunks=(10,), dtype="i4"
        )
        array[:] = values
        assert np.asarray(array[:]).sum() == values.sum()  # the parent's worker threads run now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(str(tmp_path), queue))
    child.start()
    try:
        # The parent's threads do not exist in the child: its reads must start threads of its own.
        assert queue.get(timeout=30) == values.sum()
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()


def test_zarr_finds_the_pipeline_by_its_entry_point_in_a_fresh_process(tmp_path: Path) -> None:
    # Selected by configuration alone, in a process that never imported zarr_anyio (a dask
    # worker, say): zarr looks it up among the installed packages' entry points.
    import sys

    script = (
        "import zarr, zarr.storage, sys\n"
        "a = zarr.create_array(zarr.storage.MemoryStore(), shape=(3,), dtype='i4')\n"
        "a[:] = 7\n"
        "assert a[:].tolist() == [7, 7, 7]\n"
        "assert type(a._async_array.codec_pipeline).__name__ == 'AnyioCodecPipeline'\n"
        "assert 'zarr_anyio' in sys.modules\n"
    )
    env = {**os.environ, "ZARR_CODEC_PIPELINE__PATH": OURS}
    env.pop("PYTHONPATH", None)  # the installed package, as a user's process has it
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# (Not gzip: its header holds the time of the write, so two writes a second apart differ.)
@pytest.mark.parametrize("kind", ["raw", "zstd", "transpose+zstd", "big-endian", "v2-zlib"])
@pytest.mark.parametrize("write_empty", [False, True])
def test_whole_chunks_are_written_from_the_callers_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, write_empty: bool
) -> None:
    # 256 KiB chunks, strided in the caller's 2-D array (copied into reused buffers), and
    # contiguous ones (a band of whole rows): the bytes stored are zarr's, and no chunk the
    # value covers whole goes through zarr's merge.
    merged: list[object] = []
    merge = AnyioCodecPipeline._merge_and_encode

    def counted(self: AnyioCodecPipeline, item: Any, *args: Any) -> Any:
        merged.append(item)
        return merge(self, item, *args)

    monkeypatch.setattr(AnyioCodecPipeline, "_merge_and_encode", counted)
    shape, chunks = (768, 1024), (256, 256)
    store = zarr_anyio.LocalStore(tmp_path / "a")
    twin = zarr.storage.MemoryStore()
    with pipeline(ZARRS):
        for target in (store, twin):
            create_kind(target, kind, shape, chunks, "f4", 0, write_empty)
    values = (np.arange(int(np.prod(shape)), dtype="f4").reshape(shape) % 1000) + 1
    values[:256, 256:512] = 0  # a chunk of the fill value: not stored unless write_empty
    values[:256, 512:768] = -0.0  # equal to the fill value, not its bytes
    values[256:512, :256] = np.nan
    values[511, 1023] = 0  # the last element of a chunk alone is the fill value
    values[:255, 768:] = 0  # a chunk of the fill value but for its last row
    for target, path in ((store, OURS), (twin, ZARRS)):
        # The array's config is not stored, and zarr 3.1 does not take it when opening.
        with zarr.config.set({"array.write_empty_chunks": write_empty}):
            array = opened(target, path)
        array[:, 256:] = values[:, 256:]  # strided chunks
        array[512:, :] = values[512:, :]  # contiguous chunks
        array[:512, :256] = values[:512, :256]
    assert merged == []
    assert _stored(store) == _stored(twin)
    fill_chunk = "0.1" if kind.startswith("v2") else "c/0/1"
    assert (fill_chunk in _stored(store)) == write_empty
    np.testing.assert_array_equal(opened(store, OURS)[...], values)


@pytest.mark.anyio
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("after", [0.0, 0.02, 0.08])
async def test_a_write_to_a_local_store_cancelled_at_any_moment(
    tmp_path: Path, compressed: bool, after: float
) -> None:
    # The batches of whole chunks (raw ones written from the caller's array in one hop,
    # compressed ones encoded, then written), cut at some moment: nothing goes on writing, no
    # temporary file stays, every chunk holds its old value or its new one.
    store = zarr_anyio.LocalStore(tmp_path / "a")
    compressors = zarr.codecs.ZstdCodec(level=1) if compressed else None
    array, ours = await _made(store, 400_000, 1000, "i4", 1, compressors=compressors)
    new = default_buffer_prototype().nd_buffer.from_numpy_array(np.full(400_000, 2, dtype="i4"))
    with anyio.move_on_after(after):
        await ours.write(_items(array, store, 0, 400_000), new)
    assert store.limiter.statistics().borrowed_tokens == 0
    assert not (tmp_path / "a" / TEMP_FOLDER).exists()
    files = sorted((tmp_path / "a" / "c").iterdir())
    await anyio.sleep(0.05)
    assert sorted((tmp_path / "a" / "c").iterdir()) == files  # none written afterwards
    got = np.asarray(await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[:]))
    assert all(len(set(got[i : i + 1000])) == 1 for i in range(0, 400_000, 1000))
    assert set(np.unique(got)) <= {1, 2}


class _ToThreadCodec(BytesBytesCodec):
    """A codec with coroutines only, each hopping to a thread as zarr 3.1's v2 compressors do;
    it notes the threads its work ran in."""

    is_fixed_size = True

    def __init__(self) -> None:
        self.threads: list[str] = []

    def _noted(self, data: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return data

    async def _decode_single(self, chunk_bytes: Any, chunk_spec: ArraySpec) -> Any:
        import asyncio

        return await asyncio.to_thread(self._noted, chunk_bytes)

    async def _encode_single(self, chunk_bytes: Any, chunk_spec: ArraySpec) -> Any:
        import asyncio

        return await asyncio.to_thread(self._noted, chunk_bytes)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        return input_byte_length


def test_a_codec_with_coroutines_only_runs_in_the_worker_thread_that_calls_it() -> None:
    # Its `asyncio.to_thread` runs right where the chain runs: a worker thread's private loop
    # that waited on a thread pool of its own was seen to wait for ever.
    from zarr_anyio.arrays._pipeline_codecs import SyncChain

    codec = _ToThreadCodec()
    chain = SyncChain((), zarr.codecs.BytesCodec(), (codec,))
    spec = ArraySpec(
        shape=(4,),
        dtype=zarr.create_array(
            zarr.storage.MemoryStore(), shape=(4,), dtype="i4"
        ).metadata.data_type,  # type: ignore[union-attr]
        fill_value=0,
        config=ArrayConfig.from_dict({}),
        prototype=default_buffer_prototype(),
    )
    values = default_buffer_prototype().nd_buffer.from_numpy_array(np.arange(4, dtype="i4"))
    decoded: list[Any] = []

    def in_a_worker() -> None:
        for _ in range(3):
            encoded = chain.encode(values, spec)
            assert encoded is not None
            decoded.append(chain.decode(encoded, spec).as_numpy_array())

    worker = threading.Thread(target=in_a_worker, name="worker")
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    assert [list(d) for d in decoded] == [[0, 1, 2, 3]] * 3
    assert codec.threads == ["worker"] * 6


class _Events(zarr_anyio.LocalStore):
    """A LocalStore that notes, per thread, each value its batches read as bytes (not straight
    into the result): ``events[thread]`` is a list of "read" and "decoded"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: dict[int, list[str]] = {}

    def note(self, event: str) -> None:
        self.events.setdefault(threading.get_ident(), []).append(event)

    def _read_many_blocking(self, requests: Iterable[Any]) -> Generator[Any, None, None]:
        self.note("batch")
        for got in super()._read_many_blocking(requests):
            if not isinstance(got, int):
                self.note("read")
            yield got


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_a_batch_of_chunks_read_as_bytes_holds_no_more_than_a_batch_of_them(
    tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches are `DIRECT_BATCH_BYTES` long (8 of these 64 chunks, so that four hops share
    # them), as raw chunks are read straight into the result; chunks read as bytes (compressed
    # ones, parts of raw ones) are decoded as they come once more than `BATCH_BYTES` of them
    # are held.
    from zarr_anyio.arrays import _pipeline

    monkeypatch.setattr(_pipeline, "BATCH_BYTES", 256 << 10)
    store = _Events(tmp_path / "a")
    # Random values: zstd keeps them about as large as they are.
    values = np.random.default_rng(7).random((1024, 2048), dtype="f4")
    with pipeline(ZARRS):
        zarr.create_array(
            store,
            shape=(1024, 2048),
            chunks=(64, 512),
            dtype="f4",
            compressors=None if codec == "raw" else zarr.codecs.ZstdCodec(level=1),
        )[:] = values
    real = _pipeline._Read.decode_and_scatter

    def decode(reader: Any, index: int, data: Any) -> None:
        store.note("decoded")
        real(reader, index, data)

    monkeypatch.setattr(_pipeline._Read, "decode_and_scatter", decode)
    selection = (slice(None, None, 2), slice(1, None)) if codec == "raw" else (slice(None),)
    np.testing.assert_array_equal(opened(store, OURS)[selection], values[selection])
    # 64 chunks of 128 KiB: at most three read (384 KiB) before those are decoded.
    batches = 0
    for events in store.events.values():
        run = longest = 0
        for event in events:
            batches += event == "batch"
            run = run + 1 if event == "read" else 0
            longest = max(longest, run)
        assert 0 < longest <= 3
    assert batches == 8


class _WriteHops(zarr_anyio.LocalStore):
    """A LocalStore that counts the chunks of each batch of writes (a hop of the pipeline's)."""

    hops: list[int]

    def _set_many_blocking(
        self, items: Iterable[tuple[str, memoryview | None]], check_cancelled: Any
    ) -> None:
        taken = list(items)
        self.hops.append(len(taken))
        super()._set_many_blocking(taken, check_cancelled)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_whole_chunks_are_written_in_hops_of_a_direct_reads_size(
    tmp_path: Path, codec: str
) -> None:
    # Whole chunks are each encoded and written before the next in their hop, which holds one
    # at a time: up to `DIRECT_BATCH_BYTES` of them a hop. A write with chunks to merge holds
    # its batch's encoded chunks until they are written: up to `BATCH_BYTES` a hop.
    from zarr_anyio.arrays._pipeline import BATCH_BYTES, DIRECT_BATCH_BYTES, MAX_BATCH

    store = _WriteHops(tmp_path / "a")
    store.hops = []
    values = np.arange(4096 * 4096, dtype="f4").reshape(4096, 4096)  # 1,024 chunks of 64 KiB
    with pipeline(OURS):
        arr = zarr.create_array(
            store,
            shape=values.shape,
            chunks=(128, 128),
            dtype="f4",
            compressors=None if codec == "raw" else zarr.codecs.ZstdCodec(),
        )
        arr[:] = values
        whole = list(store.hops)
        store.hops.clear()
        arr[1:-1] = values[1:-1] + 1  # 32 chunks at each end merged, the rest whole
        partly = list(store.hops)
    chunk = 128 * 128 * 4
    assert sum(whole) == sum(partly) == 1024
    # A whole write's chunks spread over at least four hops, so that two threads share them.
    assert DIRECT_BATCH_BYTES // chunk >= 1024 // 4 == MAX_BATCH
    assert max(whole) == MAX_BATCH
    assert max(partly) == BATCH_BYTES // chunk
    expected = values + 1
    expected[[0, -1]] = values[[0, -1]]
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], expected)


@pytest.mark.parametrize("compressor", ["zstd", "blosc"])
@pytest.mark.parametrize(
    "selection",
    [(slice(None),), (slice(3, 29, 2), 5), (7, slice(1, 18)), (slice(2, 30), slice(4, 17))],
    ids=["whole", "strided-dropped", "dropped", "region"],
)
def test_zstd_and_blosc_chunks_decoded_by_numcodecs_into_a_reused_buffer(
    tmp_path: Path, compressor: str, selection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarr_anyio.arrays import _pipeline

    decoded = _count_calls(monkeypatch, _pipeline._Read, "_decode_plain")
    store = zarr_anyio.LocalStore(tmp_path / "a")
    codec: Any = (
        zarr.codecs.ZstdCodec(level=1)
        if compressor == "zstd"
        else zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    )
    values = np.arange(30 * 20, dtype="f8").reshape(30, 20) * 1.5
    with pipeline(ZARRS):
        zarr.create_array(
            store, shape=(30, 20), chunks=(7, 6), dtype="f8", compressors=codec, fill_value=-1
        )[:21] = values[:21]  # the chunks of rows 21 on are missing
    expected = values.copy()
    expected[21:] = -1
    np.testing.assert_array_equal(opened(store, OURS)[selection], expected[selection])
    assert decoded.count > 0


def test_a_write_of_chunks_in_folders_of_their_own_does_not_run_out_of_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An array chunked by rows puts each chunk in a folder of its own (c/<row>/0). Batches of
    # 256 chunks, as many at once as there are cores: each batch held its folders open to its
    # end, and 8 cores' batches needed more than the 1024 descriptors a process gets by
    # default. Here, 8 batches at once (as on 8 cores) with 256 descriptors to spare.
    monkeypatch.setattr("zarr_anyio.arrays._pipeline.decode_threads", lambda: 8)
    store = zarr_anyio.LocalStore(tmp_path / "a")
    values = np.arange(20_000, dtype="u2").reshape(20_000, 1)
    with pipeline(OURS):
        array = zarr.create_array(store, shape=(20_000, 1), chunks=(1, 1), dtype="u2")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 256, hard))
    try:
        array[:] = values
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    np.testing.assert_array_equal(opened(store, ZARRS)[:], values)


@pytest.mark.anyio
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("how", ["api", "zarr", "partial"])
async def test_a_write_that_fills_the_disk_raises_enospc_and_keeps_each_chunk_whole(
    small_disk: Path, compressed: bool, how: str
) -> None:
    # 40 chunks of 64 KiB that do not compress, on a disk of 2 MiB holding 20 old ones: the
    # write fails part way with the disk's own error, every chunk holds its old value or its
    # new one (or none yet), and nothing of ours is left.
    import zarr_anyio.api as za

    store = zarr_anyio.LocalStore(small_disk / "root")
    compressors = zarr.codecs.ZstdCodec(level=1) if compressed else None
    array = await za.create_array(
        store, shape=(40, 16384), chunks=(1, 16384), dtype="u4", compressors=compressors
    )
    old = np.arange(40 * 16384, dtype="u4").reshape(40, 16384)
    await array.setitem(slice(0, 20), old[:20])
    new = np.random.default_rng(0).integers(0, 2**32, size=(40, 16384), dtype="u4")
    with pytest.raises(OSError, match="No space left") as raised:
        if how == "api":
            await array.setitem(slice(None), new)
        elif how == "partial":  # every chunk merged with its old value
            await array.setitem((slice(None), slice(5, 16380)), new[:, 5:16380])
        else:
            await anyio.to_thread.run_sync(lambda: opened(store, OURS).__setitem__(..., new))
    assert type(raised.value) is OSError
    assert raised.value.errno == errno.ENOSPC
    got = np.asarray(await anyio.to_thread.run_sync(lambda: opened(store, ZARRS)[:]))
    merged = old.copy()
    merged[:20, 5:16380] = new[:20, 5:16380]
    partly_new = np.zeros_like(new)
    partly_new[:, 5:16380] = new[:, 5:16380]
    for row in range(40):
        before = old[row] if row < 20 else np.zeros(16384, "u4")
        after = (merged if row < 20 else partly_new)[row] if how == "partial" else new[row]
        assert (got[row] == before).all() or (got[row] == after).all(), row
    left = [name for _, folders, files in os.walk(small_disk) for name in folders + files]
    assert not [name for name in left if "\\" in name]
