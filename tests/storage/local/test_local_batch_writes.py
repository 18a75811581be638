"""LocalStore's batch of writes (`_set_many_blocking`, what the codec pipeline writes through):
the folders are opened once for the batch, yet each write is what `set` would do, whatever
changes under the batch between two writes."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import zarr.storage
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync

import zarr_anyio.storage._localfs
from zarr_anyio import KeyConflict, LocalStore
from zarr_anyio.storage import _oscalls
from zarr_anyio.storage._localfs import TEMP_FOLDER, no_cancel_check

PROTO = default_buffer_prototype()


def stored(root: Path) -> dict[str, bytes]:
    """Every key and value, as zarr's own LocalStore sees them (it would list ours too)."""
    theirs = zarr.storage.LocalStore(root)

    async def collect() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        async for key in theirs.list():
            value = await theirs.get(key, PROTO)
            assert value is not None
            found[key] = value.to_bytes()
        return found

    return sync(collect())


def opened(root: Path) -> LocalStore:
    store = LocalStore(root)
    sync(store._ensure_open())
    return store


def test_a_batch_writes_and_deletes_in_order(tmp_path: Path) -> None:
    store = opened(tmp_path)
    sync(store.set("c/5", cpu.Buffer.from_bytes(b"old")))
    items: list[tuple[str, memoryview | None]] = [
        (f"c/{i}/{j}", memoryview(f"{i}.{j}".encode())) for i in range(3) for j in range(3)
    ]
    items += [("c/5", None), ("c/0/0", memoryview(b"again")), ("top", memoryview(b"t"))]
    store._set_many_blocking(items, no_cancel_check)
    expected = {f"c/{i}/{j}": f"{i}.{j}".encode() for i in range(3) for j in range(3)}
    expected |= {"c/0/0": b"again", "top": b"t"}
    assert stored(tmp_path) == expected
    assert not (tmp_path / TEMP_FOLDER).exists()  # no trace of ours once the batch is over


def test_each_value_is_written_before_the_next_is_taken(tmp_path: Path) -> None:
    # The pipeline hands one reused buffer again and again.
    store = opened(tmp_path)
    reused = bytearray(4096)

    def items() -> Iterator[tuple[str, memoryview | None]]:
        for i in range(20):
            reused[:] = bytes([i]) * len(reused)
            yield f"c/{i}", memoryview(reused)

    store._set_many_blocking(items(), no_cancel_check)
    assert stored(tmp_path) == {f"c/{i}": bytes([i]) * 4096 for i in range(20)}


def test_conflicts_in_a_batch_raise_as_a_single_write_would(tmp_path: Path) -> None:
    store = opened(tmp_path)
    with pytest.raises(KeyConflict, match="'x/y'"):
        store._set_many_blocking(
            [("x", memoryview(b"1")), ("x/y", memoryview(b"2"))], no_cancel_check
        )
    with pytest.raises(KeyConflict, match="'a'"):
        store._set_many_blocking(
            [("a/b", memoryview(b"1")), ("a", memoryview(b"2"))], no_cancel_check
        )
    # A folder holding only empty folders is no key's: a key of its name replaces it.
    (tmp_path / "e" / "f").mkdir(parents=True)
    store._set_many_blocking([("e", memoryview(b"3"))], no_cancel_check)
    assert stored(tmp_path) == {"x": b"1", "a/b": b"1", "e": b"3"}
    assert not (tmp_path / TEMP_FOLDER).exists()


def test_folders_removed_under_a_batch_are_made_again(tmp_path: Path) -> None:
    # Between two writes another writer empties the key's folder (its folder goes with its last
    # key) and, done, removes the temporary folder the batch holds open. A key that exists is
    # replaced through that folder; a new one needs it only where there are no unnamed files.
    store = opened(tmp_path)
    other = opened(tmp_path)
    sync(
        store.set_many(
            [("x/1", cpu.Buffer.from_bytes(b"old")), ("x/2", cpu.Buffer.from_bytes(b"old"))]
        )
    )

    def items() -> Iterator[tuple[str, memoryview | None]]:
        yield "a/b/1", memoryview(b"1")
        sync(other.delete("a/b/1"))
        assert not (tmp_path / "a").exists()
        yield "a/b/2", memoryview(b"2")
        assert (tmp_path / TEMP_FOLDER).exists() == (not _oscalls.UNNAMED_FILES)
        yield "x/1", memoryview(b"new")
        os.rmdir(tmp_path / TEMP_FOLDER)
        yield "x/2", memoryview(b"new")
        yield "a/b/3", memoryview(b"3")
        sync(other.delete("a/b/2"))
        sync(other.delete("a/b/3"))
        yield "a/b/4", memoryview(b"4")

    store._set_many_blocking(items(), no_cancel_check)
    assert stored(tmp_path) == {"a/b/4": b"4", "x/1": b"new", "x/2": b"new"}
    assert not (tmp_path / TEMP_FOLDER).exists()


class Stop(Exception):
    pass


def test_a_batch_stopped_mid_write_leaves_old_values_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened(tmp_path)
    sync(store.set("c/1", cpu.Buffer.from_bytes(b"old")))
    monkeypatch.setattr(zarr_anyio.storage._localfs, "WRITE_PIECE", 1 << 16)
    checks: list[None] = []

    def check_cancelled() -> None:
        checks.append(None)
        if len(checks) > 6:  # one before each item, one after each piece: in the second value
            raise Stop

    value = memoryview(bytes(range(256)) * 1024)  # four pieces
    with pytest.raises(Stop):
        store._set_many_blocking([("c/0", value), ("c/1", value)], check_cancelled)
    assert stored(tmp_path) == {"c/0": bytes(value), "c/1": b"old"}
    assert not (tmp_path / TEMP_FOLDER).exists()


@contextlib.contextmanager
def descriptors_to_spare(count: int) -> Iterator[None]:
    """While it lasts, this process may open only ``count`` more files (RLIMIT_NOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + count, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_batch_keeps_few_folders_open_however_many_its_keys_have(tmp_path: Path) -> None:
    # Each key in a folder of its own (an array chunked by rows): a batch held every folder it
    # had opened to its end, one descriptor each, and ran out of them (EMFILE).
    store = opened(tmp_path)
    items = [(f"c/{i}/0", memoryview(b"%d" % i)) for i in range(1000)]
    items += [("c/5/0", memoryview(b"again")), ("c/999/1", memoryview(b"last"))]
    with descriptors_to_spare(64):
        store._set_many_blocking(items, no_cancel_check)
    expected = {f"c/{i}/0": b"%d" % i for i in range(1000)}
    assert stored(tmp_path) == expected | {"c/5/0": b"again", "c/999/1": b"last"}
