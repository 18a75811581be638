"""zarr-python reading and writing arrays and groups through our stores, and interop with its own.

zarr's async API (``zarr.api.asynchronous``) is written against asyncio. Under asyncio the tests
await it directly; under trio they reach it the way a trio program must, on zarr's own event-loop
thread through ``zarr.core.sync.sync`` called from a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
import numpy as np
import pytest
import zarr
import zarr.api.asynchronous as zasync
import zarr.storage
from zarr.core.sync import sync

from zarr_anyio import AnyioStore, LocalStore, MemoryStore

pytestmark = pytest.mark.anyio
T = TypeVar("T")


async def on_zarr_api(backend: str, make: Callable[[], Awaitable[T]]) -> T:
    if backend == "asyncio":
        return await make()

    def blocking() -> T:
        async def run() -> T:
            return await make()

        return sync(run())

    return await anyio.to_thread.run_sync(blocking)


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AnyioStore:
    return MemoryStore() if request.param == "memory" else LocalStore(tmp_path / "data.zarr")


def test_sync_api_arrays_and_groups(store: AnyioStore) -> None:
    root = zarr.create_group(store=store, attributes={"title": "demo"})
    data = np.arange(1000, dtype="float64").reshape(20, 50)
    array = root.create_array("temperature", shape=data.shape, chunks=(7, 11), dtype="float64")
    array[:] = data
    array[3:5, 10:20] = -1
    data[3:5, 10:20] = -1
    sub = root.create_group("sub")
    sub.create_array("x", shape=(3,), dtype="int8")[:] = [1, 2, 3]

    reopened = zarr.open_group(store=store.with_read_only(True), mode="r")
    assert reopened.attrs["title"] == "demo"
    temperature, x = reopened["temperature"], reopened["sub/x"]
    assert isinstance(temperature, zarr.Array)
    assert isinstance(x, zarr.Array)
    np.testing.assert_array_equal(temperature[:], data)
    np.testing.assert_array_equal(x[:], [1, 2, 3])
    assert sorted(reopened.group_keys()) == ["sub"]
    assert sorted(reopened.array_keys()) == ["temperature"]
    with pytest.raises(ValueError, match="read-only"):
        temperature[0, 0] = 5


def test_sharded_and_compressed_arrays(store: AnyioStore) -> None:
    data = np.random.default_rng(0).integers(0, 100, size=(64, 64), dtype="int32")
    array = zarr.create_array(
        store=store, shape=data.shape, chunks=(8, 8), shards=(32, 32), dtype="int32"
    )
    array[:] = data
    np.testing.assert_array_equal(zarr.open_array(store=store, mode="r")[:], data)
    # Partial reads of a shard go through byte ranges on our store.
    np.testing.assert_array_equal(array[9:17, 40:50], data[9:17, 40:50])


@pytest.mark.parametrize("zarr_format", [2, 3])
async def test_async_api_arrays_and_groups(
    store: AnyioStore, anyio_backend: str, zarr_format: Literal[2, 3]
) -> None:
    data = np.arange(120, dtype="int16").reshape(10, 12)

    async def write() -> None:
        group = await zasync.open_group(store=store, mode="w", zarr_format=zarr_format)
        array = await group.create_array("a", shape=data.shape, chunks=(4, 5), dtype="int16")
        await array.setitem(slice(None), data)

    async def read() -> Any:
        array = await zasync.open_array(store=store, path="a", mode="r")
        return await array.getitem(slice(None))

    await on_zarr_api(anyio_backend, write)
    np.testing.assert_array_equal(await on_zarr_api(anyio_backend, read), data)
    # And the raw chunks are there for our own API, from this (asyncio or trio) program.
    keys = sorted([key async for key in store.list_prefix("a/")])
    metadata = {2: 2, 3: 1}[zarr_format]  # .zarray and .zattrs, or zarr.json
    assert len(keys) == metadata + 3 * 3
    results = await store.get_partial_values(
        zarr.core.buffer.default_buffer_prototype(), [(key, None) for key in keys]
    )
    assert all(result is not None for result in results)


def test_local_store_interoperates_with_zarrs(tmp_path: Path) -> None:
    data = np.arange(500, dtype="uint16").reshape(10, 50)
    theirs = zarr.storage.LocalStore(tmp_path / "theirs")
    zarr.create_array(store=theirs, shape=data.shape, chunks=(3, 7), dtype="uint16")[:] = data
    np.testing.assert_array_equal(
        zarr.open_array(store=LocalStore(tmp_path / "theirs"), mode="r")[:], data
    )

    ours = LocalStore(tmp_path / "ours")
    zarr.create_array(store=ours, shape=data.shape, chunks=(3, 7), dtype="uint16")[:] = data
    np.testing.assert_array_equal(
        zarr.open_array(store=zarr.storage.LocalStore(tmp_path / "ours"), mode="r")[:], data
    )

    def layout(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert layout(tmp_path / "ours") == layout(tmp_path / "theirs")


def test_memory_store_shares_the_callers_dict() -> None:
    data: dict[str, Any] = {}
    array = zarr.create_array(store=MemoryStore(data), shape=(2,), dtype="float64")
    array[:] = [1.5, 2.5]
    assert "zarr.json" in data
    assert "c/0" in data
    theirs = zarr.storage.MemoryStore(data)
    np.testing.assert_array_equal(zarr.open_array(store=theirs, mode="r")[:], [1.5, 2.5])
