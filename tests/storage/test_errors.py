"""Errors from bulk calls come back as one error, as from a single call; exclusive writes to a
MemoryStore have one winner however many threads and event loops race."""

from __future__ import annotations

import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import anyio
import pytest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype

from zarr_anyio import LocalStore, MemoryStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> Buffer:
    return cpu.Buffer.from_bytes(data)


async def test_set_many_with_several_failures_raises_one_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_concurrency=8)
    await store.set("file", buf(b"not a folder"))
    # Every one of these needs "file" to be a folder: all fail, in several workers at once.
    items = [(f"file/{i}", buf(b"x")) for i in range(50)]
    for _ in range(5):
        with pytest.raises((FileExistsError, NotADirectoryError)) as caught:
            await store.set_many(items)
        assert not isinstance(caught.value, BaseExceptionGroup)
        notes = getattr(caught.value, "__notes__", [])
        assert all("failed too" in note for note in notes)
    assert (tmp_path / "file").read_bytes() == b"not a folder"


async def test_fetch_many_with_several_failures_raises_one_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, max_concurrency=8)
    await store.set("k", buf(b"v"))
    with pytest.raises(ValueError, match="invalid key") as caught:
        async with store.fetch_many(["k", "../a", "../b", "../c"]) as results:
            async for _ in results:
                pass
    assert not isinstance(caught.value, BaseExceptionGroup)


class CountingDict(MutableMapping[str, Buffer]):
    """A store_dict that counts how often each key was written."""

    def __init__(self) -> None:
        self.data: dict[str, Buffer] = {}
        self.writes: dict[str, int] = {}

    def __getitem__(self, key: str) -> Buffer:
        return self.data[key]

    def __setitem__(self, key: str, value: Buffer) -> None:
        self.writes[key] = self.writes.get(key, 0) + 1
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_memory_set_if_not_exists_has_one_winner_across_threads_and_loops() -> None:
    # Large values make the copy between "is it there?" and "put it there" slow: the window
    # in which two or three writers all won, in every run, before the fix.
    values = [bytes([i]) * (16 << 20) for i in range(3)]
    for round_number in range(5):
        data = CountingDict()
        store = MemoryStore(data)
        start = threading.Barrier(len(values))

        def writer(
            value: bytes, backend: str, store: MemoryStore, start: threading.Barrier
        ) -> None:
            async def write() -> None:
                start.wait()
                await store.set_if_not_exists("lock", buf(value))

            anyio.run(write, backend=backend)

        threads = [
            threading.Thread(target=writer, args=(value, ("asyncio", "trio")[i % 2], store, start))
            for i, value in enumerate(values)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert data.writes["lock"] == 1, f"round {round_number}: {data.writes['lock']} winners"
        assert data["lock"].to_bytes() in values
