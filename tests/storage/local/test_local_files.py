"""LocalStore against what others can put in its folder: links, FIFOs, long names, a crash, a full
disk, and long calls that must stop when cancelled."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import zarr.storage
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
from zarr.core.sync import sync

import zarr_anyio.storage._beneath
import zarr_anyio.storage._local
import zarr_anyio.storage._localfs
from support import TOP
from zarr_anyio import LocalStore
from zarr_anyio.storage import LeavesRoot, _oscalls
from zarr_anyio.storage._localfs import TEMP_FOLDER, TEMP_PREFIX

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> Buffer:
    return cpu.Buffer.from_bytes(data)


async def collect(iterator: Any) -> list[str]:
    return sorted([item async for item in iterator])


@pytest.fixture(params=["openat2", "walk", "paths"] if _oscalls.DIR_FD else ["paths"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test of links runs with the kernel's openat2, with the walk of folder handles used
    without it, and with the walk of paths used where there are no folder handles (Windows; the
    only one in the tests' portable mode, which has no openat2 nor handles)."""
    if request.param == "openat2":
        assert (
            zarr_anyio.storage._beneath.openat2_available()
        )  # this machine's kernel has it (>= 5.6)
    elif request.param == "walk":
        monkeypatch.setattr(zarr_anyio.storage._beneath, "_openat2_works", False)
    else:
        monkeypatch.setattr(zarr_anyio.storage._beneath, "DIR_FD", False)
    return str(request.param)


# ------------------------------------------------------------------------------ links


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A root whose links lead out of it, every way a link can, and the folder they lead to."""
    outside = tmp_path / "outside"
    (outside / "dir" / "inner").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    (outside / "dir" / "f").write_bytes(b"outside f")
    (outside / "dir" / "inner" / "g").write_bytes(b"outside g")
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "kept").write_bytes(b"kept")
    (root / "file_link").symlink_to("../outside/secret")
    (root / "abs_link").symlink_to(outside / "secret")
    (root / "dir_link").symlink_to("../outside/dir")
    (root / "abs_dir_link").symlink_to(outside / "dir")
    (root / "a" / "up").symlink_to("../../outside")
    (root / "a" / "proc").symlink_to("/proc/self/root/etc")
    return root, outside


def outside_is_intact(outside: Path) -> None:
    assert (outside / "secret").read_bytes() == b"secret"
    assert (outside / "dir" / "f").read_bytes() == b"outside f"
    assert (outside / "dir" / "inner" / "g").read_bytes() == b"outside g"
    assert sorted(p.name for p in (outside / "dir").iterdir()) == ["f", "inner"]
    assert sorted(p.name for p in (outside / "dir" / "inner").iterdir()) == ["g"]


ESCAPING_KEYS = [
    "file_link",
    "abs_link",
    "dir_link/f",
    "abs_dir_link/f",
    "dir_link/inner/g",
    "a/up/secret",
    "a/up/dir/f",
    "a/proc/hostname",
]


async def test_no_read_or_listing_goes_out_of_the_root_through_a_link(
    planted: tuple[Path, Path], resolver: str
) -> None:
    root, outside = planted
    store = LocalStore(root)
    for key in ESCAPING_KEYS:
        assert await store.get(key, PROTO) is None, key
        assert store.get_sync(key) is None, key
        assert not await store.exists(key), key
        with pytest.raises(FileNotFoundError):
            await store.getsize(key)
    values = await store.get_partial_values(PROTO, [(key, None) for key in ESCAPING_KEYS])
    assert values == [None] * len(ESCAPING_KEYS)
    assert await collect(store.list()) == ["a/kept"]
    assert await collect(store.list_prefix("dir_link")) == []
    assert await collect(store.list_dir("")) == ["a"]
    assert await collect(store.list_dir("a")) == ["kept"]
    assert await collect(store.list_dir("dir_link")) == []
    assert await store.getsize_prefix("a") == 4
    outside_is_intact(outside)


async def test_no_write_or_delete_goes_out_of_the_root_through_a_link(
    planted: tuple[Path, Path], resolver: str
) -> None:
    root, outside = planted
    store = LocalStore(root)
    for key in ["dir_link/new", "abs_dir_link/new", "a/up/dir/new", "dir_link/inner/new/deeper"]:
        with pytest.raises(LeavesRoot, match="leads out of the store's root"):
            await store.set(key, buf(b"x"))
        with pytest.raises(PermissionError, match="leads out of the store's root"):
            store.set_sync(key, buf(b"x"))
        with pytest.raises(LeavesRoot):
            await store.set_if_not_exists(key, buf(b"x"))
    for key in ["dir_link/f", "abs_dir_link/f", "a/up/secret", "dir_link/inner/g"]:
        await store.delete(key)
        store.delete_sync(key)
    for prefix in ["dir_link", "dir_link/inner", "abs_dir_link/inner", "a/up/dir", "a/up"]:
        await store.delete_dir(prefix)
    outside_is_intact(outside)
    # A link in the place of a key is a name in the root: writing the key replaces the link
    # (not what it points to), deleting it removes the link.
    await store.set("file_link", buf(b"new"))
    assert (root / "file_link").read_bytes() == b"new"
    assert not (root / "file_link").is_symlink()
    await store.delete("abs_link")
    assert not (root / "abs_link").is_symlink()
    outside_is_intact(outside)
    await store.clear()
    assert sorted(p.name for p in root.iterdir()) == []
    outside_is_intact(outside)


async def test_moving_a_store_copies_its_links_without_following_them(
    planted: tuple[Path, Path], resolver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = planted
    cross_device(monkeypatch)
    store = LocalStore(root)
    await store.move(tmp_path / "moved")
    assert (tmp_path / "moved" / "dir_link").is_symlink()
    assert not root.exists()
    assert await store.get("dir_link/f", PROTO) is None
    assert (await collect(store.list())) == ["a/kept"]
    outside_is_intact(outside)


async def test_links_that_stay_inside_the_root_are_followed(tmp_path: Path, resolver: str) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    await store.set("data/x", buf(b"x value"))
    (root / "alias").symlink_to("data")
    (root / "x_link").symlink_to("data/x")
    (root / "data" / "back").symlink_to("../data/x")
    (root / "data" / "loop").symlink_to("..")  # a folder that contains itself, through a link
    (root / "absolute").symlink_to(root / "data" / "x")  # refused: an absolute path
    for key in ["alias/x", "x_link", "data/back", "data/loop/data/x"]:
        value = await store.get(key, PROTO)
        assert value is not None, key
        assert value.to_bytes() == b"x value"
        assert await store.exists(key)
        assert await store.getsize(key) == 7
    assert await store.get("absolute", PROTO) is None
    # Keys through links are listed too, up to where a link leads back to a folder being listed.
    listed = await collect(store.list())
    assert listed == ["alias/back", "alias/x", "data/back", "data/x", "x_link"]
    assert await collect(store.list_dir("")) == ["alias", "data", "x_link"]
    # Writes through an inside link land where it points; deleting the link's node removes
    # the link, not the folder it names.
    await store.set("alias/y", buf(b"y"))
    assert (root / "data" / "y").read_bytes() == b"y"
    await store.delete_dir("alias")
    assert not (root / "alias").exists()
    assert (root / "data" / "x").read_bytes() == b"x value"


async def test_loops_and_long_chains_of_links_are_absent(tmp_path: Path, resolver: str) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    await store.set("x", buf(b"x"))
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    (root / "link0").symlink_to("x")
    for i in range(1, 45):  # the kernel gives up after 40 links in one resolution
        (root / f"link{i}").symlink_to(f"link{i - 1}")
    (root / "d").mkdir()
    (root / "d" / "up").symlink_to("../d/../x")  # climbs, but never above the root
    assert await store.get("a", PROTO) is None
    assert await store.get("a/x", PROTO) is None
    assert store.get_sync("b") is None
    assert (await store.get("link30", PROTO)).to_bytes() == b"x"  # type: ignore[union-attr]
    assert await store.get("link44", PROTO) is None
    assert (await store.get("d/up", PROTO)).to_bytes() == b"x"  # type: ignore[union-attr]
    assert "link44" not in await collect(store.list())
    with pytest.raises(OSError, match="Too many levels"):
        await store.set("a/new", buf(b"x"))


# ------------------------------------------------------------------ FIFOs and other non-files


@contextlib.contextmanager
def unblocks_after(fifo: Path, seconds: float) -> Iterator[None]:
    """Opens the FIFO for writing after ``seconds``, so a reader stuck opening it returns and
    the test fails instead of hanging."""
    done = threading.Event()

    def unblock() -> None:
        if not done.wait(seconds):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


async def test_a_fifo_or_a_socket_is_no_key_and_never_blocks(tmp_path: Path, resolver: str) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    await store.set("c/1", buf(b"one"))
    os.mkfifo(root / "c" / "0")
    (root / "c" / "fifo_link").symlink_to("0")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "c" / "sock"))
    try:
        with unblocks_after(root / "c" / "0", 5), anyio.fail_after(4):
            for key in ["c/0", "c/fifo_link", "c/sock"]:
                assert await store.get(key, PROTO) is None
                assert store.get_sync(key) is None
                assert not await store.exists(key)
                with pytest.raises(FileNotFoundError):
                    await store.getsize(key)
            values = await store.get_partial_values(PROTO, [("c/0", None), ("c/1", None)])
            assert values[0] is None
            assert values[1] is not None
            assert await collect(store.list()) == ["c/1"]
            assert await collect(store.list_dir("c")) == ["1"]
            assert await store.getsize_prefix("c") == 3
    finally:
        listener.close()


async def test_a_read_stuck_on_a_fifo_no_longer_exists_to_cancel(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "0")
    store = LocalStore(root)
    with unblocks_after(root / "0", 5):
        with anyio.move_on_after(2) as scope:
            await store.get("0", PROTO)
        assert not scope.cancelled_caught


# ---------------------------------------------------------------------- temporary files


async def test_a_key_with_a_255_byte_segment_round_trips(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    long_key = "a/" + "x" * 255
    other = "b/" + "é" * 127  # 254 bytes of UTF-8
    await store.set(long_key, buf(b"long"))
    await store.set_if_not_exists(other, buf(b"other"))
    store.set_sync(long_key, buf(b"long, again"))
    value = await store.get(long_key, PROTO)
    assert value is not None
    assert value.to_bytes() == b"long, again"
    assert await collect(store.list()) == sorted([long_key, other])
    await store.delete(long_key)
    store.delete_sync(other)
    assert await collect(store.list()) == []


async def test_any_key_round_trips_and_only_names_no_key_can_spell_are_hidden(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    # Names like those of the library's files (as they were, or are, but for the backslash).
    keys = [".__zarr_anyio_tmp__/x", ".__zarr_anyio_tmp__.k", ".__zarr_anyio.x", ".zarr_anyio/tmp"]
    for key in keys:
        await store.set(key, buf(key.encode()))
    store.set_sync(".zarr_anyio/tmp2", buf(b"sync"))
    keys.append(".zarr_anyio/tmp2")
    for key in keys:
        assert await store.exists(key)
        assert store.get_sync(key) is not None
    assert await collect(store.list()) == sorted(keys)
    assert await collect(store.list_dir("")) == [
        ".__zarr_anyio.x",
        ".__zarr_anyio_tmp__",
        ".__zarr_anyio_tmp__.k",
        ".zarr_anyio",
    ]
    # A name with a backslash is no key (no key may hold one): never listed.
    (root / ".zarr_anyio" / "a\\b").write_bytes(b"not a key")
    (root / "x\\").mkdir()
    (root / "x\\" / "y").write_bytes(b"not a key")
    assert await collect(store.list()) == sorted(keys)
    assert await collect(store.list_dir(".zarr_anyio")) == ["tmp", "tmp2"]
    for key in keys:
        await store.delete(key)
    assert await collect(store.list()) == []


async def test_writes_leave_no_trace_that_zarrs_own_store_would_list(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    await store.set_many((f"c/{i}", buf(bytes([i]) * 100)) for i in range(50))
    store.set_sync("zarr.json", buf(b"{}"))
    await store.set_if_not_exists("zarr.json", buf(b"not written"))
    theirs = zarr.storage.LocalStore(root)

    def their_listings() -> tuple[list[str], list[str]]:
        # zarr's store speaks asyncio only: ask it on zarr's own loop.
        return sync(collect(theirs.list_dir(""))), sync(collect(theirs.list()))

    names, keys = await anyio.to_thread.run_sync(their_listings)
    assert names == ["c", "zarr.json"]
    assert len(keys) == 51


def temp_files(root: Path) -> list[str]:
    folder = root / TEMP_FOLDER
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def age_temp_files(root: Path) -> None:
    """Make every temporary file older than `STALE_AFTER`: where there are no file locks, that
    is what tells a dead writer's file (see `_oscalls.FILE_LOCKS`)."""
    then = time.time() - 2 * zarr_anyio.storage._localfs.STALE_AFTER
    for name in temp_files(root):
        os.utime(root / TEMP_FOLDER / name, (then, then))


def plant_temp(root: Path, age: float = 0.0) -> Path:
    (root / TEMP_FOLDER).mkdir(parents=True, exist_ok=True)
    path = root / TEMP_FOLDER / f"{TEMP_PREFIX}{os.urandom(8).hex()}"
    path.write_bytes(b"half a value")
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


async def test_a_writable_open_removes_temporaries_of_dead_writers_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    await LocalStore(root).set("k", buf(b"v"))
    dead = plant_temp(root)
    live = plant_temp(root)
    with open(live, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as a writer in another process holds its file
        reader = await LocalStore.open(root, read_only=True)
        assert await reader.get("k", PROTO) is not None
        assert temp_files(root) == sorted([dead.name, live.name])  # a reader removes nothing
        await LocalStore.open(root)
        if _oscalls.FILE_LOCKS:
            assert temp_files(root) == [live.name]
        else:
            # No file locks (the tests' portable mode): the documented weaker rule, a file
            # younger than STALE_AFTER may be a live writer's, so both stay until they age.
            assert temp_files(root) == sorted([dead.name, live.name])
            age_temp_files(root)
    LocalStore(root).set_sync("k2", buf(b"v"))  # the sync surface opens the store too
    assert temp_files(root) == []
    assert not (root / TEMP_FOLDER).exists()


@pytest.mark.parametrize("how", ["set", "batch"])
async def test_a_write_makes_the_temporary_folder_again_when_another_process_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # Another process, its writes done, removes the root's temporary folder (empty) right after
    # this one made it for a write: seen with dask's worker processes writing one folder store.
    # The key exists, so that the write needs that folder even where a new key's does not
    # (`_localfs._write_unnamed`).
    root = tmp_path / "root"
    store = LocalStore(root)
    await store.set("zarr.json", buf(b"{}"))
    await store.set("c/0", buf(b"old"))
    mkdir = _oscalls.mkdir_at
    removed: list[str] = []

    def made_then_removed(name: str, folder: Any) -> None:
        mkdir(name, folder)
        if name == TEMP_FOLDER and len(removed) < 3:
            removed.append(name)
            os.rmdir(root / TEMP_FOLDER)

    monkeypatch.setattr(_oscalls, "mkdir_at", made_then_removed)
    value = memoryview(b"value")
    if how == "set":
        await store.set("c/0", buf(bytes(value)))
    else:
        await anyio.to_thread.run_sync(
            store._set_many_blocking, [("c/0", value)], zarr_anyio.storage._localfs.no_cancel_check
        )
    assert removed == [TEMP_FOLDER] * 3
    got = await store.get("c/0", PROTO)
    assert got is not None
    assert got.to_bytes() == b"value"
    assert temp_files(root) == []


async def test_cleaning_up_while_writing_takes_no_file_in_use(tmp_path: Path) -> None:
    # Writable opens (here, of other stores of the same root) clean up while writes go on.
    root = tmp_path / "root"
    store = LocalStore(root)
    stop = threading.Event()
    cleanups = 0

    def clean_up_again_and_again() -> None:
        nonlocal cleanups
        while not stop.is_set():
            LocalStore(root).set_sync("other", buf(b"o"))
            cleanups += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, clean_up_again_and_again)
        try:
            for round_ in range(10):
                await store.set_many((f"c/{i}", buf(b"v" * 1000)) for i in range(50))
                async with anyio.create_task_group() as writers:
                    for i in range(10):
                        writers.start_soon(store.set_if_not_exists, f"x/{round_}", buf(b"%d" % i))
        finally:
            stop.set()
    assert cleanups > 0
    assert len(await collect(store.list())) == 50 + 10 + 1
    assert temp_files(root) == []


async def test_without_file_locks_only_old_temporaries_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    root = tmp_path / "root"
    root.mkdir()
    old = plant_temp(root, age=2 * zarr_anyio.storage._localfs.STALE_AFTER)
    recent = plant_temp(root, age=60)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    await LocalStore.open(root)
    assert temp_files(root) == [recent.name]
    assert not old.exists()
    # Writes go on without a lock, as they do on a file system that has none.
    store = LocalStore(root)
    await store.set("k", buf(b"v"))
    assert (root / "k").read_bytes() == b"v"


# --------------------------------------------------------------------------- a writer killed

WRITER = textwrap.dedent(
    """
    import hashlib, os, sys, anyio
    import zarr_anyio.storage._local
    from zarr.core.buffer import cpu
    from zarr_anyio import LocalStore

    root, mode, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = LocalStore(root)

    def value(key, generation):
        size = (1 + (generation * 7 + len(key)) % 4) << 20
        body = hashlib.sha256(f"{key}:{generation}".encode()).digest() * (size // 32)
        return f"{generation:08d}".encode() + body

    if mode == "stall":
        # Write one piece of a value and stop there, so the kill lands mid-write.
        def stall(fd, piece):
            written = os.write(fd, piece)
            print("mid-write", flush=True)
            import time; time.sleep(60)
            return written
        zarr_anyio.storage._localfs._write_piece = stall

    async def main():
        generation = first
        while True:
            for key in ("k0", "k1", "a/k2", "a/b/k3"):
                await store.set(key, cpu.Buffer.from_bytes(value(key, generation)))
            print(f"wrote {generation}", flush=True)
            generation += 1

    if mode == "sync":
        generation = first
        while True:
            for key in ("k0", "k1", "a/k2", "a/b/k3"):
                store.set_sync(key, cpu.Buffer.from_bytes(value(key, generation)))
            print(f"wrote {generation}", flush=True)
            generation += 1
    anyio.run(main, backend="trio" if mode == "trio" else "asyncio")
    """
)


def expected_value(key: str, generation: int) -> bytes:
    import hashlib

    size = (1 + (generation * 7 + len(key)) % 4) << 20
    body = hashlib.sha256(f"{key}:{generation}".encode()).digest() * (size // 32)
    return f"{generation:08d}".encode() + body


def run_writer(
    root: Path, mode: str, first: int, kill_after: Callable[[subprocess.Popen[str]], None]
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), mode, str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TOP)},
    )
    try:
        kill_after(writer)
    finally:
        writer.kill()
        writer.wait(timeout=10)


def test_a_writer_killed_at_any_moment_leaves_whole_values_and_no_temporaries(
    tmp_path: Path,
) -> None:
    import random

    root = tmp_path / "root"
    keys = ["a/b/k3", "a/k2", "k0", "k1"]
    store = LocalStore(root)
    for key in keys:
        store.set_sync(key, buf(expected_value(key, 0)))
    seed = int.from_bytes(os.urandom(4))
    rounds = random.Random(seed)
    # Printed, and in every assertion's message: a failure can be replayed with this seed.
    print(f"kill moments from random.Random({seed})")
    left_behind = 0

    def check() -> None:
        nonlocal left_behind
        left_behind += len(temp_files(root))
        listed = sorted(anyio.run(lambda: collect(LocalStore(root, read_only=True).list())))
        assert listed == keys, f"seed {seed}"
        for key in keys:
            data = (root / key).read_bytes()
            generation = int(data[:8])
            assert data == expected_value(key, generation), f"{key} is torn (seed {seed})"
        if not _oscalls.FILE_LOCKS:
            # No file locks (the tests' portable mode): a killed writer's file is removed once
            # it is STALE_AFTER old, the documented weaker rule.
            age_temp_files(root)
        LocalStore(root).set_sync("k0", buf(expected_value("k0", 0)))  # a writable open
        assert temp_files(root) == [], f"seed {seed}"

    def kill_at_random(writer: subprocess.Popen[str]) -> None:
        assert writer.stdout is not None
        writer.stdout.readline()  # one round written: the interpreter is warm
        time.sleep(rounds.uniform(0.0, 0.15))
        writer.send_signal(signal.SIGKILL)

    for generation, mode in enumerate(["asyncio", "trio", "sync", "asyncio", "sync"], start=1):
        run_writer(root, mode, generation * 100, kill_at_random)
        check()

    def kill_mid_write(writer: subprocess.Popen[str]) -> None:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "mid-write\n"
        writer.send_signal(signal.SIGKILL)

    run_writer(root, "stall", 1000, kill_mid_write)
    # Killed with a piece of a value written: where files can be made with no name (Linux), the
    # kernel freed it with the writer, and nothing is left; elsewhere a temporary file is, until
    # a writable open removes it.
    assert len(temp_files(root)) == (0 if _oscalls.UNNAMED_FILES else 1)
    check()
    if not _oscalls.UNNAMED_FILES:
        assert left_behind >= 1


# ------------------------------------------------------------------------------ a full disk


async def test_a_full_disk_fails_the_write_and_keeps_the_old_value(small_disk: Path) -> None:
    store = LocalStore(small_disk / "root")
    old = b"old value" * 10_000
    await store.set("c/0", buf(old))
    big = buf(b"n" * (3 << 20))
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.set("c/0", big),
        lambda: anyio.to_thread.run_sync(store.set_sync, "c/0", big),
        lambda: store.set_if_not_exists("c/1", big),
        lambda: store.set_many([("c/2", big)]),
    ]
    for write in writes:
        with pytest.raises(OSError, match="No space left") as raised:
            await write()
        assert type(raised.value) is OSError
        assert raised.value.errno == errno.ENOSPC
        value = await store.get("c/0", PROTO)
        assert value is not None
        assert value.to_bytes() == old
        assert await collect(store.list()) == ["c/0"]
        assert temp_files(small_disk / "root") == []
    # The space the failed writes took is free again: a value that fits is written.
    await store.set("c/1", buf(b"small"))
    assert await collect(store.list()) == ["c/0", "c/1"]


# ------------------------------------------------------------- long calls, cancelled between files


class Gate:
    """Stands in for one blocking step: lets ``free`` steps through, then holds the next one
    until let go; counts the steps taken."""

    def __init__(self, step: Callable[..., Any], free: int) -> None:
        self.step = step
        self.free = free
        self.taken = 0
        self.holding = threading.Event()
        self.go_on = threading.Event()

    def __call__(self, *args: Any) -> Any:
        if self.taken == self.free:
            self.holding.set()
            assert self.go_on.wait(timeout=10)
        self.taken += 1
        return self.step(*args)


async def cancel_at_the_gate(gate: Gate, call: Callable[[], Any]) -> None:
    async def let_go() -> None:
        await anyio.wait_all_tasks_blocked()
        gate.go_on.set()

    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                assert await anyio.to_thread.run_sync(gate.holding.wait, 10)
                scope.cancel()
                outer.start_soon(let_go)
    assert scope.cancelled_caught


@pytest.mark.parametrize("prefix", ["c", ""])
async def test_a_cancelled_delete_dir_or_clear_stops_between_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    store = LocalStore(tmp_path / "root")
    keys = [f"c/{i // 100}/{i % 100}" for i in range(400)]
    await store.set_many((key, buf(key.encode() * 50)) for key in keys)
    gate = Gate(zarr_anyio.storage._localfs._unlink_at, free=50)
    monkeypatch.setattr(zarr_anyio.storage._localfs, "_unlink_at", gate)
    await cancel_at_the_gate(gate, lambda: store.delete_dir(prefix) if prefix else store.clear())
    assert gate.taken <= 51  # it stopped at the first check after the held file
    left = await collect(store.list())
    assert 400 - 51 <= len(left) <= 400 - 50
    for key in left:
        value = await store.get(key, PROTO)
        assert value is not None
        assert value.to_bytes() == key.encode() * 50
    monkeypatch.undo()
    await store.delete_dir(prefix)
    assert await collect(store.list()) == []


def cross_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make renames of a store's root fail as between two file systems."""

    def rename(source: Path, dest: Path) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source))

    monkeypatch.setattr(zarr_anyio.storage._localfs, "_rename", rename)


async def test_a_cancelled_move_across_file_systems_leaves_the_store_where_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    keys = [f"c/{i}" for i in range(200)]
    await store.set_many((key, buf(key.encode())) for key in keys)
    os.mkfifo(root / "c" / "fifo")  # not a key: left behind by a move
    cross_device(monkeypatch)
    gate = Gate(zarr_anyio.storage._localfs._copy_file, free=20)
    monkeypatch.setattr(zarr_anyio.storage._localfs, "_copy_file", gate)
    await cancel_at_the_gate(gate, lambda: store.move(tmp_path / "moved"))
    assert gate.taken <= 21
    assert store.root == root
    assert not (tmp_path / "moved").exists()
    assert await collect(store.list()) == sorted(keys)
    monkeypatch.setattr(zarr_anyio.storage._localfs, "_copy_file", gate.step)
    await store.move(tmp_path / "moved")
    assert store.root == tmp_path / "moved"
    assert not root.exists()
    assert await collect(store.list()) == sorted(keys)
    assert stat.S_ISREG((tmp_path / "moved" / "c" / "0").stat().st_mode)
