"""Attacks on the promises of the docs, each the smallest program that broke one (or tried to).

Each test names the sentence it holds the library to. Async tests run under asyncio and trio.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import struct
import threading
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import anyio
import pytest
from zarr.core.buffer import default_buffer_prototype

from support.remote import fill, http_store
from support.servers import Faults, HTTPServer, S3Server
from zarr_anyio import FsspecStore, Limiter, Retry, ZipStore
from zarr_anyio.storage import _oscalls
from zarr_anyio.storage._zipformat import LOCAL, directory_record, member_record

pytestmark = pytest.mark.anyio


def unfixed(finding: str) -> pytest.MarkDecorator:
    """A break not fixed here: the test fails today (strict xfail), and passes, so this marker
    must go, once the fix lands."""
    return pytest.mark.xfail(strict=True, reason=finding)


PROTO = default_buffer_prototype()
QUICK = Retry(attempts=4, base_delay=0.002, max_delay=0.05, max_retry_after=0.1)


# ------------------------------------------------------------------------ the limiter


def test_a_thread_interrupted_while_waiting_in_blocking_loses_no_token() -> None:
    # Promise (Limiter docstring): "with limiter.blocking(): from a plain thread"; tokens are
    # never lost. Ctrl-C while the main thread waits for a token must leave the queue, or the
    # token handed to the dead waiter later is gone for good.
    limiter = Limiter(1)
    limiter.acquire_nowait()
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    assert main is not None

    def interrupt() -> None:
        while limiter.statistics().tasks_waiting == 0:
            time.sleep(0.005)
        signal.pthread_kill(main, signal.SIGINT)

    # Ctrl-C as Python answers it by default: a handler left by an earlier test in this
    # process (an event loop's, ...) would take the signal instead, and the wait went on for ever.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    poker = threading.Thread(target=interrupt)
    poker.start()
    try:
        with pytest.raises(KeyboardInterrupt), limiter.blocking():
            pass
    finally:
        poker.join()
        signal.signal(signal.SIGINT, previous)
    limiter.release()
    assert limiter.statistics().tasks_waiting == 0
    assert limiter.statistics().borrowed_tokens == 0
    with limiter.blocking():  # and the token can be had again
        pass


# ------------------------------------------------------------------------ Retry-After


@pytest.mark.parametrize(
    "header",
    [
        "\xc2\xb2",  # UTF-8 of "²", which str.isdigit() takes for a digit
        "Mon, 01 Jan 99999999999999999999999 00:00:00 GMT",  # a year past any datetime
    ],
)
async def test_a_garbage_retry_after_is_ignored_not_raised(
    http_server: HTTPServer, header: str
) -> None:
    # Promise (_retry.parse_retry_after / Retry): a server's Retry-After is read as seconds or
    # an HTTP date; anything else is no Retry-After. And errors come back as themselves: a
    # throttled read is retried, never turned into a ValueError/OverflowError of our parser.
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=1, retry_after=header)
    store = http_store("fsspec", http_server, retry=QUICK)
    (value,) = await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert value is not None
    assert value.to_bytes() == objects["c/0"]
    assert http_server.answers == [429, 200]


def test_parse_retry_after_never_raises() -> None:
    from zarr_anyio.storage._retry import parse_retry_after

    for value in ["²", "٣", "1" * 400, "Mon, 01 Jan 99999999999999999999999 00:00:00 GMT"]:
        parsed = parse_retry_after(value)
        assert parsed is None or parsed >= 0


# ------------------------------------------------------------------------ crafted zip archives


def _stored_member_claiming(path: Path, claimed: int) -> None:
    """A zip whose one member "c/0" holds 11 bytes and whose directory says it holds more."""
    data = b"hello world"
    info = zipfile.ZipInfo("c/0", date_time=(2020, 1, 1, 0, 0, 0))
    info.CRC = zlib.crc32(data)
    info.file_size = info.compress_size = len(data)
    info.header_offset = 0
    body = info.FileHeader(False) + data
    info.file_size = info.compress_size = claimed
    path.write_bytes(body + directory_record([info], len(body), b"", True))


@pytest.mark.parametrize("claimed", [1 << 40, 1 << 62])
async def test_a_member_claiming_more_bytes_than_the_file_is_damaged_not_a_memory_error(
    tmp_path: Path, claimed: int
) -> None:
    # Promise (docs/local.md): "a damaged member raises zipfile.BadZipFile naming the key and
    # the archive". A 150-byte archive whose directory claims a TiB made get() try to allocate
    # the claim: MemoryError, which no caller of a store expects.
    path = tmp_path / "liar.zip"
    _stored_member_claiming(path, claimed)
    store = ZipStore(path, mode="r")
    with pytest.raises(zipfile.BadZipFile, match="c/0"):
        await store.get("c/0", PROTO)
    store.close()


def _descriptor_header(name: bytes, method: int) -> bytes:
    # A local header whose sizes and CRC follow the data (flag 8), as streaming writers make.
    return LOCAL.pack(b"PK\x03\x04", 20, 0, 0x08, method, 0, 0x21, 0, 0, 0, len(name), 0) + name


def test_recovering_a_crafted_file_does_not_inflate_a_zip_bomb_into_memory(
    tmp_path: Path,
) -> None:
    # Promise (docs/local.md, "A crash loses only what was not whole"): opening a file with no
    # directory recovers its whole members. Recovery inflated a deflated member with a data
    # descriptor 1 MiB of input at a time with no bound on the output: a 64 KiB file took
    # 128 MiB at open, and a 1 MiB piece of zeros takes ~2 GiB.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"\0" * (64 << 20)) + compressor.flush()
    path = tmp_path / "bomb.zip"
    path.write_bytes(_descriptor_header(b"c/0", zipfile.ZIP_DEFLATED) + bomb)
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(zipfile.BadZipFile):
                ZipStore(path, mode="r").get_sync("c/0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_recovering_a_crafted_file_reads_it_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same promise. Each "PK\x03\x04" of a stored member with a data descriptor made recovery
    # scan the rest of the file for the descriptor: quadratic, 0.03 s at 50 KB, 0.4 s at
    # 200 KB, ~10 s at 1 MB, ~1000 s at 10 MB: a small file stalls whoever opens it.
    one = _descriptor_header(b"k", zipfile.ZIP_STORED)
    path = tmp_path / "slow.zip"
    path.write_bytes(one * (200_000 // len(one)))
    size = path.stat().st_size
    assert _bytes_read_failing_to_open(path, monkeypatch) < 20 * size


def _bytes_read_failing_to_open(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The bytes read (counted at `_oscalls.pread`, the positional read whichever calls this
    system has) while reading a key of the damaged zip at
    ``path`` fails with ``BadZipFile`` (its recovery warnings silenced)."""
    read = 0
    real_pread = _oscalls.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        nonlocal read
        data = real_pread(fd, length, offset)
        read += len(data)
        return data

    monkeypatch.setattr(_oscalls, "pread", counting_pread)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(zipfile.BadZipFile):
            ZipStore(path, mode="r").get_sync("k")
    return read


def _overlapping_candidates(kind: str, size: int) -> bytes:
    """Local headers every 31 bytes, each of a stored member whose bytes run over all the
    headers after it, and whose CRC-32 is wrong (1, or 0 for bytes that are not empty): each
    is checked, and each fails."""
    count = size // 47
    headers = bytearray()
    for i in range(count):
        left = 31 * count - (31 * i + 31)  # from its data to the last header's end
        if kind == "sizes in the header":
            headers += LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, 0x21, 1, left, left, 1, 0) + b"k"
        else:
            headers += _descriptor_header(b"k", zipfile.ZIP_STORED)
    if kind == "sizes in a descriptor":
        # One descriptor per header, after them all, each naming the bytes back to its data.
        for i in range(count):
            length = 31 * count + 16 * i - (31 * i + 31)
            headers += struct.pack("<4sLLL", b"PK\x07\x08", 0, length, length)
    return bytes(headers)


@pytest.mark.parametrize("kind", ["sizes in the header", "sizes in a descriptor"])
def test_recovering_overlapping_candidates_reads_the_file_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # As above, with the other ways a candidate's check read the rest of the file: 4258 times
    # the file's size (sizes in the header), or 3 million times and 100 s for 200 KB (a
    # descriptor for each header: each header's check tried every descriptor after it).
    path = tmp_path / "overlapping.zip"
    path.write_bytes(_overlapping_candidates(kind, 60_000))
    size = path.stat().st_size
    assert _bytes_read_failing_to_open(path, monkeypatch) < 40 * size


def test_recovery_holds_a_descriptor_member_to_the_size_its_header_claims(
    tmp_path: Path,
) -> None:
    # A header with a data descriptor that states a size (streaming writers leave 0) is held to
    # it: a stream that inflates past it is dropped, whatever its descriptor says, rather than
    # inflated to the end (up to ~1000 times its compressed size).
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    value = b"\0" * (4 << 20)
    stream = compressor.compress(value) + compressor.flush()
    header = LOCAL.pack(b"PK\x03\x04", 20, 0, 0x08, 8, 0, 0x21, 0, 100, 1000, 3, 0) + b"c/0"
    descriptor = struct.pack("<4sLLL", b"PK\x07\x08", zlib.crc32(value), len(stream), len(value))
    _, whole_header, whole_data = member_record("c/1", b"whole", zipfile.ZIP_STORED, True)
    path = tmp_path / "claims.zip"
    path.write_bytes(whole_header + bytes(whole_data) + header + stream + descriptor)
    store = ZipStore(path, mode="r")
    with pytest.warns(UserWarning, match=r"'c/0' at offset \d+ \(incomplete, or its data desc"):
        got = store.get_sync("c/0")
    assert got is None
    assert store.get_sync("c/1") is not None
    store.close()


# ------------------------------------------------------------------------ remote stores


@pytest.mark.parametrize("kind", ["fsspec", "obstore"])
async def test_exists_of_a_throttled_key_is_retried_not_false(
    http_server: HTTPServer, kind: str
) -> None:
    # Promise (docs/remote.md): "requests that failed transiently — HTTP 408, 429, 500, 502,
    # 503 … — are retried". fsspec's isfile (and http's _exists) turn every failure into
    # False, so a 429 made exists() say a key that is there is not: no retry, no error.
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=1)
    store = http_store(kind, http_server, retry=QUICK)
    assert await store.exists("c/0")
    assert http_server.answers[-1] == 200
    assert objects


@pytest.mark.parametrize("kind", ["fsspec", "obstore"])
async def test_exists_against_a_failing_server_raises(http_server: HTTPServer, kind: str) -> None:
    # Promise (README, docs): errors come back as themselves. A server that answers every
    # request 500 made FsspecStore.exists() answer False, as if the key were absent.
    fill(http_server, 1)
    http_server.faults = Faults(server_error=1.0)
    store = http_store(kind, http_server, retry=QUICK)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the client raises, not False
        await store.exists("c/0")


@pytest.mark.parametrize("filesystem", ["memory", "s3"])
@pytest.mark.parametrize("node", ["a*", "a[b]", "a?"])
async def test_delete_dir_of_a_node_with_glob_characters_deletes_only_that_node(
    node: str, filesystem: str, request: pytest.FixtureRequest
) -> None:
    # Promise (docs/local.md): "delete_dir(p) ... treat p as a node of the hierarchy ("a"
    # means "a/…")". fsspec's rm() expands glob patterns in the paths it is given, so deleting
    # the node "a*" (a legal zarr name) also deleted every sibling it matched: "ab/k" is gone.
    import fsspec

    if filesystem == "memory":
        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        store = FsspecStore(fs, path="/attack-glob")
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        store = FsspecStore(s3.s3fs(asynchronous=True), path=f"{s3.new_bucket()}/root")
    for key in [f"{node}/k", f"{node}/deeper/k", "ab/k", "b/k"]:
        await store.set(key, PROTO.buffer.from_bytes(b"v"))
    await store.delete_dir(node)
    assert sorted([key async for key in store.list()]) == ["ab/k", "b/k"]


def test_a_token_granted_to_a_waiter_of_a_closed_loop_on_this_thread_is_passed_on() -> None:
    # Promise (Limiter docstring): waiters are woken on their own loop, and a waiter whose loop
    # has ended gives its token back. When that loop ran on the releasing thread, its event was
    # set directly, which raised "Event loop is closed" out of release() to an unrelated caller.
    limiter = Limiter(1)
    limiter.acquire_nowait()
    loop = asyncio.new_event_loop()
    tasks: list[asyncio.Task[None]] = []

    async def wait_for_a_token() -> None:
        async with limiter:
            pass

    async def start_and_leave() -> None:
        tasks.append(loop.create_task(wait_for_a_token()))
        while limiter.statistics().tasks_waiting == 0:
            await asyncio.sleep(0.001)

    loop.run_until_complete(start_and_leave())
    loop.close()  # the waiting task is never cancelled: its loop is simply gone
    try:
        limiter.release()
        assert limiter.statistics().borrowed_tokens == 0
        assert limiter.statistics().tasks_waiting == 0
    finally:
        tasks.clear()
        gc.collect()  # the abandoned task, with its "destroyed but pending" complaint


def test_a_waiter_of_a_closed_loop_gives_its_token_back_once() -> None:
    # Promise (docs/local.md): "at most max_concurrency operations in flight in all". A waiter
    # whose loop (in another thread) was closed while it waited was granted a token: the
    # releaser gave it back on its behalf, and when the abandoned coroutine was collected it
    # gave it back again, so a Limiter(1) let two holders in at once.
    limiter = Limiter(1)
    limiter.acquire_nowait()
    tasks: list[asyncio.Task[None]] = []

    def run_a_loop_that_ends_with_a_waiter() -> None:
        loop = asyncio.new_event_loop()

        async def wait_for_a_token() -> None:
            async with limiter:
                pass

        async def start_and_leave() -> None:
            tasks.append(loop.create_task(wait_for_a_token()))
            while limiter.statistics().tasks_waiting == 0:
                await asyncio.sleep(0.001)

        loop.run_until_complete(start_and_leave())
        loop.close()

    thread = threading.Thread(target=run_a_loop_that_ends_with_a_waiter)
    thread.start()
    thread.join()
    limiter.release()  # handed to the dead waiter, whose loop cannot take it: passed on
    limiter.acquire_nowait()  # held from here on
    tasks.clear()
    gc.collect()  # the abandoned coroutine is closed
    with pytest.raises(anyio.WouldBlock):
        limiter.acquire_nowait()
    assert limiter.statistics().borrowed_tokens == 1
    limiter.release()


def test_overlapping_members_do_not_multiply_the_file_on_rewrite(tmp_path: Path) -> None:
    # Promise (docs/local.md): "Bad archives are refused before anything is written" (zipfile
    # itself refuses overlapped entries, a known zip-bomb shape). 200 directory entries naming
    # one 64 KiB member: a delete and close() rewrote a 75 kB file into 13 MB (65,535 entries
    # on a 1 MiB member: 64 GiB from a 3 MiB file).
    data = os.urandom(64 << 10)
    infos = []
    for i in range(200):
        info = zipfile.ZipInfo(f"c/{i}", date_time=(2020, 1, 1, 0, 0, 0))
        info.CRC, info.file_size, info.compress_size = zlib.crc32(data), len(data), len(data)
        info.header_offset = 0
        infos.append(info)
    body = infos[0].FileHeader(False) + data
    path = tmp_path / "overlap.zip"
    path.write_bytes(body + directory_record(infos, len(body), b"", True))
    before = path.stat().st_size
    try:
        store = ZipStore(path, mode="a")
        store.delete_sync("c/0")
        store.close()
    except zipfile.BadZipFile:
        return  # refused, as zipfile refuses it: the file is as it was
    assert path.stat().st_size <= before
