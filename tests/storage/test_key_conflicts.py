"""Stores whose keys are paths: a key where a folder of keys is, or below a key, is refused with
the same clear error everywhere (naming both keys and the store), nothing is lost, and a folder
that holds no key is as if it were not there.

LocalStore's own cases, with its file-system details, are in local/test_local_conflicts.py; here
the same promise is held to by every store over a tree of files: ObjectStore over obstore's local
store, FsspecStore over fsspec's local and memory file systems, and LocalStore beside them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

from zarr_anyio import (
    AnyioStore,
    FolderIsAKey,
    FsspecStore,
    KeyConflict,
    KeyIsAFolder,
    LocalStore,
    ObjectStore,
)

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def _obstore_local(root: Path) -> AnyioStore:
    from obstore.store import LocalStore as ObstoreLocal

    root.mkdir()
    return ObjectStore(ObstoreLocal(root))


def _fsspec_local(root: Path) -> AnyioStore:
    import fsspec

    root.mkdir()
    return FsspecStore(fsspec.filesystem("file", auto_mkdir=True), path=str(root))


def _fsspec_memory(root: Path) -> AnyioStore:
    import fsspec

    return FsspecStore(fsspec.filesystem("memory"), path=f"/{uuid.uuid4().hex}")


KINDS: dict[str, Callable[[Path], AnyioStore]] = {
    "local": lambda root: LocalStore(root),
    "obstore-local": _obstore_local,
    "fsspec-local": _fsspec_local,
    "fsspec-memory": _fsspec_memory,
}


@pytest.fixture(params=list(KINDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AnyioStore:
    return KINDS[str(request.param)](tmp_path / "root")


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


async def value(store: AnyioStore, key: str) -> bytes | None:
    got = await store.get(key, PROTO)
    return None if got is None else got.to_bytes()


async def test_a_key_where_a_folder_of_keys_is_is_refused_and_nothing_is_lost(
    store: AnyioStore,
) -> None:
    await store.set("x/y", buf(b"below"))
    with pytest.raises(KeyIsAFolder) as raised:
        await store.set("x", buf(b"over"))
    assert isinstance(raised.value, KeyConflict)
    assert (raised.value.key, raised.value.other) == ("x", "x/y")
    assert "'x'" in str(raised.value)
    assert "'x/y'" in str(raised.value)
    assert await value(store, "x/y") == b"below"
    assert await value(store, "x") is None
    assert not await store.exists("x")


async def test_a_key_below_a_key_is_refused_and_nothing_is_lost(store: AnyioStore) -> None:
    await store.set("p", buf(b"key"))
    with pytest.raises(FolderIsAKey) as raised:
        await store.set("p/q", buf(b"below"))
    assert (raised.value.key, raised.value.other) == ("p/q", "p")
    assert await value(store, "p") == b"key"
    assert await value(store, "p/q") is None


async def test_a_folder_that_held_keys_does_not_block_a_key_of_its_name(
    store: AnyioStore,
) -> None:
    await store.set("a/c/0", buf(b"chunk"))
    await store.delete("a/c/0")
    await store.set("a", buf(b"value"))
    assert await value(store, "a") == b"value"
    assert [key async for key in store.list_prefix("a")] == ["a"]
