"""zarr_anyio.api and AsyncArray / AsyncGroup: what they read and write, under every backend.

Round trips (v2 and v3, compressors, sharding, fill values, every selection kind, resize and
append, attributes, consolidated metadata, nested groups), interop with zarr's own API both ways,
zarr's API mirrored generically, and bad input raising zarr's own errors and writing nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numcodecs
import numpy as np
import pytest
import zarr
import zarr.codecs
import zarr.storage
from zarr.core.common import ZarrFormat

import zarr_anyio
import zarr_anyio.api as za
from support.arrays import BACKENDS, CountingStore

pytestmark = pytest.mark.anyio


async def in_thread(call: Callable[[], Any]) -> Any:
    """zarr's sync API, called as a program would: from a thread, not from inside the loop
    (called from a trio task, zarr's loop would inherit the trio task's context)."""
    return await anyio.to_thread.run_sync(call)


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def compressor(name: str, zarr_format: int) -> Any:
    if name == "none":
        return None
    if zarr_format == 2:
        return {"zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc(), "gzip": numcodecs.GZip()}[
            name
        ]
    return {
        "zstd": zarr.codecs.ZstdCodec(),
        "blosc": zarr.codecs.BloscCodec(),
        "gzip": zarr.codecs.GzipCodec(),
    }[name]


LAYOUTS = [
    pytest.param(3, "none", None, id="v3-raw"),
    pytest.param(3, "zstd", None, id="v3-zstd"),
    pytest.param(3, "blosc", None, id="v3-blosc"),
    pytest.param(3, "gzip", None, id="v3-gzip"),
    pytest.param(3, "zstd", (8, 10), id="v3-zstd-sharded"),
    pytest.param(2, "none", None, id="v2-raw"),
    pytest.param(2, "zstd", None, id="v2-zstd"),
    pytest.param(2, "blosc", None, id="v2-blosc"),
    pytest.param(2, "gzip", None, id="v2-gzip"),
]


async def make_array(
    store: Any,
    zarr_format: ZarrFormat,
    codec: str,
    shards: tuple[int, ...] | None,
    *,
    fill_value: Any = 0,
    dtype: str = "int32",
) -> zarr_anyio.AsyncArray:
    return await za.create_array(
        store,
        shape=(16, 20),
        chunks=(4, 5),
        shards=shards,
        dtype=dtype,
        fill_value=fill_value,
        compressors=compressor(codec, zarr_format),
        zarr_format=zarr_format,
    )


@pytest.mark.parametrize(("zarr_format", "codec", "shards"), LAYOUTS)
async def test_every_selection_round_trips(
    tmp_path: Path, zarr_format: ZarrFormat, codec: str, shards: tuple[int, ...] | None
) -> None:
    arr = await make_array(tmp_path / "a.zarr", zarr_format, codec, shards)
    assert isinstance(arr, zarr_anyio.AsyncArray)
    expected = np.arange(16 * 20, dtype="int32").reshape(16, 20)
    await arr.setitem(slice(None), expected)
    np.testing.assert_array_equal(await arr.getitem(...), expected)

    # basic
    np.testing.assert_array_equal(await arr.getitem((slice(3, 11), 7)), expected[3:11, 7])
    assert await arr.getitem((2, 3)) == expected[2, 3]
    np.testing.assert_array_equal(
        await arr.get_basic_selection((slice(1, 4), slice(None, None, 3))), expected[1:4, ::3]
    )
    # orthogonal
    rows, cols = [0, 5, 15], [1, 2, 19]
    np.testing.assert_array_equal(
        await arr.oindex.getitem((rows, cols)), expected[np.ix_(rows, cols)]
    )
    np.testing.assert_array_equal(
        await arr.get_orthogonal_selection((rows, slice(2, 4))), expected[rows][:, 2:4]
    )
    # coordinate
    points = (np.array([0, 7, 15]), np.array([19, 3, 0]))
    np.testing.assert_array_equal(await arr.vindex.getitem(points), expected[points])
    np.testing.assert_array_equal(await arr.getitem(points), expected[points])
    # mask
    mask = expected % 7 == 0
    np.testing.assert_array_equal(await arr.vindex.getitem(mask), expected[mask])
    np.testing.assert_array_equal(await arr.get_mask_selection(mask), expected[mask])
    # block (a block is a stored chunk, or a shard)
    grid = shards or (4, 5)
    np.testing.assert_array_equal(
        await arr.blocks.getitem((1, 1)),
        expected[grid[0] : 2 * grid[0], grid[1] : 2 * grid[1]],
    )

    # and every kind of write
    await arr.set_basic_selection((0, slice(None)), -1)
    expected[0, :] = -1
    await arr.oindex.setitem(([1, 2], [3, 4]), -2)
    expected[np.ix_([1, 2], [3, 4])] = -2
    await arr.vindex.setitem((np.array([5, 6]), np.array([7, 8])), [-3, -4])
    expected[[5, 6], [7, 8]] = [-3, -4]
    await arr.vindex.setitem(expected == 100, -5)
    expected[expected == 100] = -5
    await arr.blocks.setitem((0, 0), np.full(grid, -6))
    expected[: grid[0], : grid[1]] = -6
    await arr.setitem(([9, 10], slice(None)), -7)  # orthogonal through setitem
    expected[[9, 10], :] = -7
    await arr.set_coordinate_selection(([15], [19]), [-8])
    expected[15, 19] = -8
    np.testing.assert_array_equal(await arr.getitem(...), expected)
    # zarr's own reader agrees
    on_disk = await in_thread(lambda: zarr.open_array(store=str(tmp_path / "a.zarr"))[:])
    np.testing.assert_array_equal(on_disk, expected)


@pytest.mark.parametrize(
    ("dtype", "fill_value"),
    [("int16", 7), ("float64", np.nan), ("float32", -1.5), ("bool", True), ("uint8", 255)],
)
@pytest.mark.parametrize("zarr_format", [2, 3])
async def test_fill_values_come_back_for_unwritten_chunks(
    zarr_format: ZarrFormat, dtype: str, fill_value: Any
) -> None:
    store = zarr_anyio.MemoryStore()
    arr = await make_array(store, zarr_format, "zstd", None, fill_value=fill_value, dtype=dtype)
    await arr.setitem((slice(0, 4), slice(0, 5)), np.zeros((4, 5), dtype=dtype))
    data = await arr.getitem(...)
    expected = np.full((16, 20), fill_value, dtype=dtype)
    expected[:4, :5] = 0
    np.testing.assert_array_equal(data, expected)
    assert await arr.nchunks_initialized() == 1


@pytest.mark.parametrize("zarr_format", [2, 3])
async def test_resize_append_and_attributes(zarr_format: ZarrFormat) -> None:
    store = zarr_anyio.MemoryStore()
    arr = await za.create_array(
        store, shape=(10,), chunks=(4,), dtype="i8", zarr_format=zarr_format, fill_value=-1
    )
    await arr.setitem(slice(None), np.arange(10))
    await arr.resize((6,))
    assert arr.shape == (6,)
    assert await arr.append(np.arange(100, 103)) == (9,)
    np.testing.assert_array_equal(await arr.getitem(...), [0, 1, 2, 3, 4, 5, 100, 101, 102])
    await arr.resize((12,))
    np.testing.assert_array_equal(await arr.getitem(slice(9, None)), [-1, -1, -1])

    assert await arr.update_attributes({"units": "m", "scale": 2}) is arr
    reopened = await za.open_array(store=store, mode="r")
    assert reopened.attrs == {"units": "m", "scale": 2}
    assert reopened.shape == (12,)


async def test_store_takes_what_open_store_takes(tmp_path: Path) -> None:
    data: dict[str, Any] = {}
    in_dict = await za.create_array(data, shape=(3,), dtype="u1")
    assert isinstance(in_dict.store, zarr_anyio.MemoryStore)
    assert "zarr.json" in data

    on_disk = await za.create_array(str(tmp_path / "p.zarr"), shape=(3,), dtype="u1")
    assert isinstance(on_disk.store, zarr_anyio.LocalStore)
    as_path = await za.open_array(store=tmp_path / "p.zarr", mode="r")
    assert as_path.store.read_only

    in_zip = await za.create_array(str(tmp_path / "z.zip"), shape=(3,), dtype="u1")
    await in_zip.setitem(slice(None), [1, 2, 3])
    assert isinstance(in_zip.store, zarr_anyio.ZipStore)
    assert isinstance(in_zip.store, zarr_anyio.ZipStore)
    await in_zip.store.aclose()
    again = await za.open_array(store=str(tmp_path / "z.zip"), mode="r")
    np.testing.assert_array_equal(await again.getitem(...), [1, 2, 3])
    assert isinstance(again.store, zarr_anyio.ZipStore)
    await again.store.aclose()

    in_memory = await za.zeros((2, 2), chunks=(1, 1))  # no store: a new MemoryStore of ours
    assert isinstance(in_memory.store, zarr_anyio.MemoryStore)
    url = await za.create_array("memory://", shape=(2,), dtype="f4")
    assert isinstance(url.store, zarr_anyio.MemoryStore)


async def test_every_function_of_zarrs_async_api_is_here(tmp_path: Path) -> None:
    for name in zarr.api.asynchronous.__all__:
        if name not in ("copy", "copy_all", "copy_store"):  # zarr has not implemented those
            assert callable(getattr(za, name)), name
    path = str(tmp_path / "saved.zarr")
    await za.save_array(path, np.arange(6))
    np.testing.assert_array_equal(await za.load(store=path), np.arange(6))
    source = await za.open_array(store=path, mode="r")
    like = await za.ones_like(source)
    assert isinstance(like, zarr_anyio.AsyncArray)
    assert isinstance(like.store, zarr_anyio.MemoryStore)
    np.testing.assert_array_equal(await like.getitem(...), np.ones(6))
    copied = await za.from_array(str(tmp_path / "copy.zarr"), data=source)
    np.testing.assert_array_equal(await copied.getitem(...), np.arange(6))
    again = await za.array(source, store={})  # one of our arrays as data
    np.testing.assert_array_equal(await again.getitem(...), np.arange(6))
    full = await za.full((3,), fill_value=7, store={}, dtype="i1")
    np.testing.assert_array_equal(await full.getitem(...), [7, 7, 7])
    created = [
        path
        async for path, _ in za.create_hierarchy(
            store=zarr_anyio.MemoryStore(), nodes={"": zarr.core.group.GroupMetadata()}
        )
    ]
    assert created == [""]


async def test_remote_url_with_storage_options(s3_server: Any) -> None:
    bucket = s3_server.new_bucket()
    options = {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}
    arr = await za.create_array(
        f"s3://{bucket}/a.zarr", shape=(8,), chunks=(2,), dtype="i2", storage_options=options
    )
    assert isinstance(arr.store, zarr_anyio.FsspecStore)
    await arr.setitem(slice(None), np.arange(8))
    back = await za.open_array(store=f"s3://{bucket}/a.zarr", mode="r", storage_options=options)
    np.testing.assert_array_equal(await back.getitem(...), np.arange(8))


async def test_nested_groups_and_their_members() -> None:
    store = zarr_anyio.MemoryStore()
    root = await za.create_group(store=store, attributes={"title": "root"})
    assert isinstance(root, zarr_anyio.AsyncGroup)
    a = await root.create_group("a")
    b = await a.create_group("b")
    x = await b.create_array("x", shape=(4,), dtype="f4")
    await x.setitem(slice(None), [1, 2, 3, 4])
    y, c = await root.require_groups("y", "a/c")
    assert isinstance(y, zarr_anyio.AsyncGroup)
    assert isinstance(c, zarr_anyio.AsyncGroup)
    assert await root.require_group("a") == a

    node = await root.getitem("a/b/x")
    assert isinstance(node, zarr_anyio.AsyncArray)
    np.testing.assert_array_equal(await node.getitem(...), [1, 2, 3, 4])
    assert isinstance(await root.getitem("a/b"), zarr_anyio.AsyncGroup)
    assert await root.contains("a/b/x")
    with pytest.raises(KeyError):  # zarr's own error, as itself
        await root.getitem("a/missing")

    members = {name: type(member) async for name, member in root.members(max_depth=None)}
    assert members == {
        "a": zarr_anyio.AsyncGroup,
        "y": zarr_anyio.AsyncGroup,
        "a/b": zarr_anyio.AsyncGroup,
        "a/c": zarr_anyio.AsyncGroup,
        "a/b/x": zarr_anyio.AsyncArray,
    }
    keys = [key async for key in root.keys()]  # noqa: SIM118
    assert sorted(keys) == ["a", "y"]
    async with a.group_keys() as names:  # closed when the block ends, even early
        async for key in names:
            assert key in ("b", "c")
            break

    # zarr's tree() (which needs `rich` on zarr 3.1.0): ours gives what zarr's gives, or raises
    # what it raises.
    def zarrs_tree() -> Any:
        try:
            return str(zarr.open_group(store=store, mode="r").tree())
        except ImportError as error:
            return error

    expected_tree = await in_thread(zarrs_tree)
    if isinstance(expected_tree, ImportError):
        with pytest.raises(ImportError, match=str(expected_tree)):
            await root.tree()
    else:
        assert str(await root.tree()) == expected_tree

    # Left early inside `async with`, zarr's generator is closed at once, on its own loop.
    async with root.members() as members:
        async for _ in members:
            break
    assert members._generator.ag_frame is None
    unclosed = root.members()
    async for _ in unclosed:
        break
    assert unclosed._generator.ag_frame is not None  # until it is garbage-collected
    await unclosed.aclose()

    # zarr's sync API sees the same tree
    group = await in_thread(lambda: zarr.open_group(store=store, mode="r"))
    assert (await in_thread(lambda: group["a/b/x"][:].tolist())) == [1, 2, 3, 4]
    assert group.attrs["title"] == "root"


async def test_consolidated_metadata(tmp_path: Path) -> None:
    path = str(tmp_path / "tree.zarr")
    root = await za.group(store=path)
    for name in ("p", "q"):
        arr = await root.create_array(name, shape=(5,), dtype="i4")
        await arr.setitem(slice(None), np.arange(5))
    consolidated = await za.consolidate_metadata(path)
    assert isinstance(consolidated, zarr_anyio.AsyncGroup)
    opened = await za.open_consolidated(path, mode="r")
    assert opened.metadata.consolidated_metadata is not None
    assert sorted(opened.metadata.consolidated_metadata.metadata) == ["p", "q"]
    np.testing.assert_array_equal(await (await opened.getitem("q")).getitem(...), np.arange(5))
    theirs = await in_thread(lambda: zarr.open_consolidated(path))
    assert theirs.metadata.consolidated_metadata is not None


async def test_interop_with_zarrs_own_api_both_ways(tmp_path: Path) -> None:
    ours = str(tmp_path / "ours.zarr")
    arr = await za.create_array(ours, shape=(50, 3), chunks=(7, 3), dtype="f8")
    data = np.random.default_rng(0).random((50, 3))
    await arr.setitem(..., data)
    read = await in_thread(lambda: zarr.open_array(store=ours, mode="r")[:])
    np.testing.assert_array_equal(read, data)

    theirs = str(tmp_path / "theirs.zarr")

    def write() -> None:
        written = zarr.create_array(
            store=zarr.storage.LocalStore(theirs), shape=(9,), chunks=(2,), dtype="i4", shards=(4,)
        )
        written[:] = np.arange(9)
        written.attrs["who"] = "zarr"

    await in_thread(write)
    back = await za.open(store=theirs, mode="r")
    assert isinstance(back, zarr_anyio.AsyncArray)
    np.testing.assert_array_equal(await back.getitem(...), np.arange(9))
    assert back.attrs["who"] == "zarr"


async def test_wrapping_zarrs_own_arrays_and_groups() -> None:
    store = zarr_anyio.MemoryStore()

    def write() -> Any:
        sync_array = zarr.create_array(store=store, name="x", shape=(6,), dtype="i4")
        sync_array[:] = np.arange(6)
        return sync_array

    sync_array = await in_thread(write)
    for wrapped in (
        zarr_anyio.AsyncArray(sync_array),
        zarr_anyio.AsyncArray(sync_array._async_array),
        zarr_anyio.AsyncArray(zarr_anyio.AsyncArray(sync_array)),
    ):
        np.testing.assert_array_equal(await wrapped.getitem(...), np.arange(6))
        assert wrapped.async_array is sync_array._async_array
    group = zarr_anyio.AsyncGroup(await in_thread(lambda: zarr.open_group(store=store, mode="r")))
    assert [key async for key in group.keys()]  # noqa: SIM118 == ["x"]
    again = zarr.Array(zarr_anyio.AsyncArray(sync_array).async_array)
    assert await in_thread(lambda: again[2]) == 2
    with pytest.raises(TypeError, match="expected a zarr array"):
        zarr_anyio.AsyncArray(np.arange(3))  # type: ignore[arg-type]


async def test_zarr_methods_are_forwarded_without_code_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arr = await za.create_array(zarr_anyio.MemoryStore(), shape=(4,), dtype="u2")
    await arr.setitem(slice(None), [1, 2, 3, 4])
    # Methods we never wrote: zarr's own, run where the backend needs them.
    assert await arr.nbytes_stored() > 0
    assert "Type" in repr(await arr.info_complete())
    assert arr.nchunks == 1
    assert arr.dtype == np.dtype("u2")

    # A coroutine method zarr might add later, and one that gives an array back.
    async def doubled_sum(self: Any) -> int:
        return 2 * int((await self.getitem(...)).sum())

    async def reopen(self: Any) -> Any:
        return await zarr.api.asynchronous.open_array(store=self.store_path)

    monkeypatch.setattr(zarr.AsyncArray, "doubled_sum", doubled_sum, raising=False)
    monkeypatch.setattr(zarr.AsyncArray, "reopen", reopen, raising=False)
    assert await arr.doubled_sum() == 20
    assert isinstance(await arr.reopen(), zarr_anyio.AsyncArray)
    # and a function zarr's async API might add later
    monkeypatch.setattr(zarr.api.asynchronous, "__all__", [*zarr.api.asynchronous.__all__, "ping"])

    async def ping(*, store: Any) -> Any:
        return store

    monkeypatch.setattr(zarr.api.asynchronous, "ping", ping, raising=False)
    assert isinstance(await za.ping(store={}), zarr_anyio.MemoryStore)
    assert "store" in str(__import__("inspect").signature(za.open_array))


# ------------------------------------------------------------------------ bad input


async def zarr_error(call: Callable[[], Any]) -> BaseException:
    """What zarr's own sync API raises for the same mistake (in a thread, off our loop)."""

    def run() -> BaseException:
        try:
            call()
        except Exception as error:
            return error
        raise AssertionError("zarr raised nothing")

    return await anyio.to_thread.run_sync(run)


async def test_missing_array_read_only_raises_zarrs_error_and_writes_nothing(
    tmp_path: Path,
) -> None:
    store = CountingStore()
    await za.create_group(store=store)
    before = dict(store._store_dict)
    expected = await zarr_error(lambda: zarr.open_array(store=store, path="nope", mode="r"))
    with pytest.raises(type(expected)) as raised:
        await za.open_array(store=store, path="nope", mode="r")
    assert type(raised.value) is type(expected)
    assert str(raised.value) == str(expected)
    assert store._store_dict == before

    missing = tmp_path / "missing.zarr"
    with pytest.raises(FileNotFoundError):
        await za.open_array(store=str(missing), mode="r")
    assert not missing.exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize(
    ("selection", "value"),
    [
        (slice(0, 6), np.arange(4)),  # zarr itself writes the first chunks, then fails
        (slice(0, 6), np.ones((2, 3))),
        (slice(0, 6), np.arange(8)),  # zarr itself silently cuts this short
    ],
    ids=["short", "2d", "long"],
)
async def test_setitem_shape_mismatch_raises_zarrs_error_and_writes_nothing(
    zarr_format: ZarrFormat, selection: Any, value: Any
) -> None:
    store = CountingStore()
    arr = await za.create_array(
        store, shape=(10,), chunks=(2,), dtype="i4", zarr_format=zarr_format
    )
    with pytest.raises(ValueError, match=r"could not broadcast input array from shape"):
        await arr.setitem(selection, value)
    assert store.chunk_keys() == []
    with pytest.raises(ValueError, match="Attempting to set a selection of 2"):
        await arr.vindex.setitem(([1, 2],), [1, 2, 3])
    # numpy's rules otherwise: broadcasting, and leading length-1 axes
    await arr.setitem(slice(0, 4), [[7]])
    await arr.setitem(slice(4, 6), [[8, 9]])
    np.testing.assert_array_equal(await arr.getitem(slice(0, 6)), [7, 7, 7, 7, 8, 9])


async def test_writing_a_read_only_store_raises_zarrs_error_and_writes_nothing() -> None:
    store = CountingStore()
    writable = await za.create_array(store, shape=(4,), chunks=(2,), dtype="i4")
    await writable.setitem(slice(None), [1, 2, 3, 4])
    before = dict(store._store_dict)
    arr = await za.open_array(store=store.with_read_only(True), mode="r")
    sync_array = await in_thread(
        lambda: zarr.open_array(store=store.with_read_only(True), mode="r")
    )
    expected = await zarr_error(lambda: sync_array.__setitem__(slice(0, 2), [9, 9]))
    for write in (
        lambda: arr.setitem(slice(0, 2), [9, 9]),
        lambda: arr.update_attributes({"a": 1}),
        lambda: arr.resize((2,)),
    ):
        with pytest.raises(type(expected), match="read-only"):
            await write()
    assert store._store_dict == before
