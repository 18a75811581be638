"""The command's engine in process, under asyncio and trio: paged listings, the copy's order of
writes and its memory bound, and the counters the progress display reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
from anyio import wait_all_tasks_blocked
from zarr.core.buffer import Buffer, default_buffer_prototype

import zarr_anyio
import zarr_anyio.storage._localfs
from support.remote import fill, http_store
from support.servers import Faults, HTTPServer, S3Server
from zarr_anyio import Retry
from zarr_anyio.cli.copy import ByteBudget, CopyOptions, CopyReport, copy_node, metadata_levels
from zarr_anyio.cli.progress import progress_line, store_counters
from zarr_anyio.cli.urls import storage_options
from zarr_anyio.storage._listing import PAGE_SIZE, list_node

pytestmark = pytest.mark.anyio

PROTO = default_buffer_prototype()


def buffer(data: bytes) -> Buffer:
    return PROTO.buffer.from_bytes(data)


class RecordingStore(zarr_anyio.MemoryStore):
    """A MemoryStore that remembers the order keys were written in and how many values were
    being written at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[str] = []

    async def set(self, key: str, value: Buffer) -> None:
        await anyio.sleep(0.001)
        await super().set(key, value)
        self.written.append(key)


async def test_local_listing_is_paged_with_sizes(tmp_path: Path) -> None:
    store = zarr_anyio.LocalStore(tmp_path)
    folder = tmp_path / "a" / "c"
    folder.mkdir(parents=True)
    for number in range(PAGE_SIZE + 500):
        (folder / str(number)).write_bytes(b"x" * (number % 7))
    (tmp_path / "a" / "zarr.json").write_text("{}")
    # A write in progress (its temporary file's name holds a backslash, which no key can).
    (folder / f"{zarr_anyio.storage._localfs.TEMP_PREFIX}half-written").write_bytes(b"partial")
    (tmp_path / "other").write_bytes(b"elsewhere")

    pages = [page async for page in list_node(store, "a")]
    assert max(len(page) for page in pages) == PAGE_SIZE
    found = dict(entry for page in pages for entry in page)
    assert len(found) == PAGE_SIZE + 501
    assert found["a/c/13"] == 13 % 7
    assert found["a/zarr.json"] == 2
    assert not [key for key in found if "written" in key or key == "other"]


async def test_obstore_and_s3fs_listings_give_store_keys_and_sizes(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
    }
    writer = zarr_anyio.FsspecStore.from_url(f"s3://{bucket}/root", storage_options=options)
    expected = {f"n/c/{i}": i for i in range(1, 1200, 37)}
    expected["n/zarr.json"] = 2
    await writer.set_many([(key, buffer(b"y" * size)) for key, size in expected.items()])
    await writer.set("nn/other", buffer(b"not under the node n"))
    stores = [
        writer,
        zarr_anyio.ObjectStore(s3_server.obstore(bucket, prefix="root")),
    ]
    try:
        for store in stores:
            found = {key: size async for page in list_node(store, "n") for key, size in page}
            assert found == expected, store
    finally:
        await writer.aclose()


async def test_metadata_is_written_after_the_data_root_last() -> None:
    src = zarr_anyio.MemoryStore()

    def write() -> None:
        group = zarr.open_group(store=src, mode="w", zarr_format=2, attributes={"title": "t"})
        group.create_array("g/x", shape=(20,), chunks=(5,), dtype="u1")[:] = np.arange(20)
        zarr.consolidate_metadata(src)

    await anyio.to_thread.run_sync(write)
    dst = RecordingStore()

    report = await copy_node(src, dst, options=CopyOptions(workers=8))

    assert report.keys_copied == len(src._store_dict) == len(dst.written)
    metadata = [key for key in dst.written if key.rsplit("/", 1)[-1].startswith((".z", "zarr"))]
    data = [key for key in dst.written if key not in metadata]
    assert dst.written[: len(data)] == data  # every chunk before any metadata
    assert dst.written[-1] == ".zmetadata"
    assert dst.written.index("g/x/.zarray") < dst.written.index("g/.zgroup")
    assert dst.written.index("g/.zgroup") < dst.written.index(".zgroup")
    assert report.metadata_written


def test_metadata_levels_order() -> None:
    keys = [".zmetadata", "zarr.json", "a/zarr.json", "a/b/.zattrs", "a/b/.zarray", ".zgroup"]
    assert metadata_levels(keys) == [
        ["a/b/.zattrs"],
        ["a/b/.zarray"],
        ["a/zarr.json"],
        [".zgroup", "zarr.json"],
        [".zmetadata"],
    ]


class Held:
    """Bytes read from the source and not yet written to the destination, and the most seen."""

    def __init__(self) -> None:
        self.now = self.most = 0


class Source(zarr_anyio.MemoryStore):
    def __init__(self, values: dict[str, Buffer], held: Held) -> None:
        super().__init__(values)
        self.held = held

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Buffer | None:
        value = await super().get(key, *args, **kwargs)
        if value is not None:
            self.held.now += len(value)
            self.held.most = max(self.held.most, self.held.now)
        return value


class Destination(RecordingStore):
    def __init__(self, held: Held) -> None:
        super().__init__()
        self.held = held

    async def set(self, key: str, value: Buffer) -> None:
        await super().set(key, value)
        self.held.now -= len(value)


async def test_values_in_flight_stay_within_the_byte_budget() -> None:
    sizes = {f"c/{i}": 100_000 for i in range(40)}
    held = Held()
    src = Source({key: buffer(b"v" * size) for key, size in sizes.items()}, held)
    dst = Destination(held)
    report = await copy_node(src, dst, options=CopyOptions(workers=32, max_bytes=300_000))
    assert report.keys_copied == len(sizes)
    assert sorted(dst.written) == sorted(sizes)
    assert held.most == 300_000

    # A value bigger than the whole budget is copied, alone.
    held = Held()
    src = Source({**src._store_dict, "c/huge": buffer(b"h" * 1_000_000)}, held)
    report = await copy_node(src, Destination(held), options=CopyOptions(max_bytes=300_000))
    assert report.keys_copied == len(sizes) + 1
    assert held.most == 1_000_000


async def test_byte_budget_is_first_come_first_served_and_survives_cancellation() -> None:
    budget = ByteBudget(10)
    granted: list[str] = []
    release = anyio.Event()

    async def take(name: str, size: int) -> None:
        async with budget.take(size):
            granted.append(name)
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "first", 8)
        await wait_all_tasks_blocked()
        with anyio.CancelScope() as cancelled:
            cancelled.cancel()
            await take("cancelled", 5)
        tg.start_soon(take, "big", 6)
        await wait_all_tasks_blocked()
        tg.start_soon(take, "small", 1)
        await wait_all_tasks_blocked()
        # "small" would fit beside "first", but waits its turn behind "big".
        assert granted == ["first"]
        assert budget.used == 8
        release.set()
    assert granted[0] == "first"
    assert sorted(granted[1:]) == ["big", "small"]
    assert budget.used == 0
    assert budget.most_used == 8


async def test_invalid_source_keys_are_left_out_and_counted() -> None:
    values = {"zarr.json": buffer(b"{}"), "c/0": buffer(b"1"), "c//1": buffer(b"2")}
    src = zarr_anyio.MemoryStore(values)
    dst = zarr_anyio.MemoryStore()
    report = await copy_node(src, dst)
    assert sorted(dst._store_dict) == ["c/0", "zarr.json"]
    assert report.invalid_keys == 1
    assert report.examples["invalid keys"] == ["c//1"]


async def test_nothing_under_the_node_is_an_error() -> None:
    src = zarr_anyio.MemoryStore({"a/zarr.json": buffer(b"{}")})
    with pytest.raises(FileNotFoundError, match="nothing to copy"):
        await copy_node(src, zarr_anyio.MemoryStore(), "b")


async def test_counters_come_from_the_remote_stores(http_server: HTTPServer) -> None:
    fill(http_server, 40)
    http_server.faults = Faults(slow_down=0.25, seed=3)
    remote = http_store("obstore", http_server, retry=Retry(attempts=10, base_delay=0.001))
    await remote.get_partial_values(PROTO, [(f"c/{i}", None) for i in range(40)])
    assert store_counters([zarr_anyio.MemoryStore()]) is None
    counters = store_counters([zarr_anyio.MemoryStore(), remote])
    assert counters is not None
    assert counters["throttled"] == http_server.spoiled["503"] > 0
    assert counters["retries"] == http_server.spoiled["503"]
    report = CopyReport(keys_total=10, bytes_total=2048, keys_copied=4, bytes_copied=1024)
    line = progress_line(report, counters)
    assert "50%" in line
    assert "keys 4/10" in line
    assert f"retries {counters['retries']}" in line
    assert f"throttled {counters['throttled']}" in line


def test_storage_options_parse_json_and_nest() -> None:
    options = storage_options(
        ["anon=true", "client_kwargs.endpoint_url=http://x:1", "n=3", "name=text", 'd={"a": 1}']
    )
    assert options == {
        "anon": True,
        "client_kwargs": {"endpoint_url": "http://x:1"},
        "n": 3,
        "name": "text",
        "d": {"a": 1},
    }
    assert json.loads(json.dumps(options)) == options
