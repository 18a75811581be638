"""ZipStore against damage: flipped bytes, a full disk, kill -9, closing under load, cancellation,
tmpfs, and keys a zip cannot hold."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import cpu, default_buffer_prototype

from support import TOP
from support.zipdisk import SlowDisk, SmallDisk, small_disk
from zarr_anyio import ZipStore
from zarr_anyio.storage import _oscalls
from zarr_anyio.storage._zipformat import directory_record, member_record, write_all

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def read(store: ZipStore, key: str, byte_range: Any = None) -> bytes | None:
    value = await store.get(key, PROTO, byte_range)
    return None if value is None else value.to_bytes()


def data_start(path: Path, key: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(key)
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        header = file.read(30)
    name_length, extra_length = struct.unpack("<2H", header[26:30])
    return int(info.header_offset + 30 + name_length + extra_length)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x20]))


class ThreadReads:
    """Counts the reads a ZipStore makes in worker threads."""

    def __init__(self, store: ZipStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = store._read_blocking

        def counted(key: str, byte_range: Any) -> bytes | None:
            self.calls += 1
            return real(key, byte_range)

        monkeypatch.setattr(store, "_read_blocking", counted)


@pytest.fixture(params=["tmpfs", "ext4", "injected"])
def disk(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SmallDisk]:
    with small_disk(request.param, tmp_path, monkeypatch) as mounted:
        yield mounted


# ------------------------------------------------------------------ 1. CRC-32 on every read


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
async def test_a_flipped_byte_never_comes_back_from_any_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: int
) -> None:
    path = tmp_path / "flipped.zip"
    good, bad = pattern(1, 50_000), pattern(2, 50_000)
    async with ZipStore(path, mode="w", compression=compression) as store:
        await store.set("c/good", buf(good))
        await store.set("c/bad", buf(bad))
    flip_byte(path, data_start(path, "c/bad") + 100)

    store = ZipStore(path, mode="r")
    threads = ThreadReads(store, monkeypatch)
    # A whole read (on the event loop, from the page cache, when the member is stored).
    with pytest.raises(zipfile.BadZipFile, match=r"'c/bad' is damaged: Bad CRC-32") as caught:
        await read(store, "c/bad")
    assert str(path) in str(caught.value)
    if compression == zipfile.ZIP_STORED and _oscalls.RWF_NOWAIT is not None:
        # That was the read made on the loop (Linux only: elsewhere, and in the tests' portable
        # mode, it was made in a thread, as the next ones).
        assert threads.calls == 0
    # Byte ranges, even far from the flipped byte: the whole member is checked first.
    for byte_range in [
        RangeByteRequest(40_000, 40_010),
        SuffixByteRequest(5),
        OffsetByteRequest(0),
    ]:
        with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
            await read(store, "c/bad", byte_range)
    # Bulk reads and the sync surface, in threads.
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        await store.get_partial_values(PROTO, [("c/good", None), ("c/bad", None)])
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        store.get_sync("c/bad")
    # A read that cannot be made from the page cache goes to a thread: checked there too.
    monkeypatch.setattr(
        _oscalls, "read_into", lambda *args: (_ for _ in ()).throw(BlockingIOError())
    )
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        await read(store, "c/bad")
    assert await read(store, "c/good") == good
    assert await read(store, "c/good", RangeByteRequest(10, 20)) == good[10:20]
    await store.aclose()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
async def test_a_byte_range_reads_the_whole_member_once_per_opening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: int
) -> None:
    # docs/local.md: the first byte range of a member reads (inflates) all of it, to check its
    # CRC-32; later ranges of a compressed member decompress up to the end of the range.
    path = tmp_path / "ranges.zip"
    data = pattern(3, 200_000)
    async with ZipStore(path, mode="w", compression=compression) as store:
        await store.set("c/0", buf(data))
    store = ZipStore(path, mode="r")
    requested: list[int] = []
    real_pread, real_read_into = _oscalls.pread, _oscalls.read_into

    def pread(fd: int, length: int, offset: int) -> bytes:
        requested.append(length)
        return real_pread(fd, length, offset)

    def read_into(fd: int, buffer: Any, offset: int, flags: int = 0) -> int:
        requested.append(len(buffer))
        return real_read_into(fd, buffer, offset, flags)

    # Counted where the store calls the system, whichever calls this system has.
    monkeypatch.setattr(_oscalls, "pread", pread)
    monkeypatch.setattr(_oscalls, "read_into", read_into)
    await store._ensure_open()
    requested.clear()
    assert await read(store, "c/0", RangeByteRequest(1000, 1010)) == data[1000:1010]
    assert sum(requested) >= len(data)  # checked whole, once
    requested.clear()
    assert await read(store, "c/0", RangeByteRequest(5000, 5010)) == data[5000:5010]
    if compression == zipfile.ZIP_STORED:
        assert sum(requested) == 10  # then only the bytes asked for
    else:
        assert 10 < sum(requested) < 20_000  # from the start of the member to the range's end
    await store.aclose()


# ------------------------------------------------------------ 2-4. a full disk, and closing


async def test_a_write_that_fills_the_disk_leaves_the_old_value(disk: SmallDisk) -> None:
    path = disk.path / "full.zip"
    old = pattern(4, 20_000)
    store = ZipStore(path, mode="w")
    await store.set("c/0", buf(old))
    await store.set("c/1", buf(b"other"))
    disk.fill()
    with pytest.raises(OSError, match="No space left") as overwrite:
        await store.set("c/0", buf(pattern(5, 100_000)))
    assert overwrite.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left") as new_key:
        await store.set("c/new", buf(pattern(6, 100_000)))
    assert new_key.value.errno == errno.ENOSPC
    # In this session: the old value, and the failed key is nowhere.
    assert await read(store, "c/0") == old
    assert sorted([key async for key in store.list()]) == ["c/0", "c/1"]
    assert not await store.exists("c/new")
    assert await read(store, "c/new") is None
    disk.free()
    await store.aclose()
    # After reopening, with our store and with zipfile.
    async with ZipStore(path, mode="r") as reopened:
        assert await read(reopened, "c/0") == old
        assert sorted([key async for key in reopened.list()]) == ["c/0", "c/1"]
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert archive.read("c/0") == old


def new_keys(count: int) -> list[str]:
    # Long names, so the directory is bigger than what a real disk has left in its last block.
    return [f"group/array_with_a_long_name/c/0.0.{i}" for i in range(count)]


async def test_close_on_a_full_disk_raises_until_it_can_finish_and_keeps_the_old_archive(
    disk: SmallDisk,
) -> None:
    path = disk.path / "close.zip"
    async with ZipStore(path, mode="w") as first:
        await first.set_many([(f"old/{i}", buf(pattern(i, 1000))) for i in range(10)])
    old_archive = path.read_bytes()

    store = ZipStore(path, mode="a")
    await store.set_many([(key, buf(key.encode())) for key in new_keys(150)])
    disk.fill()
    with pytest.raises(OSError, match="No space left") as failed:
        await store.aclose()
    assert failed.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left"):
        store.close()  # a second close does not pretend it worked
    # The old archive is still there, byte for byte, and still reads as it was.
    now = path.read_bytes()
    assert now[: len(old_archive)] == old_archive
    with zipfile.ZipFile(io.BytesIO(now[: len(old_archive)])) as archive:
        assert archive.testzip() is None
        assert len(archive.namelist()) == 10
    # And the store still holds everything, for a retry.
    assert await read(store, new_keys(150)[-1]) == new_keys(150)[-1].encode()
    disk.free()
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted(
            [*(f"old/{i}" for i in range(10)), *new_keys(150)]
        )


async def test_a_deletion_is_not_undone_when_close_fails(disk: SmallDisk) -> None:
    path = disk.path / "deleted.zip"
    keys = new_keys(150)
    async with ZipStore(path, mode="w") as first:
        await first.set_many([(key, buf(key.encode())) for key in keys])
    store = ZipStore(path, mode="a")
    await store.delete(keys[0])
    await store.set("extra", buf(b"x" * 10_000))
    disk.fill()
    with pytest.raises(OSError, match="No space left"):
        await store.aclose()
    with pytest.raises(OSError, match="No space left"):
        await store.aclose()
    assert await read(store, keys[0]) is None
    assert keys[0] not in [key async for key in store.list()]
    disk.free()
    await store.aclose()
    async with ZipStore(path, mode="r") as reopened:
        assert await read(reopened, keys[0]) is None
        assert sorted([key async for key in reopened.list()]) == sorted([*keys[1:], "extra"])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert keys[0] not in archive.namelist()


async def test_when_only_the_rewrite_fails_the_deletion_is_in_the_directory(
    disk: SmallDisk,
) -> None:
    path = disk.path / "rewrite.zip"
    big = pattern(7, 200_000)
    async with ZipStore(path, mode="w") as first:
        await first.set("big", buf(big))
        await first.set("gone", buf(pattern(8, 100_000)))
    store = ZipStore(path, mode="a")
    await store.delete("gone")
    disk.fill(leave=40_000)  # room for a directory, not for a copy of the archive
    with pytest.raises(OSError, match="No space left") as failed:
        await store.aclose()
    assert failed.value.errno == errno.ENOSPC
    assert not [p for p in disk.path.iterdir() if p.name.startswith(".__zarr_anyio")]
    # The file is a whole archive without the deleted key, though its bytes are still in it.
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["big"]
        assert archive.read("big") == big
    size = path.stat().st_size
    disk.free()
    await store.aclose()  # the retry drops the deleted key's bytes
    assert path.stat().st_size < size - 100_000
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["big"]
        assert archive.testzip() is None


# --------------------------------------------------------------------- 5. kill -9, recovery


def test_a_writer_killed_in_its_first_member_leaves_a_file_the_next_writer_opens(
    tmp_path: Path,
) -> None:
    # Promise (docs/local.md, "A crash loses only what was not whole"). Killed before its first
    # member was whole, a new archive's writer left a local header and part of a value: every
    # later opening raised "not a zip file", so no writer could go on (CI, a loaded machine).
    path = tmp_path / "torn.zip"
    whole = io.BytesIO()
    with zipfile.ZipFile(whole, "w") as archive:
        archive.writestr("k0", b"x" * 100_000)
    path.write_bytes(whole.getvalue()[:50_000])  # the header and half the value
    with pytest.raises(zipfile.BadZipFile):  # read, there is no archive in it
        ZipStore(path, mode="r").get_sync("k0")
    store = ZipStore(path, mode="a")
    with pytest.warns(UserWarning, match="50000 bytes that hold no whole member"):
        missing = store.get_sync("k0")
    assert missing is None
    store.set_sync("k1", buf(b"after"))
    store.close()
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["k1"]
        assert archive.testzip() is None
    again = ZipStore(path, mode="r").get_sync("k1")
    assert again is not None
    assert again.to_bytes() == b"after"


WRITER = r"""
import os, random, sys, time
import anyio
from zarr.core.buffer import cpu
from zarr_anyio import ZipStore
from zarr_anyio.storage import _zipformat

path, session = sys.argv[1], int(sys.argv[2])

# A slow disk, so that most kills land in the middle of a write.
def write_at(fd, data, offset):
    time.sleep(0.0005)
    return os.pwrite(fd, data, offset)

_zipformat._write_at, _zipformat.PIECE = write_at, 1 << 16

def value(seq):
    rng = random.Random(session * 1_000_003 + seq)
    body = rng.randbytes(rng.choice([10, 5_000, 100_000, 1_000_000]))
    return f"{session}:{seq}:".encode() + body

async def main():
    store = ZipStore(path, mode="a")
    await store._ensure_open()
    print("ready", flush=True)
    seq = 0
    while True:
        await store.set(f"k{seq % 13}", cpu.Buffer.from_bytes(value(seq)))
        print(seq, flush=True)
        seq += 1
        if seq % 11 == 0:
            await store.aclose()

anyio.run(main)
"""


def written_value(session: int, seq: int) -> bytes:
    rng = random.Random(session * 1_000_003 + seq)
    body = rng.randbytes(rng.choice([10, 5_000, 100_000, 1_000_000]))
    return f"{session}:{seq}:".encode() + body


def test_a_writer_killed_at_random_moments_loses_only_what_was_not_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "killed.zip"
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    # What each key may hold: the last value whose write returned, or the one in flight.
    allowed: dict[str, set[bytes | None]] = {}
    for session in range(5):
        writer = subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", WRITER, str(path), str(session)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=TOP,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n", f"seed {seed}"
        threading.Event().wait(rng.uniform(0.02, 0.25))
        writer.send_signal(signal.SIGKILL)
        reported = [int(line) for line in writer.stdout.read().split() if line.isdigit()]
        writer.wait()
        for seq in reported:
            allowed[f"k{seq % 13}"] = {written_value(session, seq)}
        in_flight = reported[-1] + 1 if reported else 0
        key = f"k{in_flight % 13}"
        allowed[key] = allowed.get(key, {None}) | {written_value(session, in_flight)}

    async def check() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the last session may need recovering
            store = await ZipStore.open(path, mode="r")
        for key, values in allowed.items():
            assert await read(store, key) in values, f"seed {seed}, {key}"
        assert {key async for key in store.list()} <= set(allowed), f"seed {seed}"
        await store.aclose()

    before = digest(path)
    anyio.run(check)
    assert digest(path) == before  # mode="r" never writes
    # A writable opening repairs it: afterwards zipfile reads the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        repairing = ZipStore(path, mode="a")
        repairing.get_sync("k0")
        repairing.close()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None, f"seed {seed}"
        for name in archive.namelist():
            assert archive.read(name) in allowed[name], f"seed {seed}"


async def test_recovery_keeps_whole_members_and_names_the_cut_one(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    async with ZipStore(path, mode="w") as first:
        await first.set("old/0", buf(b"kept from the first session"))
        await first.set("old/1", buf(b"deleted, never closed"))
        await first.set("c/1", buf(b"first value of c/1"))
    store = ZipStore(path, mode="a")
    await store.set("c/1", buf(b"second value of c/1"))
    await store.set("c/2", buf(pattern(9, 10_000)))
    await store.set("c/cut", buf(pattern(10, 10_000)))
    await store.delete("old/1")  # deleted, but not closed: a crash brings it back
    # What a crash in the middle of the last write leaves: the file as it is, cut short.
    crashed = tmp_path / "crashed.zip"
    crashed.write_bytes(path.read_bytes()[:-5000])
    store.close()
    before = digest(crashed)
    for mode in ("r", "a"):
        with pytest.warns(UserWarning, match=r"damaged.*'c/cut' at offset \d+ \(incomplete"):
            recovered = await ZipStore.open(crashed, mode=mode)
        assert await read(recovered, "old/0") == b"kept from the first session"
        assert await read(recovered, "c/1") == b"second value of c/1"
        assert await read(recovered, "c/2") == pattern(9, 10_000)
        assert await read(recovered, "c/cut") is None
        assert await read(recovered, "old/1") == b"deleted, never closed"
        assert sorted([key async for key in recovered.list()]) == ["c/1", "c/2", "old/0", "old/1"]
        assert digest(crashed) == before  # opening changes nothing, in either mode
        if mode == "r":
            await recovered.aclose()
            assert digest(crashed) == before
    await recovered.aclose()  # mode "a": appends a directory for what was recovered
    with zipfile.ZipFile(crashed) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["c/1", "c/2", "old/0", "old/1"]
        assert archive.read("c/1") == b"second value of c/1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: no more warning
        async with ZipStore(crashed, mode="r") as again:
            assert await read(again, "c/1") == b"second value of c/1"


class Unseekable(io.RawIOBase):
    """A stream zipfile cannot seek back in, so it writes data descriptors."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]
)
async def test_recovery_reads_members_with_data_descriptors(
    tmp_path: Path, compression: int
) -> None:
    stream = Unseekable()
    values = {f"c/{i}": pattern(i, 3000 + i) for i in range(5)}
    with zipfile.ZipFile(stream, "w", compression=compression) as archive:
        for key, value in values.items():
            with archive.open(key, "w") as member:  # sizes unknown up front: descriptors
                member.write(value)
    data = bytes(stream.data)
    with zipfile.ZipFile(io.BytesIO(data)) as check:
        assert all(info.flag_bits & 0x08 for info in check.infolist())
        directory = min(info.header_offset for info in check.infolist() if info.filename == "c/4")
    # Lose the directory and half of the last member.
    path = tmp_path / "descriptors.zip"
    path.write_bytes(data[: directory + 1500])
    with pytest.warns(UserWarning, match=r"'c/4' at offset"):
        store = await ZipStore.open(path, mode="r")
    for key, value in values.items():
        assert await read(store, key) == (None if key == "c/4" else value)
    await store.aclose()


async def test_a_zip_stored_as_a_value_does_not_mislead_recovery(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("evil", b"not a key of ours")
    path = tmp_path / "outer.zip"
    store = ZipStore(path, mode="w")
    await store.set("c/0", buf(inner.getvalue()))
    await store.set("c/1", buf(b"one"))
    crashed = tmp_path / "crashed.zip"
    crashed.write_bytes(path.read_bytes())  # no directory yet: as after kill -9
    store.close()
    with pytest.warns(UserWarning, match="damaged"):
        recovered = await ZipStore.open(crashed, mode="r")
    assert sorted([key async for key in recovered.list()]) == ["c/0", "c/1"]
    assert await read(recovered, "c/0") == inner.getvalue()
    await recovered.aclose()


async def test_a_damaged_archive_with_an_unsafe_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("zarr.json", b"{}")
        info = zipfile.ZipInfo("placeholder")
        info.filename = "../escape"
        archive.writestr(info, b"gotcha")
        directory = archive.start_dir
    path.write_bytes(path.read_bytes()[:directory])  # only local headers are left
    before = digest(path)
    for mode in ("r", "a"):
        with pytest.raises(ValueError, match="not a safe key"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await ZipStore.open(path, mode=mode)
    assert digest(path) == before


async def test_a_folder_entry_with_an_unsafe_name_is_refused(tmp_path: Path) -> None:
    # Folder entries ("c/") are not keys, but "../escape/" is no safer than "../escape".
    path = tmp_path / "evil-folder.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("zarr.json", b"{}")
        info = zipfile.ZipInfo("placeholder/")
        info.filename = "../escape/"
        archive.writestr(info, b"")
    before = digest(path)
    for mode in ("r", "a"):
        with pytest.raises(ValueError, match=r"not a safe key.*\.\./escape"):
            await ZipStore.open(path, mode=mode)
    assert digest(path) == before


def _members_sharing_bytes(path: Path, damaged: bool) -> None:
    """A stored member "c/0" whose bytes are the whole member "c/1" (header and data), and a
    directory that lists both: two entries, one set of bytes."""
    inner = member_record("c/1", b"inner", zipfile.ZIP_STORED, True)
    inner[0].header_offset = 0
    outer_data = inner[1] + bytes(inner[2])
    outer = member_record("c/0", outer_data, zipfile.ZIP_STORED, True)
    outer[0].header_offset = 0
    inner[0].header_offset = len(outer[1])
    body = outer[1] + outer_data
    directory = directory_record([outer[0], inner[0]], len(body), b"", True)
    path.write_bytes(body + directory + (b"PK\x03\x04 cut" if damaged else b""))


@pytest.mark.parametrize("damaged", [False, True], ids=["whole", "recovered"])
async def test_entries_that_share_bytes_are_refused(tmp_path: Path, damaged: bool) -> None:
    # docs/local.md: "Bad archives are refused before anything is written"; zipfile refuses
    # overlapping entries too. Both ways of opening: the directory at the end, and recovery
    # (which takes the last directory whose entries point at local headers of their names).
    path = tmp_path / "shared.zip"
    _members_sharing_bytes(path, damaged)
    before = digest(path)
    for mode in ("r", "a"):
        with (
            pytest.raises(zipfile.BadZipFile, match=r"shared\.zip.*'c/0'.*'c/1'.*overlap"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            await ZipStore.open(path, mode=mode)
    assert digest(path) == before


def test_the_crc_of_any_span_comes_from_one_pass(tmp_path: Path) -> None:
    # Recovery checks overlapping candidates without reading their bytes again: the CRC-32 of
    # a span is worked out from the CRC-32s up to its two ends.
    from zarr_anyio.storage._zipread import _Region, crc_of_tail

    rng = random.Random(5)
    for length in [0, 1, 7, 512, 4099, 1 << 20]:
        head, tail = rng.randbytes(rng.randrange(3000)), rng.randbytes(length)
        assert crc_of_tail(zlib.crc32(head + tail), zlib.crc32(head), length) == zlib.crc32(tail)
    data = rng.randbytes(3 << 20)
    path = tmp_path / "random"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        region = _Region(fd, 1234, len(data))
        for _ in range(300):
            start = rng.randrange(1234, len(data))
            stop = rng.randrange(start, len(data) + 1)
            assert region.crc(start, stop) == zlib.crc32(data[start:stop]), (start, stop)
        assert region.crc(len(data) - 5000, len(data) + 1) is None  # past the end
    finally:
        os.close(fd)


# ---------------------------------------------------------- 6. closing with calls in flight


@pytest.mark.parametrize("how", ["aclose", "close in another thread"])
async def test_close_waits_for_the_calls_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = tmp_path / "busy.zip"
    store = ZipStore(path, mode="w", max_concurrency=4)
    await store.set("first", buf(b"1"))
    SlowDisk(monkeypatch, delay=0.01)
    done: list[int] = []
    finished_when_closed: list[int] = []

    async def write(i: int) -> None:
        await store.set(f"c/{i}", buf(pattern(i, 100)))
        done.append(i)

    async def close_soon() -> None:
        with anyio.fail_after(10):
            while not done:  # some calls are done, the others in flight
                await anyio.sleep(0.001)
        if how == "aclose":
            await store.aclose()
        else:
            await anyio.to_thread.run_sync(store.close)
        finished_when_closed.append(len(done))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(write, i)
        tg.start_soon(close_soon)
    assert finished_when_closed == [20]
    assert store._session is None  # closed, not reopened by a late call
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert len(archive.namelist()) == 21
    # A call made after close opens the store again, and it needs closing again.
    monkeypatch.undo()
    await store.set("later", buf(b"2"))
    assert store._session is not None
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert len(archive.namelist()) == 22


async def test_close_on_the_loop_with_calls_of_that_loop_in_flight_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "refused.zip"
    store = ZipStore(path, mode="w")
    SlowDisk(monkeypatch, delay=0.01)
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(store.set, f"c/{i}", buf(b"x"))
        await anyio.sleep(0.005)
        with pytest.raises(RuntimeError, match="aclose"):
            store.close()
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == [f"c/{i}" for i in range(5)]


# --------------------------------------------------------- 13/14. cancellation of long calls


async def test_a_cancelled_big_write_returns_only_once_it_stopped_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    path = tmp_path / "big.zip"
    store = ZipStore(path, mode="w")
    await store.set("small", buf(b"kept"))
    size = path.stat().st_size
    disk = SlowDisk(monkeypatch, delay=0.005)
    writing = [0]
    real_write = store._write_blocking

    def tracked(*args: Any, **kwargs: Any) -> None:
        writing[0] += 1
        try:
            real_write(*args, **kwargs)
        finally:
            writing[0] -= 1

    monkeypatch.setattr(store, "_write_blocking", tracked)
    value = buf(bytes(32 << 20))
    if anyio_backend == "asyncio":
        # Native double cancellation, as asyncio.TaskGroup and asyncio.timeout can do.
        task = asyncio.get_running_loop().create_task(store.set("big", value))
        with anyio.fail_after(10):
            while disk.calls == 0:
                await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.set, "big", value)
                with anyio.fail_after(10):
                    while disk.calls == 0:
                        await anyio.sleep(0.001)
                scope.cancel()
                scope.cancel()
    assert writing == [0]  # nothing is still writing
    calls = disk.calls
    await anyio.sleep(0.05)
    assert disk.calls == calls
    assert calls < 32  # and it stopped early
    assert path.stat().st_size == size  # the part written was cut off
    assert await read(store, "big") is None
    assert await read(store, "small") == b"kept"
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["small"]


async def test_a_cancelled_rewrite_stops_early_and_keeps_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rewrite.zip"
    async with ZipStore(path, mode="w") as first:
        await first.set_many([(f"c/{i}", buf(pattern(i, 20_000))) for i in range(100)])
    store = await ZipStore.open(path, mode="a")
    await store.delete("c/0")
    before = digest(path)
    disk = SlowDisk(monkeypatch, delay=0.002)
    with anyio.move_on_after(0.1) as scope:
        await store.rewrite()
    assert scope.cancelled_caught
    assert disk.calls < 100  # a rewrite writes twice per member: it stopped early
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rewrite.zip"]
    assert len([key async for key in store.list()]) == 99
    monkeypatch.undo()
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert len(archive.namelist()) == 99
        assert "c/0" not in archive.namelist()


async def test_a_cancelled_close_leaves_the_store_open_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "close.zip"
    async with ZipStore(path, mode="w") as first:
        await first.set_many([(f"c/{i}", buf(pattern(i, 20_000))) for i in range(100)])
    store = await ZipStore.open(path, mode="a")
    await store.delete("c/0")
    SlowDisk(monkeypatch, delay=0.002)
    with anyio.move_on_after(0.1) as scope:
        await store.aclose()  # the rewrite that drops c/0 takes longer than that
    assert scope.cancelled_caught
    assert store._session is not None
    assert await read(store, "c/0") is None
    assert await read(store, "c/1") == pattern(1, 20_000)
    monkeypatch.undo()
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert len(archive.namelist()) == 99


async def test_a_rewrite_left_by_a_crash_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    async with ZipStore(path, mode="w") as first:
        await first.set("c/0", buf(b"x"))
    stale = tmp_path / ".__zarr_anyio_rewrite__.data.zip.0123456789abcdef"
    stale.write_bytes(b"half a copy")
    other = tmp_path / ".__zarr_anyio_rewrite__.other.zip.0123456789abcdef"
    other.write_bytes(b"not ours")
    async with ZipStore(path, mode="r") as reader:
        assert await read(reader, "c/0") == b"x"
    assert stale.exists()  # a reader writes nothing, removes nothing
    async with ZipStore(path, mode="a") as writer:
        assert await read(writer, "c/0") == b"x"
    assert not stale.exists()
    assert other.exists()


# --------------------------------------------------------------------------- 11. tmpfs


async def test_reads_work_on_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = folder / f"zarr-anyio-{os.getpid()}-{random.randrange(1 << 30)}.zip"
    try:
        async with ZipStore(path, mode="w") as writer:
            await writer.set("c/0", buf(b"on tmpfs"))
        store = await ZipStore.open(path, mode="r")
        for _ in range(3):
            assert await read(store, "c/0") == b"on tmpfs"
            assert await read(store, "c/0", RangeByteRequest(3, 8)) == b"tmpfs"
        await store.aclose()
    finally:
        path.unlink(missing_ok=True)


async def test_a_page_cache_read_that_fails_falls_back_to_threads_for_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nowait.zip"
    async with ZipStore(path, mode="w") as writer:
        await writer.set("c/0", buf(b"value"))
    store = await ZipStore.open(path, mode="r")
    threads = ThreadReads(store, monkeypatch)
    tries = [0]

    def unsupported(*args: Any) -> int:
        tries[0] += 1
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(_oscalls, "read_into", unsupported)
    for _ in range(3):
        assert await read(store, "c/0") == b"value"
    assert threads.calls == 3
    assert tries[0] <= 1  # tried once, then remembered
    await store.aclose()


# --------------------------------------------------------------------------- 19. keys


async def test_keys_a_zip_cannot_hold_are_refused_and_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.zip"
    store = ZipStore(path, mode="w")
    await store.set("zarr.json", buf(b"{}"))
    long_key = "a/" + "b" * 70_000
    for key in [long_key, "c/\udc80"]:
        with pytest.raises(ValueError, match="invalid key") as caught:
            await store.set(key, buf(b"x"))
        assert key[:20] in str(caught.value) or repr(key)[:20] in str(caught.value)
        with pytest.raises(ValueError, match="invalid key"):
            store.set_sync(key, buf(b"x"))
        with pytest.raises(ValueError, match="invalid key"):
            await store.set_many([("ok", buf(b"x")), (key, buf(b"x"))])
    assert [key async for key in store.list()] == ["zarr.json"]
    await store.aclose()
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["zarr.json"]


# --------------------------------------------------------------------------- zip64


def test_directories_beyond_the_zip32_limits(tmp_path: Path) -> None:
    path = tmp_path / "sparse.zip"
    far = 5 << 30  # a sparse file: the member sits 5 GiB in, past 32-bit offsets
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, far)
        info, header, payload = member_record("c/far", b"far away", zipfile.ZIP_STORED, True)
        info.header_offset = far
        end = write_all(fd, header + bytes(payload), far, lambda: None)
        with pytest.raises(zipfile.LargeZipFile):
            directory_record([info], end, b"", allow_zip64=False)
        write_all(fd, directory_record([info], end, b"", True), end, lambda: None)
    finally:
        os.close(fd)
    with ZipStore(path, mode="r") as store:
        value = store.get_sync("c/far")
        assert value is not None
        assert value.to_bytes() == b"far away"
    # More entries than a 16-bit count holds (all naming the same bytes).
    many = []
    for i in range(1 << 16):
        entry = zipfile.ZipInfo(f"{i}", date_time=info.date_time)
        entry.CRC, entry.file_size, entry.compress_size = info.CRC, 8, 8
        entry.header_offset = far
        many.append(entry)
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(size)
        file.write(directory_record(many, size, b"", True))
    with zipfile.ZipFile(path) as archive:
        assert len(archive.infolist()) == 1 << 16
        assert archive.getinfo("65535").header_offset == far
