"""Where zarr's coroutines run, how many chunk requests they make at once, what cancelling them
leaves behind, and iter_blocks' bounds: counted at the store, under asyncio, trio and uvloop.
Nothing here asserts a duration."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
from zarr.core.buffer import Buffer, BufferPrototype

import zarr_anyio
import zarr_anyio.api as za
import zarr_anyio.storage._local
from support.arrays import BACKENDS, UVLOOP_CLASS, CountingStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def borrowed_tokens(store: zarr_anyio.AnyioStore) -> int:
    """Tokens still out (one limiter serves every loop, zarr's and ours)."""
    return int(store.limiter.statistics().borrowed_tokens)


async def filled(store: CountingStore, chunks: int, **kwargs: Any) -> zarr_anyio.AsyncArray:
    arr = await za.create_array(
        store, shape=(chunks * 4,), chunks=(4,), dtype="i4", compressors=None, **kwargs
    )
    await arr.setitem(slice(None), np.arange(chunks * 4))
    store.started = store.most = 0
    store.threads.clear()
    return arr


async def test_asyncio_runs_zarr_on_the_callers_loop_and_trio_on_the_bridge(
    anyio_backend_name: str, anyio_backend_options: dict[str, Any]
) -> None:
    if anyio_backend_options.get("use_uvloop"):
        assert isinstance(asyncio.get_running_loop(), UVLOOP_CLASS)  # the third loop runs
    store = CountingStore()
    arr = await filled(store, 8)
    np.testing.assert_array_equal(await arr.getitem(...), np.arange(32))
    if anyio_backend_name == "trio":
        assert store.threads == {"zarr_anyio-bridge"}
    else:
        # No hop: the chunk reads ran in this very thread, on this loop.
        assert store.threads == {threading.current_thread().name}


async def test_waiting_calls_hold_no_thread() -> None:
    store = CountingStore(max_concurrency=64)
    arr = await filled(store, 2)
    await arr.getitem(...)  # the bridge loop and its thread exist from here on
    store.delay = 0.2
    threads_before = threading.active_count()
    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(arr.getitem, Ellipsis)
        while store.now < 40:
            await anyio.sleep(0.001)
        # 40 calls waiting on their reads, under trio as under asyncio: not a thread more
        # (fewer is no failure: a thread of an earlier test may have ended meanwhile).
        assert threading.active_count() <= threads_before


@pytest.mark.parametrize(("limit", "zarr_cap", "expected"), [(64, 10, 64), (16, 64, 16)])
async def test_the_stores_bound_is_the_one_that_holds(
    limit: int, zarr_cap: int, expected: int
) -> None:
    # zarr caps one call at async.concurrency (default 10); the store's bound must win, both ways.
    before = zarr.config.get("async.concurrency")
    with zarr.config.set({"async.concurrency": zarr_cap}):
        store = CountingStore(max_concurrency=limit)
        arr = await filled(store, 2 * limit)
        store.delay = 0.05
        await arr.getitem(...)
        # Raised inside our calls only: zarr's setting is the user's, before, during and after.
        assert zarr.config.get("async.concurrency") == zarr_cap
    assert zarr.config.get("async.concurrency") == before
    assert store.started == 2 * limit
    assert store.most == expected


async def test_calls_on_stores_of_different_bounds_at_once_keep_each_bound() -> None:
    with zarr.config.set({"async.concurrency": 10}):
        wide, narrow = CountingStore(max_concurrency=48), CountingStore(max_concurrency=16)
        arrays = [await filled(wide, 96), await filled(narrow, 96)]
        wide.delay = narrow.delay = 0.05
        seen_during: list[int] = []

        async def watch() -> None:
            while wide.now + narrow.now == 0:
                await anyio.sleep(0.001)
            seen_during.append(zarr.config.get("async.concurrency"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for arr in arrays:
                tg.start_soon(arr.getitem, Ellipsis)
        assert zarr.config.get("async.concurrency") == 10
    assert seen_during == [10]  # zarr's setting, read beside the calls, is the user's
    assert (wide.most, narrow.most) == (48, 16)


async def test_group_members_leave_zarrs_setting_alone() -> None:
    store = CountingStore(max_concurrency=40)
    group = await za.open_group(store, mode="w")
    for name in "abc":
        await group.create_array(name, shape=(4,), dtype="i1")
    assert sorted([name async for name, _ in group.members()]) == ["a", "b", "c"]
    # Wrapping nodes and stepping their iterators left zarr's setting alone (zarr's own API in
    # this process keeps zarr's cap).
    assert zarr.config.get("async.concurrency") < 40


@pytest.mark.parametrize("shards", [None, (16,)], ids=["chunks", "shards"])
async def test_a_cancelled_read_leaves_nothing_in_flight_and_the_store_usable(
    shards: tuple[int, ...] | None,
) -> None:
    store = CountingStore(max_concurrency=8)
    # 64 chunks, or 64 shards of 4 inner chunks (our pipeline's sharded reads).
    arr = await filled(store, 64 * (4 if shards else 1), shards=shards)
    store.delay = 0.05
    in_flight_at_return: list[int] = []

    async def read() -> None:
        try:
            await arr.getitem(...)
        finally:
            in_flight_at_return.append(store.now)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            while store.now < 8:
                await anyio.sleep(0.001)
            scope.cancel()
    assert scope.cancelled_caught
    # When the cancelled call returned, each chunk read it had started had ended...
    assert in_flight_at_return == [0]
    started = store.started
    assert 8 <= started < 64
    # ...nothing of it starts later, every token is back, and the store still works.
    await anyio.sleep(0.1)
    assert store.started == started
    assert borrowed_tokens(store) == 0
    store.delay = 0
    np.testing.assert_array_equal(await arr.getitem(...), np.arange(arr.shape[0]))


async def test_a_read_timing_out_is_cancelled_the_same_way() -> None:
    store = CountingStore(max_concurrency=4)
    arr = await filled(store, 32)
    store.delay = 0.05
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.08):
            await arr.getitem(...)
    assert store.now == 0
    assert 0 < store.started < 32
    assert borrowed_tokens(store) == 0


async def test_a_cancelled_write_leaves_each_chunk_old_or_new() -> None:
    store = CountingStore(max_concurrency=4)
    arr = await filled(store, 40)
    store.delay = 0.02
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(arr.setitem, slice(None), np.full(160, -1))
            while store.started - store.now < 4:  # some chunks written, others on their way
                await anyio.sleep(0.001)
            scope.cancel()
    assert store.now == 0
    store.delay = 0
    data = (await arr.getitem(...)).reshape(40, 4)
    new = [bool((row == -1).all()) for row in data]
    assert any(new)
    assert not all(new)
    for row, chunk in zip(data, np.arange(160).reshape(40, 4), strict=True):
        assert (row == -1).all() or (row == chunk).all()


async def test_a_cancelled_read_from_a_local_store_waits_for_its_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = zarr_anyio.LocalStore(tmp_path / "a.zarr", max_concurrency=6)
    arr = await za.create_array(store, shape=(400,), chunks=(4,), dtype="i2", compressors=None)
    await arr.setitem(slice(None), np.arange(400))
    running = 0
    started = 0
    lock = threading.Lock()
    real_reads = zarr_anyio.storage._localfs.read_files

    def slow_reads(root: str, requests: Iterable[Any]) -> Iterator[Any]:
        nonlocal running, started
        for request in requests:
            with lock:
                running += 1
                started += 1
            try:
                threading.Event().wait(0.03)  # a slow disk
                yield from real_reads(root, [request])
            finally:
                with lock:
                    running -= 1

    monkeypatch.setattr(zarr_anyio.storage._local, "read_files", slow_reads)
    # On a slow disk nothing is read on the event loop (those reads are for cached bytes).
    monkeypatch.setattr(zarr_anyio.storage._local.LocalStore, "_reads_on_loop", False)
    # Cancel once reads are under way, however slowly a loaded machine gets them started.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(arr.getitem, ...)
            while started < 6:
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    assert running == 0
    assert 6 <= started < 100
    assert borrowed_tokens(store) == 0


async def test_errors_come_back_as_themselves_with_nothing_left_reading() -> None:
    store = CountingStore(fail_on={"c/5"}, max_concurrency=8)
    arr = await filled(store, 8)
    store.delay = 0.05
    with pytest.raises(OSError, match="injected failure reading c/5"):
        await arr.getitem(...)
    # zarr's gather gave up on the other reads without stopping them; the call did not.
    assert store.now == 0
    assert borrowed_tokens(store) == 0
    with pytest.raises(IndexError):
        await arr.getitem(100)


# ------------------------------------------------------------------------ iter_blocks


async def test_iter_blocks_gives_each_block_of_a_region_once() -> None:
    store = zarr_anyio.MemoryStore()
    arr = await za.create_array(store, shape=(23, 17), chunks=(5, 4), dtype="f8")
    data = np.random.default_rng(1).random((23, 17))
    await arr.setitem(..., data)
    region = (slice(3, 21), slice(None, -2))
    seen: dict[tuple[int, ...], np.ndarray] = {}
    async with arr.iter_blocks(region, max_concurrency=3) as blocks:
        async for index, block in blocks:
            assert index not in seen
            seen[index] = block
    assert sorted(seen) == [(i, j) for i in range(5) for j in range(4)]
    for (i, j), block in seen.items():
        rows = slice(max(3, 5 * i), min(21, 5 * i + 5))
        cols = slice(4 * j, min(15, 4 * j + 4))
        np.testing.assert_array_equal(block, data[rows, cols])
    total = sum(float(block.sum()) for block in seen.values())
    assert total == pytest.approx(float(data[region].sum()))


async def test_iter_blocks_of_a_sharded_array_are_shards() -> None:
    arr = await za.create_array(
        zarr_anyio.MemoryStore(), shape=(16,), chunks=(2,), shards=(8,), dtype="u1"
    )
    await arr.setitem(..., np.arange(16))
    async with arr.iter_blocks() as blocks:
        found = {block.block_index: block.data.tolist() async for block in blocks}
    assert found == {(0,): list(range(8)), (1,): list(range(8, 16))}


async def test_iter_blocks_bounds_fetches_and_blocks_held() -> None:
    store = CountingStore(max_concurrency=64)
    arr = await filled(store, 60)
    store.delay = 0.002
    limit = 4
    received = 0
    async with arr.iter_blocks(max_concurrency=limit) as blocks:
        async for _ in blocks:
            received += 1
            await anyio.sleep(0.01)  # a slow consumer: the fetches run ahead as far as allowed
            # Blocks fetched so far: the ones let go (all but this one), plus at most `limit`
            # being fetched, waiting or held, this one included.
            assert store.started <= received - 1 + limit
    assert received == 60
    assert store.started == 60
    assert store.most <= limit


async def test_leaving_iter_blocks_early_cancels_what_is_in_flight() -> None:
    store = CountingStore(max_concurrency=8)
    arr = await filled(store, 100)
    store.delay = 0.05
    async with arr.iter_blocks() as blocks:
        async for _ in blocks:
            break
    assert store.now == 0
    started = store.started
    assert started < 100
    await anyio.sleep(0.1)
    assert store.started == started
    assert borrowed_tokens(store) == 0


async def test_iter_blocks_raises_a_failed_fetch_as_itself() -> None:
    store = CountingStore(fail_on={"c/7"})
    arr = await filled(store, 20)
    with pytest.raises(OSError, match="c/7"):
        async with arr.iter_blocks(max_concurrency=2) as blocks:
            async for _ in blocks:
                pass
    assert store.now == 0


@pytest.mark.parametrize("selection", [(slice(0, 10, 2),), (3,), ([1, 2],), (slice(0, 10), 1)])
async def test_iter_blocks_refuses_what_is_not_a_region(selection: Any) -> None:
    store = CountingStore()
    arr = await filled(store, 4)
    with pytest.raises(IndexError):
        async with arr.iter_blocks(selection) as blocks:
            async for _ in blocks:
                pass
    assert store.started == 0


# ------------------------------------------------------------------------ zarr >= 3.4's sync path

PIPELINES = ["zarr.core.codec_pipeline.BatchedCodecPipeline"]
if hasattr(zarr.core.codec_pipeline, "FusedCodecPipeline"):
    # zarr >= 3.4: reads and writes through the store's blocking calls, in threads of its own.
    PIPELINES.append("zarr.core.codec_pipeline.FusedCodecPipeline")


SYNC_CALLS: list[str] = []


class SyncCountingLocalStore(zarr_anyio.LocalStore):
    """Counts calls of zarr 3.4's blocking store surface (copies too), and their threads."""

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: Any = None,
    ) -> Buffer | None:
        SYNC_CALLS.append(threading.current_thread().name)
        return super().get_sync(key, prototype=prototype, byte_range=byte_range)

    def set_sync(self, key: str, value: Buffer) -> None:
        SYNC_CALLS.append(threading.current_thread().name)
        super().set_sync(key, value)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda path: path.rsplit(".", 1)[-1])
async def test_zarrs_blocking_fast_path_is_not_taken_under_the_api(
    tmp_path: Path, pipeline: str
) -> None:
    # Taken, it would read in zarr's own threads: outside the store's limit and deaf to
    # cancellation. The async path keeps every read under the store's limit, off the trio thread.
    with zarr.config.set({"codec_pipeline.path": pipeline}):
        store = SyncCountingLocalStore(tmp_path / "a.zarr")
        SYNC_CALLS.clear()
        arr = await za.create_array(store, shape=(64,), chunks=(4,), dtype="i4")
        await arr.setitem(slice(None), np.arange(64))
        np.testing.assert_array_equal(await arr.getitem(...), np.arange(64))
        async with arr.iter_blocks() as blocks:
            async for _ in blocks:
                pass
        assert SYNC_CALLS == []

        # zarr's own sync API still takes it where zarr offers it.
        def sync_read() -> Any:
            return zarr.open_array(store=store, mode="r")[:]

        np.testing.assert_array_equal(await anyio.to_thread.run_sync(sync_read), np.arange(64))
    if pipeline.endswith("FusedCodecPipeline"):
        assert SYNC_CALLS
        assert threading.main_thread().name not in SYNC_CALLS
