"""The Store API of MemoryStore and LocalStore, driven from asyncio and from trio programs."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype

from support.servers import S3Server
from zarr_anyio import AnyioStore, FsspecStore, LocalStore, MemoryStore, ObjectStore, ZipStore

pytestmark = pytest.mark.anyio

PROTO = default_buffer_prototype()
READ_ONLY_MESSAGE = "store was opened in read-only mode and does not support writing"


def buf(data: bytes) -> Buffer:
    return cpu.Buffer.from_bytes(data)


@pytest.fixture(params=["memory", "local", "zip", "fsspec-s3", "obstore-s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyioStore]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "local":
        yield LocalStore(tmp_path / "store")
    elif request.param == "fsspec-s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        yield FsspecStore(s3.s3fs(asynchronous=True), path=f"{s3.new_bucket()}/root")
    elif request.param == "obstore-s3":
        s3 = request.getfixturevalue("s3_server")
        yield ObjectStore(s3.obstore(s3.new_bucket()))
    else:
        (tmp_path / "store").mkdir()
        zip_store = ZipStore(tmp_path / "store" / "data.zip", mode="w")
        yield zip_store
        zip_store.close()


def read_only_view(store: AnyioStore) -> AnyioStore:
    """The same data through a read-only store (a zip is closed and reopened for reading)."""
    if isinstance(store, ZipStore):
        store.close()
        return ZipStore(store.path, mode="r")
    reader = store.with_read_only(True)
    assert isinstance(reader, AnyioStore)
    return reader


async def fill(store: AnyioStore, keys: dict[str, bytes]) -> None:
    await store.set_many((key, buf(value)) for key, value in keys.items())


async def collect(iterator: Any) -> list[str]:
    return sorted([item async for item in iterator])


# ------------------------------------------------------------------------------------- reads


@pytest.mark.parametrize(
    ("byte_range", "expected"),
    [
        (None, b"0123456789"),
        (RangeByteRequest(2, 5), b"234"),
        (RangeByteRequest(8, 20), b"89"),  # past the end: what exists
        (RangeByteRequest(12, 20), b""),  # starts past the end: nothing
        (RangeByteRequest(3, 3), b""),
        (OffsetByteRequest(7), b"789"),
        (OffsetByteRequest(10), b""),
        (SuffixByteRequest(3), b"789"),
        (SuffixByteRequest(50), b"0123456789"),
    ],
)
async def test_get_byte_ranges_follow_zarr(
    store: AnyioStore, byte_range: Any, expected: bytes
) -> None:
    await store.set("c/0", buf(b"0123456789"))
    result = await store.get("c/0", PROTO, byte_range)
    assert result is not None
    assert result.to_bytes() == expected
    assert (await store.get_partial_values(PROTO, [("c/0", byte_range)]))[0] == result


@pytest.mark.parametrize(
    ("byte_range", "error"),
    [
        ((0, 2), TypeError),
        (slice(0, 2), TypeError),
        ("bytes=0-2", TypeError),
        (RangeByteRequest(-1, 2), ValueError),
        (RangeByteRequest(5, 2), ValueError),
        (RangeByteRequest(0.5, 2), TypeError),  # type: ignore[arg-type]
        (OffsetByteRequest(-1), ValueError),
        (SuffixByteRequest(-1), ValueError),
    ],
)
async def test_bad_byte_range_raises(store: AnyioStore, byte_range: Any, error: type) -> None:
    await store.set("c/0", buf(b"0123"))
    with pytest.raises(error, match="byte_range"):
        await store.get("c/0", PROTO, byte_range)
    with pytest.raises(error, match="byte_range"):
        await store.get_partial_values(PROTO, [("c/0", byte_range)])


async def test_missing_keys(store: AnyioStore) -> None:
    assert await store.get("nope", PROTO) is None
    assert await store.get("nope", PROTO, RangeByteRequest(0, 1)) is None
    assert not await store.exists("nope")
    with pytest.raises(FileNotFoundError):
        await store.getsize("nope")
    await store.delete("nope")  # not an error
    # Unlike zarr's LocalStore, a missing key in a bulk read is None, as from get.
    await store.set("here", buf(b"x"))
    results = await store.get_partial_values(PROTO, [("nope", None), ("here", None)])
    assert results[0] is None
    assert results[1] is not None
    assert results[1].to_bytes() == b"x"


async def test_get_partial_values_keeps_order(store: AnyioStore) -> None:
    keys = {f"c/{i}": f"value-{i}".encode() for i in range(300)}
    await fill(store, keys)
    requests = [(f"c/{i}", RangeByteRequest(6, 100)) for i in reversed(range(300))]
    results = await store.get_partial_values(PROTO, iter(requests))
    assert [r.to_bytes() if r else None for r in results] == [
        str(i).encode() for i in reversed(range(300))
    ]


async def test_fetch_many_streams_every_result(store: AnyioStore) -> None:
    keys = {f"c/{i}": bytes([i % 256]) * (i + 1) for i in range(200)}
    await fill(store, keys)
    seen: dict[str, list[bytes | None]] = {}
    requests: list[Any] = [*keys, ("c/3", SuffixByteRequest(2)), "missing"]
    async with store.fetch_many(requests) as results:
        async for key, buffer in results:
            seen.setdefault(key, []).append(None if buffer is None else buffer.to_bytes())
    assert seen.pop("missing") == [None]
    # Results come as they complete: c/3's suffix may come before its whole value.
    assert sorted(value or b"" for value in seen.pop("c/3")) == sorted(
        [keys["c/3"], keys["c/3"][-2:]]
    )
    assert seen == {key: [value] for key, value in keys.items() if key != "c/3"}


async def test_fetch_many_leaving_early_cancels_the_rest(store: AnyioStore) -> None:
    await fill(store, {f"c/{i}": b"x" for i in range(500)})
    taken = pulled = 0

    def requests() -> Iterator[str]:
        nonlocal pulled
        for i in range(500):
            pulled += 1
            yield f"c/{i}"

    async with store.fetch_many(requests()) as results:
        async for _ in results:
            taken += 1
            if taken == 3:
                break
    # Counted at the source: only the requests taken before leaving (the three, those in
    # flight and those waiting to be taken, each bounded by the store's tokens). A block that
    # let the rest run to the end would pull all 500.
    tokens = store._limit.total_tokens
    assert 3 + 2 * tokens + 1 < 500
    assert pulled <= 3 + 2 * tokens + 1


async def test_fetch_many_raises_the_first_error_as_itself(store: AnyioStore) -> None:
    await fill(store, {"c/0": b"x"})
    with pytest.raises(ValueError, match=r"\.\."):
        async with store.fetch_many(["c/0", "../etc/passwd", "c/0"]) as results:
            async for _ in results:
                pass


async def test_get_many_generator(store: AnyioStore) -> None:
    keys = {f"c/{i}": str(i).encode() for i in range(300)}
    await fill(store, keys)
    got = {key: value.to_bytes() async for key, value in _nonnull(store, keys)}
    assert got == keys


async def _nonnull(store: AnyioStore, keys: dict[str, bytes]) -> Any:
    async for key, value in store._get_many((key, PROTO, None) for key in keys):
        assert value is not None
        yield key, value


# ----------------------------------------------------------------------------------- listing


async def test_listing(store: AnyioStore) -> None:
    await fill(
        store,
        {"zarr.json": b"", "a/zarr.json": b"", "a/c/0": b"", "a/c/1": b"", "ab/c/0": b""},
    )
    assert await collect(store.list()) == ["a/c/0", "a/c/1", "a/zarr.json", "ab/c/0", "zarr.json"]
    # list_prefix matches a string prefix; "a/" is the node, "a" takes in "ab" too.
    assert await collect(store.list_prefix("a/")) == ["a/c/0", "a/c/1", "a/zarr.json"]
    assert await collect(store.list_prefix("a")) == ["a/c/0", "a/c/1", "a/zarr.json", "ab/c/0"]
    assert await collect(store.list_prefix("a/c/")) == ["a/c/0", "a/c/1"]
    assert await collect(store.list_prefix("zz")) == []
    assert await collect(store.list_dir("")) == ["a", "ab", "zarr.json"]
    assert await collect(store.list_dir("a")) == ["c", "zarr.json"]
    assert await collect(store.list_dir("a/")) == ["c", "zarr.json"]
    assert await collect(store.list_dir("nowhere")) == []
    assert await store.getsize_prefix("a") == 0
    await store.set("a/c/2", buf(b"12345"))
    assert await store.getsize_prefix("a") == 5
    assert await store.getsize("a/c/2") == 5
    assert not await store.is_empty("a")
    assert await store.is_empty("a/c/0")


async def test_delete_dir_is_a_node_not_a_string_prefix(store: AnyioStore) -> None:
    await fill(store, {"a/c/0": b"1", "a/zarr.json": b"2", "ab/c/0": b"3", "zarr.json": b"4"})
    await store.delete_dir("a")
    assert await collect(store.list()) == ["ab/c/0", "zarr.json"]
    await store.delete_dir("")
    assert await collect(store.list()) == []


async def delete_dir_of_a_key_leaves_the_key(store: AnyioStore) -> None:
    await fill(store, {"x": b"1", "xy/c/0": b"2", "y/c/0": b"3"})
    await store.delete_dir("x")
    await store.delete_dir("x/")
    assert await collect(store.list()) == ["x", "xy/c/0", "y/c/0"]
    assert await store.get("x", PROTO) is not None
    await store.delete_dir("y")
    assert await collect(store.list()) == ["x", "xy/c/0"]


async def test_delete_dir_of_a_key_leaves_the_key(store: AnyioStore) -> None:
    # delete_dir(p) deletes the keys under the node p ("p/…"), never a key named p itself, as
    # zarr's MemoryStore does. fsspec's find() of a path that is a file gives that file, so
    # FsspecStore's delete_dir("x") deleted the key "x" (on S3, local files and memory alike).
    await delete_dir_of_a_key_leaves_the_key(store)


@pytest.mark.parametrize("filesystem", ["memory", "file"])
async def test_fsspec_delete_dir_of_a_key_leaves_the_key(filesystem: str, tmp_path: Path) -> None:
    import fsspec

    if filesystem == "memory":
        # One memory file system per process: a root of this test's own.
        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        store = FsspecStore(fs, path=f"/{tmp_path.name}")
    else:
        fs = fsspec.filesystem("file", auto_mkdir=True, skip_instance_cache=True)
        store = FsspecStore(fs, path=str(tmp_path / "store"))
    await delete_dir_of_a_key_leaves_the_key(store)


async def test_set_if_not_exists_keeps_the_first(store: AnyioStore) -> None:
    await store.set_if_not_exists("k", buf(b"first"))
    await store.set_if_not_exists("k", buf(b"second"))
    result = await store.get("k", PROTO)
    assert result is not None
    assert result.to_bytes() == b"first"


async def test_concurrent_set_if_not_exists_has_one_winner(store: AnyioStore) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(store.set_if_not_exists, "lock", buf(str(i).encode()))
    result = await store.get("lock", PROTO)
    assert result is not None
    assert int(result.to_bytes()) in range(20)


async def test_writes_copy_the_callers_memory(store: AnyioStore) -> None:
    data = bytearray(b"abcd")
    value = cpu.Buffer.from_bytes(data)
    await store.set("k", value)
    value.as_numpy_array()[:] = 0
    result = await store.get("k", PROTO)
    assert result is not None
    assert result.to_bytes() == b"abcd"


async def test_store_as_async_context_manager(store: AnyioStore) -> None:
    async with store as opened:
        assert opened is store
        assert store._is_open
        await store.set("k", buf(b"v"))
    assert not store._is_open


# ------------------------------------------------------------------------------- bad keys

BAD_KEYS = [
    "../escape",
    "a/../../escape",
    "/etc/passwd",
    "a//b",
    "a/./b",
    "a\\..\\b",
    "nul\x00byte",
    "trailing/",
    "",
    # One rule for every store: valid Unicode, segments of at most 255 bytes and keys of at most
    # 1,024 in UTF-8.
    "lone\ud800surrogate",
    "s" * 256,
    "é" * 128,
    "k/" * 600 + "k",
    "z" * 70_000,  # zipfile raised struct.error for this one
]


def _key_operations(store: AnyioStore, key: str) -> list[Callable[[], Coroutine[Any, Any, Any]]]:
    return [
        lambda: store.get(key, PROTO),
        lambda: store.get_partial_values(PROTO, [("ok", None), (key, None)]),
        lambda: store.exists(key),
        lambda: store.getsize(key),
        lambda: store.set(key, buf(b"x")),
        lambda: store.set_if_not_exists(key, buf(b"x")),
        lambda: store.set_many([("ok", buf(b"x")), (key, buf(b"x"))]),
        lambda: store.delete(key),
    ]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_refused_by_every_operation(
    store: AnyioStore, key: str, tmp_path: Path
) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for operation in _key_operations(store, key):
        with pytest.raises(ValueError, match="key") as error:
            await operation()
        assert repr(key)[:60] in str(error.value)
    # Nothing was written anywhere, not even the good key of the batch with a bad one.
    assert not await store.exists("ok")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] != "store"] == []


@pytest.mark.parametrize("prefix", ["../", "..", "/abs", "a//", "a/../..", "a\\b"])
async def test_bad_prefixes_are_refused(store: AnyioStore, prefix: str) -> None:
    await store.set("a/b", buf(b"x"))
    with pytest.raises(ValueError, match="prefix"):
        await collect(store.list_prefix(prefix))
    with pytest.raises(ValueError, match="prefix"):
        await collect(store.list_dir(prefix))
    with pytest.raises(ValueError, match="prefix"):
        await store.delete_dir(prefix)
    with pytest.raises(ValueError, match="prefix"):
        await store.getsize_prefix(prefix)
    assert await store.exists("a/b")


async def test_local_store_never_touches_outside_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"do not read")
    store = LocalStore(tmp_path / "root")
    await store.set("inside", buf(b"x"))
    for key in ["../secret", "a/../../secret", str(outside)]:
        with pytest.raises(ValueError, match="key"):
            await store.get(key, PROTO)
        with pytest.raises(ValueError, match="key"):
            await store.delete(key)
        with pytest.raises(ValueError, match="key"):
            store.get_sync(key)
        with pytest.raises(ValueError, match="key"):
            store.delete_sync(key)
    for prefix in ["..", "../", "../root/.."]:
        with pytest.raises(ValueError, match="prefix"):
            await store.delete_dir(prefix)
        with pytest.raises(ValueError, match="prefix"):
            await collect(store.list_prefix(prefix))
    assert outside.read_bytes() == b"do not read"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "secret"]


# ---------------------------------------------------------------------------- read-only


async def test_read_only_refuses_every_write_and_changes_nothing(store: AnyioStore) -> None:
    await fill(store, {"a/c/0": b"old", "zarr.json": b"{}"})
    reader = read_only_view(store)
    writes: list[Callable[[], Coroutine[Any, Any, Any]]] = [
        lambda: reader.set("a/c/0", buf(b"new")),
        lambda: reader.set("new", buf(b"new")),
        lambda: reader.set_if_not_exists("new", buf(b"new")),
        lambda: reader.set_many([("new", buf(b"new"))]),
        lambda: reader._set_many([("new", buf(b"new"))]),
        lambda: reader.delete("a/c/0"),
        lambda: reader.delete_dir("a"),
        lambda: reader.clear(),
    ]
    for write in writes:
        with pytest.raises(ValueError, match=READ_ONLY_MESSAGE):
            await write()
    sync_writes: list[Callable[[], None]] = [
        lambda: reader.set_sync("new", buf(b"new")),
        lambda: reader.delete_sync("a/c/0"),
    ]
    for sync_write in sync_writes:
        with pytest.raises(ValueError, match=READ_ONLY_MESSAGE):
            sync_write()
    assert await collect(store.list()) == ["a/c/0", "zarr.json"]
    value = await store.get("a/c/0", PROTO)
    assert value is not None
    assert value.to_bytes() == b"old"


# ------------------------------------------------------------------- identity and pickling


async def test_equality_pickling_and_str(tmp_path: Path) -> None:
    local = LocalStore(tmp_path, max_concurrency=3)
    assert str(local) == f"file://{tmp_path.as_posix()}"
    assert local == LocalStore(str(tmp_path))
    assert local != LocalStore(tmp_path / "other")
    await local.set("k", buf(b"v"))
    copy = pickle.loads(pickle.dumps(local))
    assert copy == local
    assert copy.max_concurrency == 3
    assert copy.limiter is not local.limiter  # its own, made on first use
    assert copy.limiter.total_tokens == 3
    value = await copy.get("k", PROTO)
    assert value is not None
    assert value.to_bytes() == b"v"

    data: dict[str, Buffer] = {}
    memory = MemoryStore(data)
    assert str(memory) == f"memory://{id(data)}"
    await memory.set("k", buf(b"v"))
    assert "k" in data  # the caller's dict is the store
    assert memory == MemoryStore(data)
    assert memory != MemoryStore(data, read_only=True)
    assert pickle.loads(pickle.dumps(memory)) == memory


def test_constructor_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MemoryStore(max_concurrency=0)
    with pytest.raises(TypeError, match="int"):
        MemoryStore(max_concurrency=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        LocalStore(tmp_path, max_concurrency=2, limiter=anyio.CapacityLimiter(2))
    with pytest.raises(TypeError, match="CapacityLimiter"):
        LocalStore(tmp_path, limiter=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="root"):
        LocalStore(42)  # type: ignore[arg-type]


async def test_read_only_local_store_needs_its_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await LocalStore.open(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()
    store = await LocalStore.open(tmp_path / "made")
    assert (tmp_path / "made").is_dir()
    assert not store.read_only
