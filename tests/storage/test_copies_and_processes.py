"""Stores beyond one object in one process: read-only copies of a zip writer, copies in other
processes (zip, memory, the limiter), and zip overwrites that do not grow the file without
bound."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.buffer import cpu, default_buffer_prototype

import zarr_anyio.storage._zip
from zarr_anyio import FsspecStore, LocalStore, MemoryStore, ZipStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


async def read(store: ZipStore | MemoryStore, key: str) -> bytes | None:
    value = await store.get(key, PROTO)
    return None if value is None else value.to_bytes()


# ---------------------------------------------------------------------- with_read_only


async def test_a_read_only_copy_shares_the_writers_open_archive(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    writer = ZipStore(path, mode="w")
    await writer.set("a", buf(b"1"))
    reader = writer.with_read_only(True)
    assert reader.read_only
    assert reader == writer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "damaged" recovery: the archive is not reopened
        assert await read(reader, "a") == b"1"
    await writer.set("b", buf(b"2"))  # written after the copy was made: seen too
    assert await read(reader, "b") == b"2"
    with pytest.raises(ValueError, match="read-only"):
        await reader.set("c", buf(b"3"))
    await reader.aclose()  # closing the copy leaves the writer open
    await writer.set("c", buf(b"3"))
    await writer.aclose()
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["a", "b", "c"]
        assert archive.testzip() is None


def test_zarr_reads_a_writable_zip_store_in_mode_r(tmp_path: Path) -> None:
    # What xarray's open_zarr does with a writable store: mode "r" takes with_read_only().
    store = ZipStore(tmp_path / "a.zip", mode="w")
    array = zarr.create_array(store=store, name="x", shape=(4,), chunks=(2,), dtype="int8")
    array[:] = [1, 2, 3, 4]
    group = zarr.open_group(store=store, mode="r")
    np.testing.assert_array_equal(group["x"][:], [1, 2, 3, 4])  # type: ignore[index]
    store.close()
    group = zarr.open_group(store=store, mode="r")  # closed: a copy that opens the file
    np.testing.assert_array_equal(group["x"][:], [1, 2, 3, 4])  # type: ignore[index]


async def test_with_read_only_false_of_a_reader_is_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    async with ZipStore(path, mode="w") as first:
        await first.set("a", buf(b"1"))
    reader = ZipStore(path, mode="r")
    writer = reader.with_read_only(False)
    assert not writer.read_only
    await writer.set("b", buf(b"2"))
    await writer.aclose()
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["a", "b"]


# ---------------------------------------------------------------------- other processes


@pytest.fixture(scope="module")
def worker() -> Iterator[ProcessPoolExecutor]:
    """One spawned worker process (no fork of a process that runs threads)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _use_in_worker(store_bytes: bytes, action: str) -> str:
    """In the worker: unpickle a store and use it; what happened, as text."""
    import anyio as worker_anyio

    store = pickle.loads(store_bytes)

    async def act() -> str:
        if action == "write":
            await store.set("from-worker", cpu.Buffer.from_bytes(b"w"))
            return "written"
        value = await store.get("a", default_buffer_prototype())
        return "read " + (value.to_bytes().decode() if value is not None else "nothing")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return worker_anyio.run(act)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def test_a_writable_zip_store_refuses_another_process(
    tmp_path: Path, worker: ProcessPoolExecutor
) -> None:
    path = tmp_path / "a.zip"
    store = ZipStore(path, mode="w")
    store.set_sync("a", buf(b"1"))
    sent = pickle.dumps(store)
    before = path.read_bytes()
    for action in ("write", "read"):
        result = worker.submit(_use_in_worker, sent, action).result(timeout=60)
        assert result.startswith("RuntimeError: ")
        assert f"was made in process {os.getpid()}" in result
        assert "A zip file takes one writer" in result
        assert "with_read_only()" in result
    assert path.read_bytes() == before  # the worker never opened it
    store.close()


def test_a_read_only_copy_reads_unclosed_writes_in_another_process(
    tmp_path: Path, worker: ProcessPoolExecutor
) -> None:
    store = ZipStore(tmp_path / "a.zip", mode="w")
    store.set_sync("a", buf(b"unclosed"))
    # Pickling a copy of an open writer appends the directory first: a whole archive, no
    # "damaged" warning (the worker turns warnings into errors).
    sent = pickle.dumps(store.with_read_only(True))
    assert worker.submit(_use_in_worker, sent, "read").result(timeout=60) == "read unclosed"
    store.close()


def test_a_memory_store_copy_in_another_process_reads_but_refuses_writes(
    worker: ProcessPoolExecutor,
) -> None:
    store = MemoryStore()
    store.set_sync("a", buf(b"snapshot"))
    sent = pickle.dumps(store)
    assert worker.submit(_use_in_worker, sent, "read").result(timeout=60) == "read snapshot"
    result = worker.submit(_use_in_worker, sent, "write").result(timeout=60)
    assert result.startswith("RuntimeError: ")
    assert f"of a MemoryStore of process {os.getpid()}" in result
    assert "would never reach that store" in result
    # In this process a pickled copy is writable, as zarr's is.
    copy = pickle.loads(sent)
    copy.set_sync("b", buf(b"local"))
    assert copy.get_sync("b") is not None


def _limiters_in_worker(sent: bytes) -> tuple[bool, int]:
    first, second = pickle.loads(sent), pickle.loads(sent)
    shared = first.limiter is second.limiter
    if getattr(first, "rate_limit", None) is not None:
        shared = shared and first.rate_limit is second.rate_limit
    return shared, first.max_concurrency


def test_copies_in_another_process_share_one_limiter(
    tmp_path: Path, worker: ProcessPoolExecutor
) -> None:
    """A dask worker unpickles a store for every task: the bound is per worker process."""
    import fsspec

    stores = [
        LocalStore(tmp_path, max_concurrency=3),  # a Limiter
        # An AdaptiveLimiter, and a RateLimit.
        FsspecStore(fsspec.filesystem("memory"), max_concurrency=5, rate_limit=100),
    ]
    for store in stores:
        sent = pickle.dumps(store)
        shared, bound = worker.submit(_limiters_in_worker, sent).result(timeout=60)
        assert shared
        assert bound == store.max_concurrency
        # In the process that made it, a copy has a limiter of its own, as a deepcopy would.
        assert pickle.loads(sent).limiter is not pickle.loads(sent).limiter
    remote = stores[1]
    assert isinstance(remote, FsspecStore)
    assert pickle.loads(pickle.dumps(remote)).rate_limit is not remote.rate_limit


# ---------------------------------------------------------------------- compaction


@pytest.fixture
def small_floor(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(zarr_anyio.storage._zip, "_COMPACT_FLOOR", 64 * 1024)
    return 64 * 1024


async def test_overwrites_do_not_grow_the_file_without_bound(
    tmp_path: Path, small_floor: int
) -> None:
    path = tmp_path / "a.zip"
    store = ZipStore(path, mode="w")
    live = 20 * 10_000
    for i in range(20):
        await store.set(f"c/{i}", buf(bytes([i]) * 10_000))
    largest = 0
    for round_ in range(300):  # 3 MB of overwrites: 15 times what the store holds
        await store.set("c/0", buf(bytes([round_ % 256]) * 10_000))
        largest = max(largest, path.stat().st_size)
    # Dead bytes stay under half the file (past the floor): the file under ~twice the data.
    assert largest < 2 * live + small_floor + 20_000
    assert await read(store, "c/0") == bytes([299 % 256]) * 10_000
    assert await read(store, "c/5") == bytes([5]) * 10_000
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted(f"c/{i}" for i in range(20))


async def test_dead_bytes_from_earlier_sessions_count(tmp_path: Path, small_floor: int) -> None:
    path = tmp_path / "a.zip"
    # Made with compaction out of reach: 40 overwrites left behind.
    zarr_anyio.storage._zip._COMPACT_FLOOR = 1 << 40
    async with ZipStore(path, mode="w") as first:
        for _ in range(40):
            await first.set("big", buf(os.urandom(10_000)))
    grown = path.stat().st_size
    assert grown > 400_000
    zarr_anyio.storage._zip._COMPACT_FLOOR = small_floor
    async with ZipStore(path, mode="a") as second:
        await second.set("small", buf(b"x"))  # the first write sees the dead bytes
        assert path.stat().st_size < 30_000
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["big", "small"]


async def test_small_overwrites_stay_below_the_floor_without_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    store = ZipStore(path, mode="w")
    await store.set("data", buf(os.urandom(100_000)))
    inode = path.stat().st_ino
    for i in range(200):  # zarr.json rewritten again and again: ~40 KB of dead bytes
        await store.set("zarr.json", buf(b"{}" * 100 + str(i).encode()))
    assert path.stat().st_ino == inode  # never replaced: no rewrite below the floor
    await store.aclose()
