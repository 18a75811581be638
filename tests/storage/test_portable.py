"""The stores on systems without Linux's optional file calls (macOS, Windows), shown on Linux.

The detection itself (`zarr_anyio.storage._oscalls`): an interpreter whose ``os`` lacks what
Windows' Python lacks imports the package and uses both file stores, without being told.
What Linux cannot show, a double stands in for: Windows refuses to replace a file that another
program holds open.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype

import zarr_anyio.storage._beneath
from support import TOP
from zarr_anyio import LocalStore, ZipStore
from zarr_anyio.storage import _oscalls

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> Buffer:
    return cpu.Buffer.from_bytes(data)


# ------------------------------------------------------------ a Python without the optional calls

WITHOUT_OPTIONAL_CALLS = textwrap.dedent(
    """
    import mmap, os, sys, zipfile

    # The libraries the package uses come first: what is under test is the package's own use.
    import anyio, numpy, zarr, zarr.storage
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import cpu, default_buffer_prototype

    # What Windows' Python lacks (and macOS' lacks in part), taken out of this one.
    sys.modules["fcntl"] = None  # "import fcntl" raises ImportError
    for name in [n for n in dir(os) if n.startswith("RWF_")] + [
        "pread", "preadv", "pwrite", "pwritev", "fchmod", "register_at_fork",
        "O_PATH", "O_NOFOLLOW", "O_DIRECTORY", "O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC",
    ]:
        delattr(os, name)
    os.supports_dir_fd.clear()
    del mmap.MAP_ANONYMOUS, mmap.MAP_PRIVATE

    import zarr_anyio
    from zarr_anyio.storage import _oscalls

    assert "ZARR_ANYIO_PORTABLE" not in os.environ  # found, not told
    assert not _oscalls.PORTABLE and not _oscalls.DIR_FD and not _oscalls.FILE_LOCKS
    assert _oscalls.RWF_NOWAIT is None

    proto = default_buffer_prototype()
    big, small = os.urandom(1 << 20), os.urandom(4096)

    async def main(root):
        for store in (
            zarr_anyio.LocalStore(f"{root}/local"),
            zarr_anyio.ZipStore(f"{root}/data.zip", mode="w"),
        ):
            async with store:
                await store.set("c/0/0", cpu.Buffer.from_bytes(big))
                await store.set("c/0/1", cpu.Buffer.from_bytes(small))
                assert (await store.get("c/0/0", proto)).to_bytes() == big
                assert (await store.get("c/0/1", proto)).to_bytes() == small
                part = await store.get("c/0/0", proto, RangeByteRequest(1000, 5000))
                assert part.to_bytes() == big[1000:5000]
                assert sorted([k async for k in store.list()]) == ["c/0/0", "c/0/1"]
                if store.supports_deletes:
                    await store.delete("c/0/1")
                    assert await store.get("c/0/1", proto) is None
        # What we wrote, as others read it.
        with open(f"{root}/local/c/0/0", "rb") as file:
            assert file.read() == big
        with zipfile.ZipFile(f"{root}/data.zip") as theirs:
            assert theirs.read("c/0/0") == big and theirs.testzip() is None

    for backend in ("asyncio", "trio"):
        anyio.run(main, f"{sys.argv[1]}/{backend}", backend=backend)

    # A whole array through zarr's own API, on each store.
    expected = numpy.arange(64 * 64).reshape(64, 64)
    for store in (
        zarr_anyio.LocalStore(f"{sys.argv[1]}/array"),
        zarr_anyio.ZipStore(f"{sys.argv[1]}/array.zip", mode="w"),
    ):
        array = zarr.create_array(store=store, shape=(64, 64), chunks=(16, 16), dtype="int32")
        array[:] = expected
        assert (array[:] == expected).all()
        store.close()
    print("ok")
    """
)


def test_without_the_optional_calls_the_package_imports_and_the_file_stores_work(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ZARR_ANYIO_PORTABLE"}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPTIONAL_CALLS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(TOP)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ------------------------------------------------- Windows: a file held open cannot be replaced


def open_in_this_process(path: str) -> bool:
    """Whether a descriptor of this process is open on ``path`` (Linux's /proc says)."""
    real = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == real:
                return True
        except OSError:
            pass  # closed since it was listed
    return False


class HeldOpen:
    """Stands in for Windows' ``os.replace``: it refuses (``PermissionError``, as Windows
    does) to move a file that is open, here or in a reader of another program (`hold`), or to
    replace one, and counts its tries."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: set[str] = set()
        self.tries = 0
        self._real = os.replace
        monkeypatch.setattr(_oscalls, "_os_replace", self)
        # Windows has no folder handles (every write goes through the path calls) and moves no
        # open file (writers close theirs first).
        monkeypatch.setattr(zarr_anyio.storage._beneath, "DIR_FD", False)
        monkeypatch.setattr(_oscalls, "OPEN_FILES_MOVE", False)

    def __call__(self, source: str, target: str) -> None:
        self.tries += 1
        if os.path.realpath(target) in self.held or any(
            open_in_this_process(path) for path in (source, target)
        ):
            raise PermissionError(13, "Access is denied", target)
        self._real(source, target)

    def hold(self, path: Path) -> None:
        self.held.add(os.path.realpath(path))

    def release(self, path: Path) -> None:
        self.held.discard(os.path.realpath(path))


@pytest.fixture
def held_open(monkeypatch: pytest.MonkeyPatch) -> HeldOpen:
    return HeldOpen(monkeypatch)


async def test_a_write_waits_out_a_reader_that_holds_the_file_open(
    tmp_path: Path, held_open: HeldOpen
) -> None:
    store = LocalStore(tmp_path)
    await store.set("k", buf(b"old"))
    held_open.hold(tmp_path / "k")
    # The reader lets go after a moment, as a reader of one chunk does.
    timer = threading.Timer(0.03, held_open.release, [tmp_path / "k"])
    timer.start()
    try:
        await store.set("k", buf(b"new"))
    finally:
        timer.join()
    assert (tmp_path / "k").read_bytes() == b"new"
    assert held_open.tries > 2  # refused at least once, then done
    # The temporary file was closed before it moved (else the double, as Windows, refuses).
    await store.set("k", buf(b"newer"))
    assert (tmp_path / "k").read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["k"]  # no temporary file left


async def test_a_write_against_a_reader_that_never_lets_go_fails_clearly(
    tmp_path: Path, held_open: HeldOpen
) -> None:
    store = LocalStore(tmp_path)
    await store.set("k", buf(b"old"))
    held_open.hold(tmp_path / "k")
    with pytest.raises(PermissionError, match="another program holds it open") as caught:
        await store.set("k", buf(b"new"))
    assert held_open.tries == 1 + _oscalls.REPLACE_TRIES
    assert str(tmp_path / "k") in str(caught.value)
    # The old value whole, and no temporary file left behind.
    assert (tmp_path / "k").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["k"]


async def test_a_zip_rewrite_closes_the_archive_before_replacing_it(
    tmp_path: Path, held_open: HeldOpen
) -> None:
    # A delete makes the store rewrite the archive at close: a copy replaces the file that the
    # store itself holds open, which Windows (as the double) refuses.
    path = tmp_path / "data.zip"
    store = ZipStore(path, mode="w")
    await store.set("a", buf(b"1" * 1000))
    await store.set("b", buf(b"2" * 1000))
    await store.delete("a")
    await store.aclose()
    assert held_open.tries == 1
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["b"]
        assert archive.read("b") == b"2" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip"]
    reader = ZipStore(path, mode="r")
    value = await reader.get("b", PROTO)
    assert value is not None
    assert value.to_bytes() == b"2" * 1000
    await reader.aclose()


def test_file_locks_where_the_system_has_them_and_none_in_portable_mode(tmp_path: Path) -> None:
    path = tmp_path / "locked"
    path.write_bytes(b"")
    first, second = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        if not _oscalls.FILE_LOCKS:
            # The tests' portable mode: no locks, and callers told so (they judge by age).
            assert _oscalls.try_lock(first) is None
            return
        assert _oscalls.try_lock(first, shared=True) is True
        assert _oscalls.try_lock(second, shared=True) is True  # readers share
        assert _oscalls.try_lock(second) is False  # a writer waits for the other reader
        os.close(first)
        first = -1
        assert _oscalls.try_lock(second) is True  # closing let go
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
