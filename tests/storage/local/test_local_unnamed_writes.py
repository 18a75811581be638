"""A LocalStore's write made as a file with no name in the key's folder, named once written
(Linux's ``O_TMPFILE``): while it is written nothing of it has a name anywhere, a key that
exists keeps its old value until the new one replaces it whole, and where there are no unnamed
files (the portable mode runs this file too, or a file system that refuses them) the write goes
through a named temporary file instead, with the same outcome."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from zarr.core.buffer import cpu
from zarr.core.sync import sync

import zarr_anyio.storage._localfs
from zarr_anyio import LocalStore
from zarr_anyio.storage import _oscalls
from zarr_anyio.storage._localfs import TEMP_FOLDER


def every_file(root: Path) -> list[str]:
    """Every file under ``root``, hidden ones and our temporary folder's included."""
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _, names in os.walk(root)
        for name in names
    )


class Paused:
    """Stands in for the disk's write of one piece: once `armed`, the first piece of a value is
    written, then the write waits until `resume`, so a test can look at the root mid-write."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.mid_write = threading.Event()
        self._resume = threading.Event()
        real: Callable[[int, memoryview], int] = zarr_anyio.storage._localfs._write_piece

        def piece(fd: int, data: memoryview) -> int:
            written = real(fd, data)
            if self.armed:
                self.mid_write.set()
                assert self._resume.wait(30)
            return written

        monkeypatch.setattr(zarr_anyio.storage._localfs, "_write_piece", piece)

    def resume(self) -> None:
        self._resume.set()


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> Iterator[Paused]:
    pause = Paused(monkeypatch)
    yield pause
    pause.resume()


def write_in_thread(action: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # handed to the test
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_the_system_has_unnamed_files_where_expected() -> None:
    # Linux has them (and /proc); only the portable mode goes without. Checked so that the
    # tests below cannot pass on the fallback alone where the fast path should run.
    assert (not _oscalls.PORTABLE) == _oscalls.UNNAMED_FILES


@pytest.mark.parametrize("exists", [False, True], ids=["new key", "key that exists"])
def test_a_value_being_written_has_no_name_until_it_is_whole(
    tmp_path: Path, paused: Paused, exists: bool
) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    if exists:
        store.set_sync("c/0/1", cpu.Buffer.from_bytes(b"old" * 1000))
    before = every_file(root)
    paused.armed = True
    value = os.urandom(3 << 20)  # three pieces: the write pauses after the first
    thread, errors = write_in_thread(lambda: store.set_sync("c/0/1", cpu.Buffer.from_bytes(value)))
    try:
        assert paused.mid_write.wait(30)
        during = every_file(root)
        if _oscalls.UNNAMED_FILES:
            # A third of the value is on disk, under no name at all.
            assert during == before
        else:
            (temp,) = set(during) - set(before)
            assert temp.startswith(TEMP_FOLDER + os.sep)
        if exists:
            assert (root / "c/0/1").read_bytes() == b"old" * 1000
        else:
            assert not (root / "c/0/1").exists()
    finally:
        paused.resume()
        thread.join(30)
    assert not errors
    assert (root / "c/0/1").read_bytes() == value
    assert every_file(root) == ["c/0/1"]


def test_set_if_not_exists_loses_to_a_value_written_meanwhile(
    tmp_path: Path, paused: Paused
) -> None:
    # The first value to be named stands: the slower writer's whole value is dropped.
    root = tmp_path / "root"
    store = LocalStore(root)
    slow = os.urandom(2 << 20)
    paused.armed = True
    thread, errors = write_in_thread(
        lambda: sync(store.set_if_not_exists("k", cpu.Buffer.from_bytes(slow)))
    )
    try:
        assert paused.mid_write.wait(30)
        (root / "k").write_bytes(b"first")
    finally:
        paused.resume()
        thread.join(30)
    assert not errors
    assert (root / "k").read_bytes() == b"first"
    assert every_file(root) == ["k"]


@pytest.mark.parametrize("exists", [False, True], ids=["new key", "key that exists"])
def test_a_file_system_that_refuses_unnamed_files_gets_a_named_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    # Some file systems (and kernels before 3.11) refuse O_TMPFILE: the write goes the other
    # way, whole, in a single call and in a batch.
    refused: list[int] = []

    def refuse(folder: int, mode: int = 0o666) -> int:
        refused.append(folder)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(_oscalls, "open_unnamed_at", refuse)
    root = tmp_path / "root"
    store = LocalStore(root)
    if exists:
        store.set_sync("a/1", cpu.Buffer.from_bytes(b"old"))
        store.set_sync("b/1", cpu.Buffer.from_bytes(b"old"))
    refused.clear()
    store.set_sync("a/1", cpu.Buffer.from_bytes(b"one"))
    store._set_many_blocking(
        [("b/1", memoryview(b"two")), ("b/2", memoryview(b"three"))],
        zarr_anyio.storage._localfs.no_cancel_check,
    )
    assert len(refused) == (3 if _oscalls.UNNAMED_FILES else 0)
    assert every_file(root) == ["a/1", "b/1", "b/2"]
    assert [(root / key).read_bytes() for key in ("a/1", "b/1", "b/2")] == [
        b"one",
        b"two",
        b"three",
    ]


def test_a_replaced_key_keeps_no_other_name(tmp_path: Path) -> None:
    # Replacing names the written file in the temporary folder, then moves it: neither that
    # name nor the folder outlives the write, in a single call or in a batch.
    root = tmp_path / "root"
    store = LocalStore(root)
    for round_ in range(3):
        store.set_sync("c/0", cpu.Buffer.from_bytes(f"single {round_}".encode()))
        store._set_many_blocking(
            [(f"c/{i}", memoryview(f"batch {round_} {i}".encode())) for i in range(1, 4)],
            zarr_anyio.storage._localfs.no_cancel_check,
        )
        assert every_file(root) == ["c/0", "c/1", "c/2", "c/3"]
    assert (root / "c/0").read_bytes() == b"single 2"
    assert (root / "c/3").read_bytes() == b"batch 2 3"
    assert not (root / TEMP_FOLDER).exists()


@pytest.fixture
def other_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A root whose folder ``m`` is another file system: a tmpfs mounted there (as root), or,
    elsewhere, a folder whose files cannot be named in the root's temporary folder (`EXDEV`,
    as the kernel answers across file systems)."""
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root / "m")])
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root / "m")], check=True)
        return
    real = _oscalls.name_unnamed_at

    def name_unnamed_at(fd: int, target: str, target_folder: int) -> None:
        if os.readlink(f"/proc/self/fd/{target_folder}").endswith(TEMP_FOLDER):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real(fd, target, target_folder)

    monkeypatch.setattr(_oscalls, "name_unnamed_at", name_unnamed_at)
    yield root


@pytest.mark.parametrize("how", ["single", "batch"])
def test_a_key_replaced_on_another_file_system_is_written_once_under_no_name(
    other_file_system: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The file made with no name in the key's folder cannot be named in the root's temporary
    # folder (another file system): it is named beside the key for the instant before it
    # moves, not written a second time into a named file there, which a writer killed
    # meanwhile would leave for ever (no open cleans the key's folders).
    root = other_file_system
    store = LocalStore(root)
    store.set_sync("m/k", cpu.Buffer.from_bytes(b"old"))
    seen: list[list[str]] = []
    written = [0]
    real: Callable[[int, memoryview], int] = zarr_anyio.storage._localfs._write_piece

    def piece(fd: int, data: memoryview) -> int:
        seen.append(every_file(root))
        count = real(fd, data)
        written[0] += count
        return count

    monkeypatch.setattr(zarr_anyio.storage._localfs, "_write_piece", piece)
    value = os.urandom(3 << 20)
    if how == "single":
        store.set_sync("m/k", cpu.Buffer.from_bytes(value))
    else:
        store._set_many_blocking(
            [("m/k", memoryview(value)), ("m/new", memoryview(b"new"))],
            zarr_anyio.storage._localfs.no_cancel_check,
        )
    assert (root / "m/k").read_bytes() == value
    expected = ["m/k"] if how == "single" else ["m/k", "m/new"]
    assert every_file(root) == expected
    if _oscalls.UNNAMED_FILES:
        assert written[0] == len(value) + (0 if how == "single" else 3)
        assert all(files in (["m/k"], expected) for files in seen), seen


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A root whose folder ``c`` (holding the key ``c/0``) cannot be written: a read-only bind
    mount (as root, to whom permissions are no obstacle), or, elsewhere, a folder of mode 555."""
    root = tmp_path / "root"
    LocalStore(root).set_sync("c/0", cpu.Buffer.from_bytes(b"old"))
    folder = root / "c"
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            yield root
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    folder.chmod(0o555)
    try:
        yield root
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("key", ["c/0", "c/1"], ids=["key that exists", "new key"])
@pytest.mark.parametrize("how", ["single", "batch", "if not exists"])
def test_a_folder_that_cannot_be_written_refuses_the_write_naming_the_key(
    read_only_folder: Path, key: str, how: str
) -> None:
    # The unnamed file cannot be made there: the folder's own error (EROFS, EACCES), naming
    # the key and the store, and nothing changed or left anywhere.
    root = read_only_folder
    store = LocalStore(root)
    value = cpu.Buffer.from_bytes(b"new")

    def write() -> None:
        if how == "single":
            store.set_sync(key, value)
        elif how == "batch":
            store._set_many_blocking(
                [("d/0", memoryview(b"d")), (key, memoryview(b"new"))],
                zarr_anyio.storage._localfs.no_cancel_check,
            )
        else:
            sync(store.set_if_not_exists(key, value))

    if how == "if not exists" and key == "c/0":
        write()  # the key exists: nothing to write, nothing refused
    else:
        with pytest.raises(OSError, match=f"cannot write key '{key}'") as raised:
            write()
        assert raised.value.errno in (errno.EROFS, errno.EACCES)
        assert str(root) in str(raised.value)
    assert (root / "c/0").read_bytes() == b"old"
    assert every_file(root) == (["c/0", "d/0"] if how == "batch" else ["c/0"])
