"""``set_if_not_exists`` has exactly one winner, counted where the values land.

A test that only checks that the value left is one of the writers' cannot tell an atomic
creation from "last write wins" (both leave some writer's value). Here every writer first gets
past the point where the key did not exist yet, held there by a stand-in for the disk; then the
writers go on, and what reaches the backend is counted: the stored value must never change once
set (LocalStore), and one value only may be written to the file (ZipStore). Replacing LocalStore's
exclusive link with a rename, or ZipStore's check under its lock with one before it, fails these.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

import zarr_anyio.storage._localfs
import zarr_anyio.storage._zip
import zarr_anyio.storage._zipformat
from zarr_anyio import LocalStore, ZipStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()
WRITERS = 6


def writer_value(index: int) -> bytes:
    return f"writer {index}:".encode() * 50


class Gate:
    """Holds each writer (in its worker thread) until told, and says when all arrived."""

    def __init__(self, writers: int) -> None:
        self._lock = threading.Lock()
        self._writers = writers
        self.arrived: list[bytes] = []
        self.all_arrived = threading.Event()
        self.go: dict[bytes, threading.Event] = {
            writer_value(i): threading.Event() for i in range(writers)
        }

    def hold(self, value: bytes) -> None:
        with self._lock:
            self.arrived.append(value)
            if len(self.arrived) == self._writers:
                self.all_arrived.set()
        assert self.go[value].wait(60), "never released"

    def release_all(self) -> None:
        for event in self.go.values():
            event.set()


async def wait_for_all(gate: Gate) -> None:
    assert await anyio.to_thread.run_sync(gate.all_arrived.wait, 60)


async def test_local_store_exactly_one_writer_wins_and_its_value_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(WRITERS)
    write_piece = zarr_anyio.storage._localfs._write_piece

    def held(fd: int, piece: memoryview) -> int:
        gate.hold(bytes(piece))
        return write_piece(fd, piece)

    monkeypatch.setattr(zarr_anyio.storage._localfs, "_write_piece", held)
    store = LocalStore(tmp_path, max_concurrency=WRITERS)
    finished = {writer_value(i): anyio.Event() for i in range(WRITERS)}

    async def write(value: bytes) -> None:
        await store.set_if_not_exists("k", cpu.Buffer.from_bytes(value))
        finished[value].set()

    seen: list[bytes] = []
    try:
        async with anyio.create_task_group() as tg:
            for i in range(WRITERS):
                tg.start_soon(write, writer_value(i))
            await wait_for_all(gate)  # every writer is past its "does it exist?" check
            for value in list(gate.arrived):  # let them finish one at a time
                gate.go[value].set()
                await finished[value].wait()
                stored = await store.get("k", PROTO)
                assert stored is not None
                seen.append(stored.to_bytes())
    finally:
        gate.release_all()
    # One winner: the first writer to finish; no later one replaced its value.
    assert seen == [gate.arrived[0]] * WRITERS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


async def test_zip_store_exactly_one_writer_appends_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(WRITERS)
    member_record = zarr_anyio.storage._zipformat.member_record

    def held(name: str, data: bytes, *args: Any) -> Any:
        gate.hold(data)
        return member_record(name, data, *args)

    monkeypatch.setattr(zarr_anyio.storage._zip, "member_record", held)
    path = tmp_path / "data.zip"
    store = ZipStore(path, mode="w", max_concurrency=WRITERS)
    try:
        async with anyio.create_task_group() as tg:
            for i in range(WRITERS):
                tg.start_soon(store.set_if_not_exists, "k", cpu.Buffer.from_bytes(writer_value(i)))
            await wait_for_all(gate)  # every writer has made its record, none has written
            gate.release_all()
    finally:
        gate.release_all()
    stored = await store.get("k", PROTO)
    await store.aclose()
    # Counted in the file itself: one writer's bytes reached it, the others' never did.
    content = path.read_bytes()
    written = [i for i in range(WRITERS) if writer_value(i) in content]
    assert len(written) == 1
    assert stored is not None
    assert stored.to_bytes() == writer_value(written[0])
