"""LocalStore, where a key is a path: a key where a folder of keys is (or the reverse) is
refused with an error naming both keys and the store, and nothing is lost; a folder that holds
no key (emptied by deletes, or left by others) is as if it were not there: not listed, and no
obstacle to a key of its name. Errors of refused writes name the store's root and the key, never
a temporary file of ours."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

import zarr_anyio.storage._localfs
from support import unprivileged
from zarr_anyio import KeyConflict, LocalStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()
TOP = Path(__file__).resolve().parent.parent


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


async def value(store: LocalStore, key: str) -> bytes | None:
    got = await store.get(key, PROTO)
    return None if got is None else got.to_bytes()


def everything(root: Path) -> list[str]:
    """Every name under the root, ours included (nothing of ours may be left behind)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def listed(store: LocalStore, prefix: str) -> list[str]:
    return sorted([name async for name in store.list_dir(prefix)])


# ------------------------------------------------------------- a key where a folder of keys is


@pytest.mark.parametrize("exclusive", [False, True])
async def test_a_key_where_a_folder_of_keys_is_is_refused_naming_both(
    tmp_path: Path, exclusive: bool
) -> None:
    store = LocalStore(tmp_path)
    await store.set("x/y", buf(b"kept"))
    with pytest.raises(IsADirectoryError) as refused:
        if exclusive:
            await store.set_if_not_exists("x", buf(b"new"))
        else:
            await store.set("x", buf(b"new"))
    error = refused.value
    assert isinstance(error, KeyConflict)
    assert (error.key, error.other) == ("x", "x/y")
    message = str(error)
    assert "'x'" in message
    assert "'x/y'" in message
    assert str(tmp_path) in message
    assert ".zarr_anyio" not in message
    assert await value(store, "x/y") == b"kept"
    assert not await store.exists("x")
    assert everything(tmp_path) == ["x", "x/y"]


async def test_a_key_where_a_folder_of_keys_is_through_the_sync_surface(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.set_sync("x/y/z", buf(b"kept"))
    with pytest.raises(KeyConflict, match="'x/y/z'"):
        store.set_sync("x", buf(b"new"))
    assert store.get_sync("x/y/z") is not None


@pytest.mark.parametrize(("existing", "key"), [("p", "p/q"), ("p", "p/q/r"), ("p/q", "p/q/r/s")])
async def test_a_key_below_a_key_is_refused_naming_both(
    tmp_path: Path, existing: str, key: str
) -> None:
    store = LocalStore(tmp_path)
    await store.set(existing, buf(b"kept"))
    before = everything(tmp_path)
    with pytest.raises(NotADirectoryError) as refused:
        await store.set(key, buf(b"new"))
    error = refused.value
    assert isinstance(error, KeyConflict)
    assert (error.key, error.other) == (key, existing)
    assert repr(key) in str(error)
    assert repr(existing) in str(error)
    assert str(tmp_path) in str(error)
    assert await value(store, existing) == b"kept"
    assert everything(tmp_path) == before


async def test_a_folder_that_holds_other_files_but_no_key_is_not_removed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / "pipe")  # not a key, and not ours to remove
    assert await listed(store, "") == []
    with pytest.raises(IsADirectoryError, match="no key") as refused:
        await store.set("f", buf(b"new"))
    assert isinstance(refused.value, KeyConflict)
    assert (tmp_path / "f" / "pipe").exists()


# ------------------------------------------------------------------ folders that hold no key


async def test_deleting_the_last_key_under_a_folder_removes_it_from_listings(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    await store.set("a/zarr.json", buf(b"{}"))
    await store.set("a/c/0/0", buf(b"chunk"))
    await store.delete("a/c/0/0")
    assert await listed(store, "a") == ["zarr.json"]
    assert await listed(store, "") == ["a"]
    await store.delete("a/zarr.json")
    assert await listed(store, "") == []
    assert [key async for key in store.list()] == []
    # And from the disk: zarr's own LocalStore on the same folder sees no trace either.
    assert everything(tmp_path) == []


@pytest.mark.parametrize("key", ["a", "a/c"])
async def test_an_emptied_folder_does_not_block_a_key_of_its_name(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path)
    await store.set("a/c/0", buf(b"chunk"))
    await store.delete("a/c/0")
    await store.set(key, buf(b"value"))
    assert await value(store, key) == b"value"
    await store.set_if_not_exists(key, buf(b"other"))  # a no-op: the key exists
    assert await value(store, key) == b"value"


@pytest.mark.parametrize("exclusive", [False, True])
async def test_an_empty_folder_left_by_someone_else_is_as_if_absent(
    tmp_path: Path, exclusive: bool
) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "d" / "e").mkdir(parents=True)
    store = LocalStore(tmp_path)
    await store.set("d/e/k", buf(b"1"))
    assert await listed(store, "") == ["d"]
    assert await listed(store, "a") == []
    if exclusive:
        await store.set_if_not_exists("a", buf(b"value"))
    else:
        await store.set("a", buf(b"value"))
    assert await value(store, "a") == b"value"
    assert await listed(store, "") == ["a", "d"]


async def test_delete_dir_leaves_no_emptied_folders_above(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.set("g/a/c/0", buf(b"1"))
    await store.set("g/a/c/1", buf(b"2"))
    await store.delete_dir("g/a/c")
    assert await listed(store, "") == []
    assert everything(tmp_path) == []
    await store.set("g", buf(b"a key now"))
    assert await value(store, "g") == b"a key now"


async def test_a_link_to_an_emptied_folder_is_not_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to("real")
    await store.set("other", buf(b"1"))
    assert await listed(store, "") == ["other"]
    await store.set("alias/k", buf(b"2"))
    assert await listed(store, "") == ["alias", "other", "real"]


# ------------------------------------------------------------------ errors that say where


CHILD = r"""
import json, sys
from zarr.core.buffer import cpu
from zarr_anyio import LocalStore

store = LocalStore(sys.argv[1])
try:
    store.set_sync(sys.argv[2], cpu.Buffer.from_bytes(b"refused"))
except OSError as error:
    print(json.dumps([type(error).__name__, error.errno, str(error)]))
else:
    print(json.dumps(None))
"""


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A store's root in the system's temporary folder, which the child can reach (pytest's
    folders are private to their user), someone else's; the test sets its modes."""
    root = Path(tempfile.mkdtemp(prefix="zarr-anyio-local-"))
    (root / "a").mkdir()
    (root / "a" / "b").write_bytes(b"kept")
    unprivileged.give_away(root, root / "a", root / "a" / "b")
    try:
        yield root
    finally:
        for folder in (root, root / "a"):
            folder.chmod(0o755)
        shutil.rmtree(root)


@pytest.mark.parametrize(
    ("root_mode", "folder_mode", "key"),
    [
        (0o777, 0o555, "a/c"),  # the key's folder refuses: the rename into it fails
        (0o555, 0o555, "a/c"),  # the root refuses our temporary folder
        (0o777, 0o555, "a/new/c"),  # a folder to make, in a folder that refuses
    ],
)
def test_a_refused_write_names_the_root_and_the_key(
    shared_root: Path, root_mode: int, folder_mode: int, key: str
) -> None:
    """Checked in a child that file permissions bind (see `unprivileged`)."""
    unprivileged.restrict(shared_root / "a", folder_mode)
    unprivileged.restrict(shared_root, root_mode)
    done = unprivileged.run(CHILD, str(shared_root), key, timeout=60)
    kind, code, message = json.loads(done.stdout)
    assert kind == "PermissionError"
    assert code == errno.EACCES
    assert repr(key) in message
    assert str(shared_root) in message
    assert ".zarr_anyio" not in message
    assert "\\" not in message  # our temporary names hold one
    assert (shared_root / "a" / "b").read_bytes() == b"kept"
    assert sorted(p.name for p in shared_root.iterdir()) == ["a"]


def test_writers_and_deleters_racing_on_one_folder_never_fail(tmp_path: Path) -> None:
    """Deletes remove the folders they empty while other writes are making their way into
    them: a write whose folder vanished under it starts again, it never fails for that."""
    store = LocalStore(tmp_path)
    errors: list[BaseException] = []
    rounds = 400

    def churn(name: str) -> None:
        try:
            for i in range(rounds):
                key = f"a/b/c/{name}{i}"
                store.set_sync(key, buf(b"v"))
                assert store.get_sync(key) is not None
                store.delete_sync(key)
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(name,)) for name in "xyz"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert everything(tmp_path) == []


@pytest.mark.parametrize("prefix", ["c", "c/0"])
async def test_a_key_written_into_a_folder_delete_dir_is_emptying_stays_and_nothing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    # Another writer's key lands in the folder after `delete_dir` listed it: that write came
    # after the delete, so its key stays, and the delete, which could not remove the folder
    # holding it, does not fail (it raised ENOTEMPTY, naming no key nor store).
    root = tmp_path / "root"
    store = LocalStore(root)
    await store.set_many([("c/0/0", buf(b"a")), ("c/0/1", buf(b"b")), ("d", buf(b"d"))])
    real = zarr_anyio.storage._localfs._unlink_at
    late = LocalStore(root)

    def unlink_at(name: str, dir_fd: int | str) -> None:
        if not late_written:
            late_written.append(True)
            late.set_sync("c/0/9", buf(b"late"))
        real(name, dir_fd)

    late_written: list[bool] = []
    monkeypatch.setattr(zarr_anyio.storage._localfs, "_unlink_at", unlink_at)
    await store.delete_dir(prefix)
    assert late_written
    assert sorted([key async for key in store.list()]) == ["c/0/9", "d"]
    assert await value(store, "c/0/9") == b"late"
    assert everything(root) == ["c", "c/0", "c/0/9", "d"]
