"""One writer per zip file: a ZipStore that writes holds an advisory lock on its archive, and a
second writer, in another process or in this one, is refused at once with what to do (two
appending to one file lose each other's keys). Readers are never refused."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

from zarr_anyio import ArchiveLocked, ZipStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()
TOP = Path(__file__).resolve().parent.parent

HOLDER = r"""
import sys
import anyio
from zarr.core.buffer import cpu
from zarr_anyio import ZipStore

async def main():
    store = ZipStore(sys.argv[1], mode="a")
    await store.set("theirs", cpu.Buffer.from_bytes(b"written by the other process"))
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)  # holds the store open until told
    await store.aclose()
    print("closed", flush=True)

anyio.run(main)
"""


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


@contextmanager
def other_writer(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process with a writable ZipStore open on ``path`` (one key written)."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(TOP), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)


def release(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline() == "closed\n"
    assert child.wait(timeout=60) == 0


async def test_a_second_writer_in_another_process_is_refused_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data.zip"
    with other_writer(path) as child:
        store = ZipStore(path, mode="a")
        with pytest.raises(ArchiveLocked) as refused:
            await store.set("mine", buf(b"x"))
        message = str(refused.value)
        assert str(path) in message
        assert "another ZipStore" in message
        assert "Close the other store first" in message
        assert "mode='r'" in message
        assert isinstance(refused.value, BlockingIOError)
        # A reader is not refused while the other writes.
        # (The other has not closed: the reader recovers what it wrote whole, and says so.)
        with pytest.warns(UserWarning, match="Recovered 1 entries"):
            async with ZipStore(path, mode="r") as reader:
                assert [key async for key in reader.list()] == ["theirs"]
        # Refused without touching the file: a failed open does not end the other's session.
        release(child)
    # Once the other closed, this store opens (the refusal left it usable) and both keys stay.
    await store.set("mine", buf(b"x"))
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["mine", "theirs"]


async def test_mode_w_does_not_empty_a_file_another_writer_holds(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    with other_writer(path) as child:
        with pytest.raises(ArchiveLocked):
            await ZipStore(path, mode="w").set("mine", buf(b"x"))
        release(child)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["theirs"]
        assert archive.read("theirs") == b"written by the other process"


async def test_two_writers_in_one_process_the_second_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data.zip"
    first = ZipStore(path, mode="a")
    await first.set("a", buf(b"1"))
    second = ZipStore(path, mode="a")
    with pytest.raises(ArchiveLocked):
        await second.set("b", buf(b"2"))
    # The first store's copies share its archive: they are no second writer.
    copy = first.with_read_only(read_only=False)
    await copy.set("c", buf(b"3"))
    await first.aclose()
    await second.set("b", buf(b"2"))
    await second.aclose()
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["a", "b", "c"]


async def test_the_lock_follows_the_archive_through_a_rewrite(tmp_path: Path) -> None:
    """A rewrite puts a new file in the archive's place: the lock must be on that one before
    it takes the name, or a second writer would find the new file unlocked."""
    path = tmp_path / "data.zip"
    store = ZipStore(path, mode="a")
    await store.set("a", buf(b"1"))
    await store.set("gone", buf(b"2"))
    await store.delete("gone")
    await store.rewrite()
    with pytest.raises(ArchiveLocked):
        await ZipStore(path, mode="a").set("b", buf(b"x"))
    await store.set("c", buf(b"3"))
    await store.aclose()
    async with ZipStore(path, mode="a") as after:
        await after.set("b", buf(b"x"))
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["a", "b", "c"]


async def test_the_lock_follows_the_archive_through_a_move(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    store = ZipStore(path, mode="a")
    await store.set("a", buf(b"1"))
    await store.move(tmp_path / "moved" / "data.zip")
    with pytest.raises(ArchiveLocked):
        await ZipStore(tmp_path / "moved" / "data.zip", mode="a").set("b", buf(b"x"))
    await store.aclose()
    async with ZipStore(tmp_path / "moved" / "data.zip", mode="a") as after:
        await after.set("b", buf(b"x"))


WRITER = r"""
import sys
import anyio
from zarr.core.buffer import cpu
from zarr_anyio import ZipStore
from zarr_anyio import ArchiveLocked

async def main():
    store = ZipStore(sys.argv[1], mode="a")
    try:
        await store.set(f"{sys.argv[2]}/0", cpu.Buffer.from_bytes(b"first"))
    except ArchiveLocked as error:
        print("refused:", error, flush=True)
        sys.exit(3)
    print("writing", flush=True)
    sys.stdin.readline()  # both started before either writes the rest
    for i in range(1, 50):
        await store.set(f"{sys.argv[2]}/{i}", cpu.Buffer.from_bytes(b"x" * i))
    await store.aclose()

anyio.run(main)
"""


def test_two_processes_writing_at_once_one_is_refused_and_the_other_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data.zip"
    env = {"PYTHONPATH": str(TOP), "PATH": "/usr/bin:/bin"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("one", "two")
    ]
    try:
        first_lines = [writer.stdout.readline() if writer.stdout else "" for writer in writers]
        for writer in writers:
            if writer.poll() is None and writer.stdin is not None:
                writer.stdin.write("go\n")
                writer.stdin.flush()
        codes = sorted(writer.wait(timeout=120) for writer in writers)
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    assert codes == [0, 3]
    refused = next(line for line in first_lines if line.startswith("refused:"))
    assert str(path) in refused
    winner = ["one", "two"][first_lines.index("writing\n")]
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted(f"{winner}/{i}" for i in range(50))
        assert archive.testzip() is None


async def test_a_reader_is_never_refused_and_takes_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    async with ZipStore(path, mode="w") as store:
        await store.set("a", buf(b"1"))
    reader = ZipStore(path, mode="r")
    assert (await reader.get("a", PROTO)) is not None
    read_only = ZipStore(path, mode="a", read_only=True)
    assert (await read_only.get("a", PROTO)) is not None
    async with ZipStore(path, mode="a") as writer:
        await writer.set("b", buf(b"2"))
    reader.close()
    read_only.close()
    await anyio.lowlevel.checkpoint()
