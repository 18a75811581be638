"""LocalStore's read path: small cached reads on the event loop (holding a token, never waiting
for the disk), large reads each in a hop of their own, into reused memory that zarr uses as is
and that is never handed out twice while in use. Nothing here asserts a duration."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import pytest
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype

import zarr_anyio.storage._buffers
import zarr_anyio.storage._local
import zarr_anyio.storage._oscalls
from support.doubles import ConcurrencyProbe
from zarr_anyio import LocalStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()
MIB = 1 << 20
# Linux reads what is in the page cache on the event loop (RWF_NOWAIT, RESOLVE_CACHED). Where
# the system cannot (macOS, Windows, the tests' portable mode), the documented weaker behaviour
# holds instead: every read goes to a thread. The tests below assert whichever this one promises.
READS_ON_LOOP = zarr_anyio.storage._oscalls.RWF_NOWAIT is not None


def value(seed: int, size: int = MIB) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def address(buffer: Buffer) -> int:
    return int(np.frombuffer(buffer.as_buffer_like(), np.uint8).ctypes.data)


def slot_addresses() -> set[int]:
    found = set()
    for slots in zarr_anyio.storage._buffers._pool._slots.values():
        for slot in slots:
            view = (ctypes.c_char * 1).from_buffer(slot.mapping)
            found.add(ctypes.addressof(view))
            del view
    return found


class ThreadReads:
    """Counts the reads that LocalStore makes in worker threads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._read = zarr_anyio.storage._localfs.read_file
        monkeypatch.setattr(zarr_anyio.storage._local, "read_file", self)

    def __call__(self, *args: object) -> object:
        self.calls += 1
        return self._read(*args)  # type: ignore[arg-type]


async def test_small_cached_reads_are_made_without_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "root")
    values = {f"c/{i}": value(i, 4096) for i in range(50)}
    await store.set_many((key, cpu.Buffer.from_bytes(data)) for key, data in values.items())
    for key in [*values, "c/missing"]:
        await store.get(key, PROTO)  # now every name (a missing one too) and byte is cached
    threads = ThreadReads(monkeypatch)
    for key, data in values.items():
        result = await store.get(key, PROTO)
        assert result is not None
        assert result.to_bytes() == data
        part = await store.get(key, PROTO, RangeByteRequest(100, 200))
        assert part is not None
        assert part.to_bytes() == data[100:200]
        tail = await store.get(key, PROTO, SuffixByteRequest(10))
        assert tail is not None
        assert tail.to_bytes() == data[-10:]
    assert await store.get("c/missing", PROTO) is None
    assert threads.calls == (0 if READS_ON_LOOP else 3 * len(values) + 1)


async def test_a_read_on_the_loop_holds_a_token(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", max_concurrency=1)
    await store.set("k", cpu.Buffer.from_bytes(b"v"))
    await store.get("k", PROTO)
    limiter = store.limiter
    await limiter.acquire()
    got: list[Buffer | None] = []

    async def get() -> None:
        got.append(await store.get("k", PROTO))

    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # no token free: it waits, as a read in a thread would
        limiter.release()
    assert got[0] is not None
    assert got[0].to_bytes() == b"v"
    assert limiter.statistics().borrowed_tokens == 0


async def test_a_read_of_bytes_not_in_the_page_cache_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "root")
    await store.set("k", cpu.Buffer.from_bytes(value(3, 8192)))
    path = tmp_path / "root" / "k"
    threads = ThreadReads(monkeypatch)
    with open(path, "rb") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
    result = await store.get("k", PROTO)
    assert result is not None
    assert result.to_bytes() == value(3, 8192)
    assert threads.calls == 1  # the loop did not wait for the disk: a thread did
    await store.get("k", PROTO)
    # Cached again: back on the loop (or a thread again, where no read is made on the loop).
    assert threads.calls == (1 if READS_ON_LOOP else 2)


async def test_on_a_file_system_that_cannot_read_without_waiting_reads_go_to_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tmpfs refuses RWF_NOWAIT (EOPNOTSUPP): the store notices once and then uses threads.
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        store = LocalStore(folder)
        await store.set("k", cpu.Buffer.from_bytes(b"in memory"))
        threads = ThreadReads(monkeypatch)
        for _ in range(3):
            result = await store.get("k", PROTO)
            assert result is not None
            assert result.to_bytes() == b"in memory"
        assert not store._reads_on_loop
        assert threads.calls == 3


async def test_large_reads_each_get_a_hop_of_their_own(
    tmp_path: Path, reads: Callable[[int], ConcurrencyProbe]
) -> None:
    store = LocalStore(tmp_path, max_concurrency=8)
    keys = [f"c/{i}" for i in range(8)]
    await store.set_many((key, cpu.Buffer.from_bytes(value(i))) for i, key in enumerate(keys))
    for key in keys:
        await store.get(key, PROTO)  # the store learns how large its reads are
    # As if these reads had cost little CPU time: the estimate by time alone would batch them.
    store._hops._call_seconds = 1e-6
    double = reads(8)
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(store.get, key, PROTO)
    assert double.calls == 8
    assert double.most == 8  # all in flight together, on eight threads
    results = await store.get_partial_values(PROTO, [(key, None) for key in keys])
    assert [r.to_bytes() for r in results if r is not None] == [value(i) for i in range(8)]


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> zarr_anyio.storage._buffers._Pool:
    """A pool of its own for the test, not holding slots of earlier tests."""
    pool = zarr_anyio.storage._buffers._Pool()
    monkeypatch.setattr(zarr_anyio.storage._buffers, "_pool", pool)
    monkeypatch.setattr(zarr_anyio.storage._buffers, "take", pool.take)
    return pool


async def test_a_large_read_lands_in_reused_memory_and_is_not_copied(
    tmp_path: Path, fresh_pool: zarr_anyio.storage._buffers._Pool
) -> None:
    store = LocalStore(tmp_path)
    await store.set("a", cpu.Buffer.from_bytes(value(1)))
    await store.set("b", cpu.Buffer.from_bytes(value(2)))
    first = await store.get("a", PROTO)
    assert first is not None
    assert address(first) in slot_addresses()  # zarr's buffer is the memory read into
    where = address(first)
    del first
    # Free again at once: nothing of the store's holds on to a buffer it handed out.
    slots = [slot for slots in fresh_pool._slots.values() for slot in slots]
    assert all(
        zarr_anyio.storage._buffers._references(s) == zarr_anyio.storage._buffers._FREE
        for s in slots
    )
    second = await store.get("b", PROTO)
    assert second is not None
    assert address(second) == where  # the same memory again: no fresh pages to fault in
    assert second.to_bytes() == value(2)
    synced = store.get_sync("a")
    assert synced is not None
    assert address(synced) in slot_addresses()
    assert synced.to_bytes() == value(1)


async def test_memory_in_use_is_never_handed_out_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_concurrency=4)
    sizes = [MIB, MIB - 4096, MIB + 1, 200_000]  # one size class and others
    for i, size in enumerate(sizes):
        await store.set(f"k{i}", cpu.Buffer.from_bytes(value(i, size)))
    held = [await store.get(f"k{i}", PROTO) for i in range(len(sizes))]
    # Views of views: what zarr makes of a buffer keeps the memory in use too.
    views = [np.frombuffer(h.as_buffer_like(), np.uint8)[10:][::3] for h in held if h]
    held_sync = store.get_sync("k0")
    for _ in range(20):
        keys = [f"k{i % len(sizes)}" for i in range(16)]
        await store.get_partial_values(PROTO, [(key, None) for key in keys])
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(store.get, key, PROTO)
    del held
    for i, view in enumerate(views):
        assert view.tobytes() == value(i, sizes[i])[10:][::3]
    assert held_sync is not None
    assert held_sync.to_bytes() == value(0)
    assert (
        zarr_anyio.storage._buffers._pool.mapped_bytes() <= zarr_anyio.storage._buffers.POOL_BYTES
    )


FORKED = """
import os, sys
import numpy as np
from zarr.core.buffer import cpu
from zarr_anyio import LocalStore

store = LocalStore(sys.argv[1])
first = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
store.set_sync("a", cpu.Buffer.from_bytes(first))
store.set_sync("b", cpu.Buffer.from_bytes(bytes(1 << 20)))
held = store.get_sync("a")
where = np.frombuffer(held.as_buffer_like(), np.uint8).ctypes.data
pid = os.fork()
if pid == 0:  # the child lets go of the parent's buffer, then reads into that memory
    code = 1
    try:
        del held
        again = store.get_sync("b")
        code = 0 if np.frombuffer(again.as_buffer_like(), np.uint8).ctypes.data == where else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status  # the child did reuse that memory...
assert held.to_bytes() == first  # ...and the parent's bytes are as they were
print("ok")
"""


def test_a_forked_child_reads_into_its_own_memory(tmp_path: Path) -> None:
    # In a fresh interpreter, which has no threads to make fork() unsafe.
    done = subprocess.run(
        [sys.executable, "-c", FORKED, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr


async def test_the_pool_is_bounded_and_gives_back_what_it_no_longer_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_pool: zarr_anyio.storage._buffers._Pool
) -> None:
    pool = fresh_pool
    monkeypatch.setattr(zarr_anyio.storage._buffers, "POOL_BYTES", 3 * MIB)
    store = LocalStore(tmp_path)
    for i in range(5):
        await store.set(f"k{i}", cpu.Buffer.from_bytes(value(i)))
    held = [await store.get(f"k{i}", PROTO) for i in range(5)]  # more than the pool may map
    assert [h.to_bytes() for h in held if h is not None] == [value(i) for i in range(5)]
    assert pool.mapped_bytes() == 3 * MIB
    del held
    monkeypatch.setattr(zarr_anyio.storage._buffers, "IDLE_SECONDS", 0.0)
    pool._next_sweep = 0.0
    await store.set("small", cpu.Buffer.from_bytes(value(9, 300_000)))
    kept = await store.get("small", PROTO)  # a take sweeps the slots unused since
    assert kept is not None
    assert pool.mapped_bytes() == zarr_anyio.storage._buffers._size_class(300_000)
