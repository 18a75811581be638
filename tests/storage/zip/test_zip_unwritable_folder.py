"""ZipStore on a writable zip in a folder this user cannot write (a shared archive in a folder
someone else owns), checked for real in a child process that file permissions bind (see
`unprivileged`: as root, one without the capabilities that bypass them).

A rewrite needs the folder (its copy goes beside the archive and is renamed over it): where the
folder refuses, compaction and close after a delete keep the file whole and appending and say so
with a warning; an explicit ``rewrite()`` raises a `RewriteRefused` naming the folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import unprivileged

CHILD = r"""
import json, os, sys, warnings, zipfile
import anyio
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr_anyio import ZipStore
from zarr_anyio.storage import _zip as zip_module

zip_module._COMPACT_FLOOR = 10_000
path, backend, what = sys.argv[1], sys.argv[2], sys.argv[3]
report = {"tries": 0}
try:  # the folder must refuse this process a new file (else the check proves nothing)
    os.close(os.open(os.path.join(os.path.dirname(path), "probe"), os.O_CREAT | os.O_EXCL))
    report["probe"] = "created"
    os.unlink(os.path.join(os.path.dirname(path), "probe"))
except PermissionError:
    report["probe"] = "refused"
rewrite_session = ZipStore._rewrite_session

def counted(self, *args):
    report["tries"] += 1
    return rewrite_session(self, *args)

ZipStore._rewrite_session = counted

def buf(data):
    return cpu.Buffer.from_bytes(data)

async def overwrites_and_delete():
    store = ZipStore(path, mode="a")
    for round_ in range(40):  # dead bytes pass the (lowered) floor again and again
        await store.set("k", buf(bytes([round_]) * 4000))
    await store.delete("gone")
    await store.aclose()
    report["size"] = os.path.getsize(path)

async def explicit_rewrite():
    store = ZipStore(path, mode="a")
    await store.delete("gone")
    try:
        await store.rewrite()
    except PermissionError as error:
        report["error"] = [type(error).__name__, str(error)]
    await store.set("after", buf(b"still writable"))
    await store.aclose()

async def main():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await {"overwrites": overwrites_and_delete, "rewrite": explicit_rewrite}[what]()
    report["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]

anyio.run(main, backend=backend)
with zipfile.ZipFile(path) as archive:
    assert archive.testzip() is None
    report["names"] = sorted(archive.namelist())
    report["k"] = archive.read("k")[:1].hex() if "k" in archive.namelist() else None
print(json.dumps(report))
"""


def run_unprivileged(*args: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(unprivileged.run(CHILD, *args).stdout)
    return report


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder in the system's temporary folder, which the child can reach (pytest's own are
    private to their user), holding a zip that anyone may write, both someone else's; each test
    sets the folder's mode."""
    folder = Path(tempfile.mkdtemp(prefix="zarr-anyio-shared-"))
    try:
        with zipfile.ZipFile(folder / "data.zip", "w") as archive:
            archive.writestr("gone", b"g" * 50_000)
            archive.writestr("keep", b"kept")
        (folder / "data.zip").chmod(0o666)
        unprivileged.give_away(folder, folder / "data.zip")
        yield folder
    finally:
        folder.chmod(0o700)
        shutil.rmtree(folder)


def no_rewrite_files(folder: Path) -> bool:
    return [p.name for p in folder.iterdir()] == ["data.zip"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_compaction_and_close_after_a_delete_fall_back_to_appending(
    shared_folder: Path, backend: str
) -> None:
    unprivileged.restrict(shared_folder, 0o755)
    report = run_unprivileged(str(shared_folder / "data.zip"), backend, "overwrites")
    assert report["probe"] == "refused"
    assert report["names"] == ["k", "keep"]
    assert report["k"] == bytes([39]).hex()
    kinds = [kind for kind, _ in report["warnings"]]
    # Said once for the dead bytes, once for the deleted key: not at every write.
    assert kinds == ["ZipNotRewrittenWarning", "ZipNotRewrittenWarning"]
    first, second = (message for _, message in report["warnings"])
    assert str(shared_folder) in first
    assert "not rewritten" in first
    assert "deleted keys (1)" in second
    # Compaction is tried again later, once the dead bytes doubled, not at each of the ~37
    # writes past the threshold (each try may copy the whole archive before it is refused).
    assert 2 <= report["tries"] < 8
    assert no_rewrite_files(shared_folder)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_explicit_rewrite_that_the_folder_refuses_says_why_and_changes_nothing(
    shared_folder: Path, backend: str
) -> None:
    unprivileged.restrict(shared_folder, 0o755)
    report = run_unprivileged(str(shared_folder / "data.zip"), backend, "rewrite")
    assert report["probe"] == "refused"
    kind, message = report["error"]
    assert kind == "RewriteRefused"
    assert str(shared_folder) in message
    assert "does not let this user create or replace files" in message
    assert report["names"] == ["after", "keep"]
    assert no_rewrite_files(shared_folder)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_sticky_folder_with_an_archive_someone_else_owns(
    shared_folder: Path, backend: str
) -> None:
    """Anyone may create files in a sticky folder (as /tmp), but only the archive's owner may
    replace it (and the copy would be this user's): refused before any copying, nothing left."""
    if os.geteuid() != 0:
        unprivileged.restrict(shared_folder, 0o755)  # not root: cannot give the archive away
    else:
        shared_folder.chmod(0o1777)  # the folder and the archive are someone else's
    report = run_unprivileged(str(shared_folder / "data.zip"), backend, "overwrites")
    assert report["names"] == ["k", "keep"]
    assert [kind for kind, _ in report["warnings"]] == ["ZipNotRewrittenWarning"] * 2
    if os.geteuid() == 0:
        assert report["probe"] == "created"
        assert f"belongs to user {unprivileged.OTHER}" in report["warnings"][0][1]
    assert no_rewrite_files(shared_folder)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_archive_of_another_user_is_not_made_this_users_by_a_rewrite(
    shared_folder: Path, backend: str
) -> None:
    """A folder anyone may write, an archive someone else owns: the copy could be made and put
    in place, but it would be this user's, and the owner could lose write access to it."""
    shared_folder.chmod(0o777)
    owner = (shared_folder / "data.zip").stat().st_uid
    report = run_unprivileged(str(shared_folder / "data.zip"), backend, "overwrites")
    assert report["names"] == ["k", "keep"]
    assert (shared_folder / "data.zip").stat().st_uid == owner
    if os.geteuid() == 0:  # only root can make an archive someone else's
        assert report["probe"] == "created"
        assert [kind for kind, _ in report["warnings"]] == ["ZipNotRewrittenWarning"] * 2
        assert f"belongs to user {unprivileged.OTHER}" in report["warnings"][0][1]
    assert no_rewrite_files(shared_folder)


@pytest.mark.anyio
async def test_a_rewrite_keeps_the_owner_where_it_can(shared_folder: Path) -> None:
    """Where this user may give files away (root), the copy takes the archive's owner and
    group, and the rewrite goes ahead."""
    from zarr_anyio import ZipStore

    path = shared_folder / "data.zip"
    before = path.stat()
    async with ZipStore(path, mode="a") as store:
        await store.delete("gone")
    after = path.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # rewritten: a new file in its place
    assert after.st_size < 50_000
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["keep"]
