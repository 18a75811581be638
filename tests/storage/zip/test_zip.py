"""ZipStore: concurrency, cancellation, bad archives and interop with zipfile and zarr-python."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import warnings
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import cpu, default_buffer_prototype

from zarr_anyio import ZipStore
from zarr_anyio.storage import _oscalls

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def value_of(i: int) -> bytes:
    return f"value {i} ".encode() * (i % 7 + 1)


@pytest.mark.parametrize("limit", [1, 4, 32])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
async def test_many_writers_and_readers_then_zipfile_and_zarr_read_it(
    tmp_path: Path, limit: int, compression: int
) -> None:
    path = tmp_path / "burst.zip"
    store = ZipStore(path, mode="w", max_concurrency=limit, compression=compression)
    seen: dict[str, bytes] = {}

    async def write_then_read(i: int) -> None:
        await store.set(f"c/{i}", buf(value_of(i)))
        result = await store.get(f"c/{i}", PROTO)
        assert result is not None
        seen[f"c/{i}"] = result.to_bytes()

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(write_then_read, i)
    bulk = await store.get_partial_values(PROTO, [(f"c/{i}", None) for i in range(300)])
    await store.aclose()

    expected = {f"c/{i}": value_of(i) for i in range(300)}
    assert seen == expected
    assert [b.to_bytes() if b else None for b in bulk] == list(expected.values())
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert {name: archive.read(name) for name in archive.namelist()} == expected
    theirs = await zarr.storage.ZipStore.open(path, mode="r")
    for key, value in expected.items():
        got = await theirs.get(key, PROTO)
        assert got is not None
        assert got.to_bytes() == value
    theirs.close()


async def test_cancelled_burst_of_writes_keeps_every_reported_write(tmp_path: Path) -> None:
    path = tmp_path / "cancelled.zip"
    store = ZipStore(path, mode="w", max_concurrency=8)
    done: list[int] = []

    async def write(i: int, scope: anyio.CancelScope) -> None:
        await store.set(f"c/{i}", buf(value_of(i)))
        done.append(i)
        if len(done) == 100:
            scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(write, i, scope)
    assert scope.cancelled_caught
    assert 100 <= len(done) < 1000
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        for i in done:
            assert archive.read(f"c/{i}") == value_of(i)
    # Whatever else is there was written whole: the archive's directory lists only complete
    # members (testzip checked their CRCs).
    assert {f"c/{i}" for i in done} <= names


async def test_byte_ranges_of_a_stored_member_read_only_those_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ZipStore(tmp_path / "ranges.zip", mode="w")
    data = bytes(range(256)) * 64
    await store.set("c/0", buf(data))
    requested: list[int] = []
    real_pread = _oscalls.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        requested.append(length)
        return real_pread(fd, length, offset)

    real_read_into = _oscalls.read_into

    def counting_read_into(fd: int, buffer: Any, offset: int, flags: int = 0) -> int:
        requested.append(len(buffer))
        return real_read_into(fd, buffer, offset, flags)

    # Reads from the page cache are made on the event loop (read_into), others in a thread
    # (pread); counted where the store calls the system, whichever calls this system has.
    monkeypatch.setattr(_oscalls, "pread", counting_pread)
    monkeypatch.setattr(_oscalls, "read_into", counting_read_into)
    cases: list[tuple[ByteRequest | None, bytes]] = [
        (RangeByteRequest(100, 110), data[100:110]),
        (OffsetByteRequest(len(data) - 5), data[-5:]),
        (SuffixByteRequest(7), data[-7:]),
        (RangeByteRequest(len(data) - 3, len(data) + 100), data[-3:]),
    ]
    for byte_range, expected in cases:
        requested.clear()
        result = await store.get("c/0", PROTO, byte_range)
        assert result is not None
        assert result.to_bytes() == expected
        # The member's bytes, plus at most its 30-byte local header the first time.
        assert sum(requested) - len(expected) in (0, 30)
    store.close()


async def test_byte_ranges_of_compressed_members(tmp_path: Path) -> None:
    store = ZipStore(tmp_path / "deflated.zip", mode="w", compression=zipfile.ZIP_DEFLATED)
    data = os.urandom(5000) + b"z" * 50_000
    await store.set("c/0", buf(data))
    cases: list[tuple[ByteRequest | None, bytes]] = [
        (RangeByteRequest(4990, 5010), data[4990:5010]),
        (SuffixByteRequest(3), data[-3:]),
        (OffsetByteRequest(54_990), data[54_990:]),
        (None, data),
    ]
    for byte_range, expected in cases:
        result = await store.get("c/0", PROTO, byte_range)
        assert result is not None
        assert result.to_bytes() == expected
    store.close()


# ------------------------------------------------------------------------- bad input


async def test_a_file_that_is_not_a_zip_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "not.zip"
    path.write_bytes(b"this is not a zip archive, just text" * 10)
    before = digest(path)
    for mode in ("r", "a"):
        store = ZipStore(path, mode=mode)
        with pytest.raises(zipfile.BadZipFile):
            await store.get("zarr.json", PROTO)
        if mode == "a":
            with pytest.raises(zipfile.BadZipFile):
                await store.set("zarr.json", buf(b"{}"))
        store.close()
    assert digest(path) == before


async def test_a_truncated_zip_is_recovered_and_a_reader_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "cut.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(20):
            archive.writestr(f"c/{i}", value_of(i))
    path.write_bytes(path.read_bytes()[:-40])  # part of the central directory is gone
    before = digest(path)
    with pytest.warns(UserWarning, match="damaged.*Recovered 20 entries"):
        store = await ZipStore.open(path, mode="r")
    assert [await store.get(f"c/{i}", PROTO) for i in range(20)] == [
        buf(value_of(i)) for i in range(20)
    ]
    await store.aclose()
    assert digest(path) == before


@pytest.mark.parametrize(
    "bad_name",
    [
        "../escape",
        "/etc/passwd",
        "a/../../b",
        "a\\..\\b",
        "a\x00/../x",
        "a/" + "b" * 300,  # a segment over 255 bytes
        "/".join(["b" * 200] * 6),  # a key over 1024 bytes
    ],
)
async def test_a_member_with_an_escaping_name_is_refused(tmp_path: Path, bad_name: str) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("zarr.json", b"{}")
        info = zipfile.ZipInfo("placeholder")
        info.filename = bad_name  # zipfile would tidy the name; an attacker's tool would not
        archive.writestr(info, b"gotcha")
    before = digest(path)
    with pytest.raises(ValueError, match="not a safe key"):
        await ZipStore.open(path, mode="r")
    with pytest.raises(ValueError, match="not a safe key"):
        await ZipStore.open(path, mode="a")
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


async def test_writes_to_a_read_only_zip_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ro.zip"
    async with ZipStore(path, mode="w") as writer:
        await writer.set("zarr.json", buf(b"{}"))
    before = digest(path)
    reader = await ZipStore.open(path, mode="r")
    assert reader.read_only
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: reader.set("c/0", buf(b"x")),
        lambda: reader.set_if_not_exists("c/0", buf(b"x")),
        lambda: reader.delete("zarr.json"),
        lambda: reader.delete_dir(""),
        lambda: reader.clear(),
        lambda: reader.rewrite(),
    ]
    for write in writes:
        with pytest.raises(ValueError, match="read-only"):
            await write()
    with pytest.raises(ValueError, match="read-only"):
        reader.set_sync("c/0", buf(b"x"))
    await reader.aclose()
    assert digest(path) == before


async def test_mode_x_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "exists.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("zarr.json", b"{}")
    before = digest(path)
    with pytest.raises(FileExistsError):
        await ZipStore.open(path, mode="x")
    assert digest(path) == before


def test_bad_mode_and_path_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        ZipStore(tmp_path / "a.zip", mode="rw")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path"):
        ZipStore(42)  # type: ignore[arg-type]


# --------------------------------------------------------------- overwrites and deletes


async def test_writing_a_key_twice_the_newest_wins_without_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "twice.zip"
    store = ZipStore(path, mode="w")
    await store.set("c/0", buf(b"first"))
    with warnings.catch_warnings():
        # zipfile warns "Duplicate name"; here the directory lists one member per key.
        warnings.simplefilter("error")
        await store.set("c/0", buf(b"second"))
    got = await store.get("c/0", PROTO)
    assert got is not None
    assert got.to_bytes() == b"second"
    assert [key async for key in store.list()] == ["c/0"]
    await store.rewrite()
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["c/0"]
        assert archive.read("c/0") == b"second"


async def test_deleted_keys_are_hidden_at_once_and_gone_after_close(tmp_path: Path) -> None:
    path = tmp_path / "deletes.zip"
    store = ZipStore(path, mode="w")
    await store.set_many([("a/0", buf(b"0")), ("a/1", buf(b"1")), ("b/0", buf(b"2"))])
    await store.delete("a/0")
    assert not await store.exists("a/0")
    assert await store.get("a/0", PROTO) is None
    assert sorted([key async for key in store.list()]) == ["a/1", "b/0"]
    await store.delete_dir("b")
    assert [key async for key in store.list()] == ["a/1"]
    await store.set("a/0", buf(b"back"))  # a deleted key can be written again
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["a/0", "a/1"]
        assert archive.read("a/0") == b"back"


def test_an_unclosed_writable_store_warns_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "forgotten.zip"
    store = ZipStore(path, mode="w")
    store.set_sync("zarr.json", buf(b"{}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del store
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    with zipfile.ZipFile(path) as archive:
        assert archive.read("zarr.json") == b"{}"


# ------------------------------------------------------------------------- with zarr


def test_a_thousand_chunk_array_through_zarr_and_back(tmp_path: Path) -> None:
    path = tmp_path / "array.zip"
    data = np.arange(40_000, dtype="int32").reshape(200, 200)
    with ZipStore(path, mode="w") as store:
        array = zarr.create_array(
            store=store, shape=data.shape, chunks=(20, 2), dtype="int32", compressors=None
        )
        assert array.nchunks == 1000
        array[:] = data
    with ZipStore(path, mode="r") as store:
        np.testing.assert_array_equal(zarr.open_array(store=store, mode="r")[:], data)
    with zarr.storage.ZipStore(path, mode="r") as theirs:
        np.testing.assert_array_equal(zarr.open_array(store=theirs, mode="r")[:], data)


def test_a_zip_written_by_zarr_reads_with_ours(tmp_path: Path) -> None:
    path = tmp_path / "theirs.zip"
    data = np.linspace(0, 1, 500)
    with zarr.storage.ZipStore(path, mode="w") as theirs:
        zarr.create_array(store=theirs, shape=data.shape, chunks=(50,), dtype="float64")[:] = data
    with ZipStore(path, mode="r") as ours:
        np.testing.assert_array_equal(zarr.open_array(store=ours, mode="r")[:], data)


async def test_an_externally_zipped_hierarchy_lists_like_the_other_stores(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "foo.zarr"
    root = zarr.open_group(store=str(folder), mode="w")
    root.create_group("sub").create_array("x", shape=(3,), dtype="int8")[:] = [1, 2, 3]
    archive = shutil.make_archive(str(folder), "zip", folder)  # has folder entries
    with zipfile.ZipFile(archive) as raw:
        assert any(name.endswith("/") for name in raw.namelist())
    store = ZipStore(archive, mode="r")
    keys = sorted([key async for key in store.list()])
    assert keys == ["sub/x/c/0", "sub/x/zarr.json", "sub/zarr.json", "zarr.json"]
    assert [name async for name in store.list_dir("")] == ["sub", "zarr.json"]
    assert [name async for name in store.list_dir("sub")] == ["x", "zarr.json"]
    await store.aclose()

    def read() -> Any:
        with ZipStore(archive, mode="r") as zipped:
            return zarr.open_group(store=zipped, mode="r")["sub/x"][:]  # type: ignore[index]

    np.testing.assert_array_equal(await anyio.to_thread.run_sync(read), [1, 2, 3])


# ------------------------------------------------------- reads from the page cache, on the loop


class ThreadReads:
    """Counts the reads a ZipStore makes in worker threads."""

    def __init__(self, store: ZipStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = store._read_blocking

        def counted(key: str, byte_range: Any) -> bytes | None:
            self.calls += 1
            return real(key, byte_range)

        monkeypatch.setattr(store, "_read_blocking", counted)


VALUE = b"0123456789"
# Linux reads what is in the page cache on the event loop (RWF_NOWAIT). Where the system cannot
# (macOS, Windows, the portable mode of the tests) the documented weaker behaviour holds
# instead: every read goes to a thread. The tests below assert whichever this system promises.
READS_ON_LOOP = _oscalls.RWF_NOWAIT is not None


async def one_value_zip(
    path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> tuple[ZipStore, ThreadReads]:
    """A new ZipStore holding ``c/0`` = `VALUE`, and a count of its reads in threads from now."""
    store = ZipStore(path, mode="w", **kwargs)
    await store.set("c/0", buf(VALUE))
    return store, ThreadReads(store, monkeypatch)


async def test_cached_stored_members_are_read_without_a_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, threads = await one_value_zip(tmp_path / "cached.zip", monkeypatch)
    value = await store.get("c/0", PROTO, RangeByteRequest(2, 5))
    assert value is not None
    assert value.to_bytes() == b"234"
    assert await store.get("c/missing", PROTO) is None
    assert threads.calls == (0 if READS_ON_LOOP else 2)
    store.close()


async def test_reads_over_a_mebibyte_go_to_a_thread_even_when_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ZipStore(tmp_path / "big.zip", mode="w")
    big = os.urandom(1 << 20) + b"!"
    await store.set("big", buf(big))
    threads = ThreadReads(store, monkeypatch)
    value = await store.get("big", PROTO)
    assert value is not None
    assert value.to_bytes() == big
    assert threads.calls == 1
    value = await store.get("big", PROTO, RangeByteRequest(0, 1 << 20))
    assert value is not None
    # A mebibyte is still read on the loop (in a thread where no read is made on the loop).
    assert threads.calls == (1 if READS_ON_LOOP else 2)
    store.close()


async def test_reads_that_would_wait_for_the_disk_go_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, threads = await one_value_zip(tmp_path / "cold.zip", monkeypatch)

    def not_in_the_page_cache(*args: Any) -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(_oscalls, "read_into", not_in_the_page_cache)
    value = await store.get("c/0", PROTO)
    assert value is not None
    assert value.to_bytes() == VALUE
    assert threads.calls == 1
    store.close()


async def test_reads_on_the_loop_hold_a_token_or_wait_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, threads = await one_value_zip(tmp_path / "limited.zip", monkeypatch, max_concurrency=1)
    taken, done = anyio.Event(), anyio.Event()

    async def hold_the_token() -> None:
        async with store.limiter:
            taken.set()
            await done.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_the_token)
        await taken.wait()
        # Every token is taken: the read waits for one, in the queue for a thread hop.
        with anyio.move_on_after(0.05) as waited:
            await store.get("c/0", PROTO)
        assert waited.cancelled_caught
        done.set()
    assert store.limiter.statistics().borrowed_tokens == 0
    value = await store.get("c/0", PROTO)
    assert value is not None
    assert value.to_bytes() == VALUE
    # The cancelled read never reached a thread, and this one was made on the loop (in a thread
    # where no read is made on the loop).
    assert threads.calls == (0 if READS_ON_LOOP else 1)
    store.close()
