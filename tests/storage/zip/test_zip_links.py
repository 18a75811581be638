"""ZipStore opened through a symbolic link: a rewrite (compaction, close after a delete) writes
the file the link points to and leaves the link a link, as zarr's ZipStore does (it writes in
place). An archive with other hard links is not rewritten: a copy in its place would leave the
other names on the old file."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from zarr.core.buffer import cpu, default_buffer_prototype

from zarr_anyio import RewriteRefused, ZipNotRewrittenWarning, ZipStore
from zarr_anyio.storage import _zip as zip_module

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


def linked_archive(tmp_path: Path, relative: bool = False) -> tuple[Path, Path]:
    """``tmp_path/data.zip -> shared/data.zip`` (the link, the archive)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    archive = shared / "data.zip"
    link = tmp_path / "data.zip"
    link.symlink_to(Path("shared/data.zip") if relative else archive)
    return link, archive


def names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted(archive.namelist())


@pytest.mark.parametrize("relative", [False, True])
async def test_close_after_a_delete_rewrites_the_target_not_the_link(
    tmp_path: Path, relative: bool
) -> None:
    link, archive = linked_archive(tmp_path, relative)
    async with ZipStore(link, mode="w") as store:
        await store.set("a", buf(b"A" * 1000))
        await store.set("b", buf(b"B"))
    async with ZipStore(link, mode="a") as store:
        await store.delete("a")
    assert link.is_symlink()
    assert names(archive) == ["b"]
    # The deleted bytes are gone from the real archive (it was rewritten, not only appended to).
    assert b"A" * 1000 not in archive.read_bytes()
    # Later writes through the link reach the archive.
    async with ZipStore(link, mode="a") as store:
        await store.set("c", buf(b"C"))
    assert link.is_symlink()
    assert names(archive) == ["b", "c"]
    assert names(link) == ["b", "c"]
    # Nothing of ours is left beside the link or the archive.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip", "shared"]
    assert [p.name for p in archive.parent.iterdir()] == ["data.zip"]


async def test_compaction_and_rewrite_through_a_link_keep_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zip_module, "_COMPACT_FLOOR", 10_000)
    link, archive = linked_archive(tmp_path)
    store = ZipStore(link, mode="w")
    for round_ in range(20):  # overwrites: dead bytes pass the floor, compaction runs
        await store.set("k", buf(bytes([round_]) * 4000))
    assert link.is_symlink()
    await store.set("other", buf(b"o"))
    await store.rewrite()
    assert link.is_symlink()
    await store.set("last", buf(b"l"))
    await store.aclose()
    assert link.is_symlink()
    assert os.path.getsize(archive) < 3 * 4000
    assert names(archive) == ["k", "last", "other"]
    async with ZipStore(archive, mode="r") as reader:
        value = await reader.get("k", PROTO)
        assert value is not None
        assert value.to_bytes() == bytes([19]) * 4000


async def test_a_rewrite_left_by_a_crash_beside_the_target_is_removed(tmp_path: Path) -> None:
    link, archive = linked_archive(tmp_path)
    async with ZipStore(link, mode="w") as store:
        await store.set("a", buf(b"A"))
    stale = archive.parent / f"{zip_module._REWRITE_MARK}data.zip.0123456789abcdef"
    stale.write_bytes(b"half a copy")
    async with ZipStore(link, mode="a") as store:
        await store.set("b", buf(b"B"))
    assert not stale.exists()


async def test_a_hard_linked_archive_is_not_split_by_a_rewrite(tmp_path: Path) -> None:
    archive, other = tmp_path / "data.zip", tmp_path / "other-name.zip"
    async with ZipStore(archive, mode="w") as store:
        await store.set("a", buf(b"A" * 1000))
        await store.set("b", buf(b"B"))
    os.link(archive, other)
    with pytest.warns(ZipNotRewrittenWarning, match="2 hard links"):
        async with ZipStore(archive, mode="a") as store:
            await store.delete("a")
    assert os.path.samefile(archive, other)
    assert names(other) == ["b"]
    store = ZipStore(other, mode="a")
    await store.set("c", buf(b"C"))
    with pytest.raises(RewriteRefused, match="hard links"):
        await store.rewrite()
    await store.aclose()
    assert os.path.samefile(archive, other)
    assert names(archive) == ["b", "c"]
