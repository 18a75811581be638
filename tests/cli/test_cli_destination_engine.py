"""The copy engine onto a destination that holds data, and ``--verify`` against destinations that
lie, in process under asyncio and trio.

The lying destinations are real stores (a MemoryStore) that drop or mangle one write and say
nothing: what a full disk behind a cache, a buggy proxy or a flaky gateway does. A check that
only compared the value it wrote with itself would pass them all.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from zarr.core.buffer import Buffer, default_buffer_prototype

import zarr_anyio
from zarr_anyio.cli.copy import CopyOptions, CopyReport, copy_node
from zarr_anyio.cli.copy_plan import DestinationHoldsData
from zarr_anyio.cli.verify import verify_node

pytestmark = pytest.mark.anyio

PROTO = default_buffer_prototype()


def buffer(data: bytes) -> Buffer:
    return PROTO.buffer.from_bytes(data)


def source() -> zarr_anyio.MemoryStore:
    values = {f"a/c/{i}": bytes([i]) * 100 for i in range(10)}
    values.update({"zarr.json": b'{"node_type": "group"}', "a/zarr.json": b'{"array": 1}'})
    return zarr_anyio.MemoryStore({key: buffer(data) for key, data in values.items()})


def contents(store: zarr_anyio.MemoryStore) -> dict[str, bytes]:
    return {key: value.to_bytes() for key, value in store._store_dict.items()}


class DroppingStore(zarr_anyio.MemoryStore):
    """Says it wrote ``victim`` and did not."""

    def __init__(self, victim: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.victim = victim

    async def set(self, key: str, value: Buffer) -> None:
        if key != self.victim:
            await super().set(key, value)


class ManglingStore(zarr_anyio.MemoryStore):
    """Writes ``victim`` with one byte flipped, same size."""

    def __init__(self, victim: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.victim = victim

    async def set(self, key: str, value: Buffer) -> None:
        if key == self.victim:
            data = bytearray(value.to_bytes())
            data[0] ^= 0xFF
            value = buffer(bytes(data))
        await super().set(key, value)


async def copied_and_verified(
    dst: zarr_anyio.MemoryStore, how: str, options: CopyOptions | None = None
) -> CopyReport:
    src = source()
    report = await copy_node(src, dst, options=options)
    await verify_node(src, dst, "", how, report)  # type: ignore[arg-type]
    return report


@pytest.mark.parametrize("how", ["bytes", "sizes"])
async def test_verify_finds_a_write_the_destination_dropped(how: str) -> None:
    report = await copied_and_verified(DroppingStore("a/c/4"), how)
    assert report.keys_copied == report.keys_verified == 12
    assert report.mismatched_keys == 1
    assert report.examples["mismatched"] == ["a/c/4: missing"]


async def test_verify_finds_a_write_the_destination_mangled() -> None:
    report = await copied_and_verified(ManglingStore("a/c/7"), "bytes")
    assert report.mismatched_keys == 1
    assert report.examples["mismatched"] == ["a/c/7: bytes differ"]
    # Sizes are the cheaper, named choice: blind to this.
    report = await copied_and_verified(ManglingStore("a/c/7"), "sizes")
    assert report.mismatched_keys == 0


async def test_verify_finds_metadata_the_destination_mangled() -> None:
    report = await copied_and_verified(ManglingStore("zarr.json"), "bytes")
    assert report.examples["mismatched"] == ["zarr.json: bytes differ"]


async def test_verify_finds_a_key_at_the_destination_only() -> None:
    src = source()
    dst = zarr_anyio.MemoryStore()
    report = await copy_node(src, dst)
    await dst.set("a/c/99", buffer(b"left over"))
    await verify_node(src, dst, "", "sizes", report)
    assert report.examples["mismatched"] == ["a/c/99: at DST only, not in SRC"]


async def test_verify_of_one_node() -> None:
    src = source()
    dst = zarr_anyio.MemoryStore()
    report = await copy_node(src, dst, "a")
    assert sorted(dst._store_dict) == [*(f"c/{i}" for i in range(10)), "zarr.json"]
    await verify_node(src, dst, "a", "bytes", report)
    assert (report.keys_verified, report.mismatched_keys) == (11, 0)


class RecordingStore(zarr_anyio.MemoryStore):
    """Remembers every write and delete, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, str]] = []

    async def set(self, key: str, value: Buffer) -> None:
        await super().set(key, value)
        self.log.append(("set", key))

    async def delete(self, key: str) -> None:
        await super().delete(key)
        self.log.append(("delete", key))


def old_destination() -> dict[str, Buffer]:
    """What an older copy left: different metadata, a chunk that changed, one the source lacks."""
    values = {key: value.to_bytes() for key, value in source()._store_dict.items()}
    values.update(
        {
            "zarr.json": b'{"node_type": "group", "old": 1}',
            "a/zarr.json": b'{"array": 0}',
            "a/c/2": b"x" * 100,
            "a/c/50": b"stale",
            "b/zarr.json": b"{}",
        }
    )
    return {key: buffer(data) for key, data in values.items()}


@pytest.mark.parametrize("existing", ["skip", "overwrite"])
async def test_metadata_goes_down_first_and_up_last(existing: str) -> None:
    src = source()
    dst = RecordingStore(old_destination())
    options = CopyOptions(existing=existing, workers=4)  # type: ignore[arg-type]
    report = await copy_node(src, dst, options=options)
    assert contents(dst) == contents(src)
    assert report.keys_deleted == 2  # a/c/50 and b/zarr.json

    metadata = {"zarr.json", "a/zarr.json", "b/zarr.json"}
    log = dst.log
    # The old metadata goes first, the root's before any other...
    assert log[0] == ("delete", "zarr.json")
    assert {key for _, key in log[:3]} == metadata
    assert all(action == "delete" for action, _ in log[:3])
    # ...the new metadata last, the root's after everything.
    assert log[-2:] == [("set", "a/zarr.json"), ("set", "zarr.json")]
    changed = [key for _, key in log[3:-2]]
    if existing == "skip":
        assert sorted(changed) == ["a/c/2", "a/c/50"]
    else:
        assert sorted(changed) == sorted([*(f"a/c/{i}" for i in range(10)), "a/c/50"])


async def test_a_destination_that_matches_is_not_touched() -> None:
    dst = RecordingStore(dict(source()._store_dict))
    report = await copy_node(source(), dst, options=CopyOptions(existing="skip"))
    assert dst.log == []
    assert report.keys_skipped == 12
    assert not report.metadata_written


async def test_a_refused_copy_touches_nothing() -> None:
    dst = RecordingStore(old_destination())
    before = contents(dst)
    with pytest.raises(DestinationHoldsData, match=r"--skip-existing.*--overwrite"):
        await copy_node(source(), dst)
    assert dst.log == []
    assert contents(dst) == before


async def test_a_dry_run_counts_what_the_copy_would_do_and_does_nothing() -> None:
    dst = RecordingStore(old_destination())
    before = contents(dst)
    options = CopyOptions(existing="skip", dry_run=True)
    report = await copy_node(source(), dst, options=options)
    assert dst.log == []
    assert contents(dst) == before
    real = await copy_node(
        source(), RecordingStore(old_destination()), options=CopyOptions(existing="skip")
    )
    assert (report.keys_copied, report.keys_skipped, report.keys_deleted) == (
        real.keys_copied,
        real.keys_skipped,
        real.keys_deleted,
    )
    assert sorted(report.examples["would delete"]) == ["a/c/50", "b/zarr.json"]


class StallingStore(zarr_anyio.MemoryStore):
    """Holds the write of ``victim`` until cancelled, as a slow PUT does."""

    def __init__(self, victim: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.victim = victim
        self.stalled = anyio.Event()

    async def set(self, key: str, value: Buffer) -> None:
        if key == self.victim:
            self.stalled.set()
            await anyio.sleep_forever()
        await super().set(key, value)


async def test_a_stopped_copy_counts_exactly_what_it_wrote() -> None:
    dst = StallingStore("a/c/6")
    report = CopyReport()
    async with anyio.create_task_group() as tg:

        async def copy() -> None:
            await copy_node(source(), dst, options=CopyOptions(workers=3), report=report)

        tg.start_soon(copy)
        await dst.stalled.wait()
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    written = [key for key in dst._store_dict if key != "a/c/6"]
    # Every key counted as copied is at the destination; the one being written is counted
    # apart, as neither.
    assert report.keys_copied == len(written) > 0
    assert report.keys_in_doubt == 1
    assert report.examples["in doubt"] == ["a/c/6"]
