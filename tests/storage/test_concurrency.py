"""Limits, cancellation and crash safety, with a test double standing in for the disk.

The doubles replace LocalStore's blocking calls (`read_file`, `_write_piece`) and count how many
are running at once in worker threads. Nothing here asserts a duration.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

import zarr_anyio.storage._local
import zarr_anyio.storage._localfs
from support.doubles import ConcurrencyProbe
from support.stores import fill_keys as _fill
from zarr_anyio import Limiter, LocalStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


@pytest.mark.parametrize("limit", [1, 4, 8])
async def test_bulk_read_holds_max_concurrency(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe], limit: int
) -> None:
    store = LocalStore(tmp_path, max_concurrency=limit)
    keys = await _fill(store, 120)
    double = reads(limit)
    results = await store.get_partial_values(PROTO, [(key, None) for key in keys])
    assert all(result is not None for result in results)
    assert double.calls == 120
    assert double.most == limit


async def test_single_calls_from_zarr_style_gather_hold_the_limit(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe]
) -> None:
    # zarr-python issues one `get` per chunk from its own concurrency; the limit applies there too.
    store = LocalStore(tmp_path, max_concurrency=3)
    keys = await _fill(store, 60)
    double = reads(3)
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(store.get, key, PROTO)
    assert double.calls == 60
    assert double.most == 3


@pytest.mark.parametrize("kind", ["zarr_anyio", "anyio"])
async def test_two_stores_share_one_limiter(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe], kind: str
) -> None:
    shared = Limiter(3) if kind == "zarr_anyio" else anyio.CapacityLimiter(3)
    first = LocalStore(tmp_path / "a", limiter=shared)
    second = LocalStore(tmp_path / "b", limiter=shared)
    if isinstance(shared, Limiter):
        assert first.limiter is second.limiter is shared
    keys = await _fill(first, 60)
    await _fill(second, 60)
    double = reads(3)
    async with anyio.create_task_group() as tg:
        for store in (first, second):
            tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in keys])
    assert double.calls == 120
    assert double.most == 3


async def test_limiter_statistics_show_the_store_at_work(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_concurrency=5)
    assert store.limiter.total_tokens == 5
    assert store.limiter.statistics().borrowed_tokens == 0


async def test_cancelling_a_bulk_read_stops_it_and_leaves_nothing_running(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe]
) -> None:
    store = LocalStore(tmp_path, max_concurrency=4)
    keys = await _fill(store, 400)
    double = reads(4)
    tasks_before = len(anyio.get_running_tasks())
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in keys])
            await anyio.to_thread.run_sync(double.wait_for_running, 4)
            scope.cancel()
            double.release.set()
    assert scope.cancelled_caught
    # Every call that started has returned: no worker thread is still reading for us...
    assert double.now == 0
    started = double.calls
    assert started < 400
    # ...no task of ours is left, and nothing starts later.
    assert len(anyio.get_running_tasks()) == tasks_before
    await anyio.sleep(0.05)
    assert double.calls == started


async def test_cancelled_fetch_many_leaves_no_task(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe]
) -> None:
    store = LocalStore(tmp_path, max_concurrency=4)
    keys = await _fill(store, 200)
    double = reads(4)
    tasks_before = len(anyio.get_running_tasks())
    with anyio.move_on_after(0.01):
        async with store.fetch_many(keys) as results:
            async for _ in results:
                await anyio.sleep_forever()
    double.release.set()
    assert double.now == 0
    assert len(anyio.get_running_tasks()) == tasks_before


class BlockingWrites:
    """Stands in for `os.write`: writes the first piece, then waits to be let go."""

    def __init__(self) -> None:
        self.first_piece_written = threading.Event()
        self.go_on = threading.Event()
        self.pieces = 0

    def __call__(self, fd: int, piece: memoryview) -> int:
        import os

        written = os.write(fd, piece)
        self.pieces += 1
        self.first_piece_written.set()
        assert self.go_on.wait(timeout=10)
        return written


async def test_a_write_cancelled_midway_leaves_the_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    await store.set("c/0", cpu.Buffer.from_bytes(b"old value"))
    writes = BlockingWrites()
    monkeypatch.setattr(zarr_anyio.storage._localfs, "_write_piece", writes)
    monkeypatch.setattr(zarr_anyio.storage._localfs, "WRITE_PIECE", 4)

    async def let_the_write_go_on() -> None:
        # Once the cancelled writer is blocked waiting for its thread, the cancellation has
        # reached it; only then may the thread take its next step.
        await anyio.wait_all_tasks_blocked()
        writes.go_on.set()

    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.set, "c/0", cpu.Buffer.from_bytes(b"a much longer new value"))
                await anyio.to_thread.run_sync(writes.first_piece_written.wait)
                scope.cancel()
                outer.start_soon(let_the_write_go_on)
    assert scope.cancelled_caught
    assert writes.pieces == 1  # the write stopped after the piece it was in
    monkeypatch.undo()
    value = await store.get("c/0", PROTO)
    assert value is not None
    assert value.to_bytes() == b"old value"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0"]  # no temporary left


async def test_a_write_that_fails_midway_leaves_the_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    await store.set("c/0", cpu.Buffer.from_bytes(b"old value"))
    pieces: list[int] = []

    def disk_full(fd: int, piece: memoryview) -> int:
        if pieces:
            raise OSError(28, "No space left on device")
        pieces.append(len(piece))
        import os

        return os.write(fd, piece)

    monkeypatch.setattr(zarr_anyio.storage._localfs, "_write_piece", disk_full)
    monkeypatch.setattr(zarr_anyio.storage._localfs, "WRITE_PIECE", 4)
    with pytest.raises(OSError, match="No space left"):
        await store.set("c/0", cpu.Buffer.from_bytes(b"a much longer new value"))
    with pytest.raises(OSError, match="No space left"):
        store.set_sync("c/0", cpu.Buffer.from_bytes(b"a much longer new value"))
    monkeypatch.undo()
    value = await store.get("c/0", PROTO)
    assert value is not None
    assert value.to_bytes() == b"old value"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0"]


def test_one_store_from_asyncio_trio_and_zarrs_loop_at_once(tmp_path: Path) -> None:
    from zarr.core.sync import sync

    store = LocalStore(tmp_path, max_concurrency=4)
    sync(store.set_many([(f"c/{i}", cpu.Buffer.from_bytes(bytes([i]))) for i in range(100)]))
    errors: list[BaseException] = []

    async def read_all() -> None:
        for _ in range(5):
            results = await store.get_partial_values(PROTO, [(f"c/{i}", None) for i in range(100)])
            assert [r.to_bytes() for r in results if r is not None] == [
                bytes([i]) for i in range(100)
            ]

    def in_thread(backend: str) -> None:
        try:
            anyio.run(read_all, backend=backend)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=in_thread, args=(b,)) for b in ("asyncio", "trio")]
    for thread in threads:
        thread.start()
    sync(read_all())
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
