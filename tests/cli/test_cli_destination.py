"""``zarr-anyio copy`` onto a destination that already holds data, run as users run it.

The promise under test: a copy that exits 0 leaves the destination reading exactly what the
source reads (the same keys, the same bytes); a copy that refuses exits non-zero and leaves the
destination as it was. Each way a destination can be out of date (a chunk the source no longer
has, a chunk changed without changing size, a damaged chunk, changed metadata, an array replaced
by a group) is tried on a folder, a zip file and S3 through both backends.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype

import zarr_anyio
from support.command_line import files_of, make_hierarchy, run_cli, s3_options
from support.servers import CountingProxy, S3Server
from zarr_anyio.cli import new_place
from zarr_anyio.cli.new_place import first_missing, remove_if_still_empty

CHUNK_ITEMS = 256  # make_hierarchy's chunks: 1024 bytes of int32


@dataclass
class Place:
    """A destination: its URL, the options to reach it, and how to look at it from outside."""

    url: str
    options: list[str]
    files: Callable[[], dict[str, bytes]]
    put: Callable[[str, bytes], None]


def folder_place(tmp_path: Path) -> Place:
    root = tmp_path / "dst.zarr"

    def put(key: str, data: bytes) -> None:
        (root / key).write_bytes(data)

    return Place(str(root), [], lambda: files_of(root), put)


def zip_place(tmp_path: Path) -> Place:
    path = tmp_path / "dst.zip"

    def files() -> dict[str, bytes]:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # A key written again must not leave its old member listed beside the new one.
            assert len(names) == len(set(names)), names
            return {name: archive.read(name) for name in names if not name.endswith("/")}

    def put(key: str, data: bytes) -> None:
        async def write() -> None:
            store = zarr_anyio.ZipStore(path, mode="a")
            try:
                await store.set(key, default_buffer_prototype().buffer.from_bytes(data))
            finally:
                await store.aclose()

        anyio.run(write)

    return Place(str(path), [], files, put)


def s3_place(server: S3Server, backend: str) -> Place:
    bucket = server.new_bucket()
    fs = server.setup_fs()
    root = f"{bucket}/dst.zarr"

    def files() -> dict[str, bytes]:
        fs.invalidate_cache()
        return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}

    def put(key: str, data: bytes) -> None:
        fs.pipe_file(f"{root}/{key}", data)

    options = ["--backend", backend, *s3_options(server.endpoint, backend)]
    return Place(f"s3://{root}", options, files, put)


PLACES = ["folder", "zip", "s3-fsspec", "s3-obstore"]


@pytest.fixture(params=PLACES)
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    kind: str = request.param
    if kind == "folder":
        return folder_place(tmp_path)
    if kind == "zip":
        return zip_place(tmp_path)
    return s3_place(request.getfixturevalue("s3_server"), kind.removeprefix("s3-"))


# ------------------------------------------------------------ ways a destination is out of date


def stale_extra_chunk(src: Path, place: Place) -> None:
    # Writing the fill value over a chunk deletes it: the source reads zeros there now, and a
    # destination that kept its old chunk would read the old numbers.
    zarr.open_array(str(src / "a"), mode="r+")[3 * CHUNK_ITEMS : 4 * CHUNK_ITEMS] = 0
    assert not (src / "a" / "c" / "3").exists()


def same_size_change(src: Path, place: Place) -> None:
    array = zarr.open_array(str(src / "a"), mode="r+")
    array[:] = np.asarray(array[:]) + 1  # uncompressed: every chunk keeps its size


def damaged_chunk(src: Path, place: Place) -> None:
    spoiled = bytearray((src / "a" / "c" / "5").read_bytes())
    spoiled[10] ^= 0xFF
    place.put("a/c/5", bytes(spoiled))


def metadata_changed(src: Path, place: Place) -> None:
    # Same length, so that only the bytes tell.
    zarr.open_group(str(src), mode="r+").attrs["title"] = "TEST"


def node_replaced_by_group(src: Path, place: Place) -> None:
    shutil.rmtree(src / "a")
    group = zarr.open_group(str(src), mode="r+").create_group("a")
    group.create_array("x", shape=(4,), chunks=(2,), dtype="uint8")[:] = [1, 2, 3, 4]


CHANGES = [stale_extra_chunk, same_size_change, damaged_chunk, metadata_changed]
CHANGES.append(node_replaced_by_group)


def first_copy(tmp_path: Path, place: Place) -> Path:
    src = make_hierarchy(tmp_path / "src.zarr")
    done = run_cli("copy", str(src), place.url, *place.options, "--quiet")
    assert done.returncode == 0, done.stderr
    assert place.files() == files_of(src)
    return src


@pytest.mark.parametrize("change", CHANGES, ids=[change.__name__ for change in CHANGES])
def test_a_destination_holding_data_is_refused_then_brought_up_to_date(
    tmp_path: Path, place: Place, change: Callable[[Path, Place], None]
) -> None:
    src = first_copy(tmp_path, place)
    change(src, place)
    before = place.files()
    assert before != files_of(src)

    refused = run_cli("copy", str(src), place.url, *place.options)
    assert refused.returncode == 1
    message = refused.stderr.strip()
    assert message.count("\n") == 0, message
    assert "--skip-existing" in message
    assert "--overwrite" in message
    assert refused.stdout == ""
    assert place.files() == before

    resumed = run_cli(
        "copy", str(src), place.url, *place.options, "--skip-existing", "--verify", "--json"
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["mismatched_keys"] == 0
    assert 0 < summary["keys_skipped"] < len(files_of(src))
    assert place.files() == files_of(src)


@pytest.mark.parametrize("change", CHANGES, ids=[change.__name__ for change in CHANGES])
def test_overwrite_replaces_the_destination(
    tmp_path: Path, place: Place, change: Callable[[Path, Place], None]
) -> None:
    src = first_copy(tmp_path, place)
    change(src, place)

    replaced = run_cli("copy", str(src), place.url, *place.options, "--overwrite", "--json")
    assert replaced.returncode == 0, replaced.stderr
    summary = json.loads(replaced.stdout)
    assert summary["keys_copied"] == len(files_of(src))
    assert place.files() == files_of(src)


def test_skip_existing_on_an_up_to_date_destination_changes_nothing(tmp_path: Path) -> None:
    place = folder_place(tmp_path)
    src = first_copy(tmp_path, place)
    dst = Path(place.url)
    stamps = {path: path.stat().st_mtime_ns for path in dst.rglob("*") if path.is_file()}

    again = run_cli("copy", str(src), place.url, "--skip-existing", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["keys_skipped"] == len(files_of(src))
    assert summary["keys_copied"] == summary["keys_deleted"] == 0
    # Not a key rewritten, the metadata included.
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps


def test_size_only_is_the_explicit_shortcut_that_cannot_see_a_same_size_change(
    tmp_path: Path,
) -> None:
    place = folder_place(tmp_path)
    src = first_copy(tmp_path, place)
    same_size_change(src, place)
    stale = place.files()

    by_size = run_cli("copy", str(src), place.url, "--skip-existing", "--size-only", "--json")
    assert by_size.returncode == 0, by_size.stderr
    assert json.loads(by_size.stdout)["keys_copied"] == 0
    assert place.files() == stale

    alone = run_cli("copy", str(src), place.url, "--size-only")
    assert alone.returncode == 2
    assert "--skip-existing" in alone.stderr


def test_a_dry_run_tells_what_would_change_and_changes_nothing(tmp_path: Path) -> None:
    place = folder_place(tmp_path)
    src = first_copy(tmp_path, place)
    stale_extra_chunk(src, place)
    before = place.files()

    dry = run_cli("copy", str(src), place.url, "--skip-existing", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout)
    assert summary["examples"]["would delete"] == ["a/c/3"]
    assert summary["keys_deleted"] == 1
    # The metadata goes down and up again around any change: all four keys would be written.
    assert sorted(summary["examples"]["would copy"]) == sorted(
        key for key in files_of(src) if key.endswith("zarr.json")
    )
    assert place.files() == before

    text = run_cli("copy", str(src), place.url, "--skip-existing", "--dry-run")
    assert "would delete 1 keys that SRC does not have" in text.stdout

    refused = run_cli("copy", str(src), place.url, "--dry-run")
    assert refused.returncode == 1
    assert place.files() == before


def test_what_a_replaced_destination_reads(tmp_path: Path) -> None:
    place = folder_place(tmp_path)
    src = first_copy(tmp_path, place)
    stale_extra_chunk(src, place)
    assert run_cli("copy", str(src), place.url, "--overwrite").returncode == 0
    copied = np.asarray(zarr.open_array(str(Path(place.url) / "a"), mode="r")[:])
    assert np.array_equal(copied, zarr.open_array(str(src / "a"), mode="r")[:])
    assert not copied[3 * CHUNK_ITEMS : 4 * CHUNK_ITEMS].any()


def test_a_zip_member_that_fails_its_checksum_is_found_and_written_again(tmp_path: Path) -> None:
    place = zip_place(tmp_path)
    src = first_copy(tmp_path, place)
    path = Path(place.url)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("a/c/5")
    # One byte of the member's data flipped in place: its CRC-32 no longer matches.
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 10
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0xFF]))

    check = run_cli("copy", str(src), place.url, "--skip-existing", "--dry-run", "--verify")
    assert check.returncode == 1
    assert "differs: a/c/5: damaged" in check.stdout

    mended = run_cli("copy", str(src), place.url, "--skip-existing", "--verify", "--json")
    assert mended.returncode == 0, mended.stderr
    assert place.files() == files_of(src)


class DroppingProxy(CountingProxy):
    """A proxy in front of moto that answers one PUT with 200 and its ETag, and never passes it
    on: a destination that loses a write and says it kept it."""

    def __init__(self, upstream: str, victim: str) -> None:
        super().__init__(upstream)
        base: Any = self._server.RequestHandlerClass

        class Dropping(base):  # type: ignore[misc]
            def _pass_on(self, body: bytes) -> None:
                if self.command == "PUT" and self.path.split("?")[0].endswith(victim):
                    self.send_response(200)
                    self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super()._pass_on(body)

        self._server.RequestHandlerClass = Dropping


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_verify_reads_back_what_the_destination_kept(
    tmp_path: Path, s3_server: S3Server, backend: str
) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    with DroppingProxy(s3_server.endpoint, "/data.zarr/a/c/4") as proxy:
        options = ["--backend", backend, *s3_options(proxy.url, backend)]
        copied = run_cli("copy", str(src), url, *options, "--verify")
    assert copied.returncode == 1
    assert "differs: a/c/4: missing" in copied.stdout
    assert copied.stderr.count("\n") == 1
    assert "a/c/4" not in s3_place_files(s3_server, bucket)


def s3_place_files(server: S3Server, bucket: str) -> dict[str, bytes]:
    fs = server.setup_fs()
    root = f"{bucket}/data.zarr"
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}


def test_a_refusal_in_json(tmp_path: Path) -> None:
    place = folder_place(tmp_path)
    src = first_copy(tmp_path, place)
    refused = run_cli("copy", str(src), place.url, "--json")
    assert refused.returncode == 1
    summary = json.loads(refused.stdout)
    assert summary["status"] == "refused"
    assert summary["keys_copied"] == summary["keys_deleted"] == 0


# ------------------------------------------------------------ places that hold one another


@pytest.mark.parametrize("flag", ["--overwrite", "--skip-existing"])
def test_a_source_inside_the_destination_is_refused_and_kept(tmp_path: Path, flag: str) -> None:
    # Replacing DST would delete the keys SRC does not have, and SRC's own keys are among them.
    outer = make_hierarchy(tmp_path / "outer.zarr")
    inner = make_hierarchy(outer / "inner")
    archive = outer / "in.zip"
    assert run_cli("copy", str(inner), str(archive), "--quiet").returncode == 0
    before = files_of(outer)
    for source in (str(inner), f"file://{inner}", str(archive)):
        refused = run_cli("copy", source, str(outer), flag)
        assert refused.returncode == 2, refused.stderr
        assert "SRC is inside DST" in refused.stderr
    assert files_of(outer) == before


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_remote_places_that_hold_one_another_are_refused(
    tmp_path: Path, s3_server: S3Server, backend: str
) -> None:
    bucket = s3_server.new_bucket()
    options = ["--backend", backend, *s3_options(s3_server.endpoint, backend)]
    src = make_hierarchy(tmp_path / "src.zarr")
    for url in (f"s3://{bucket}/data.zarr", f"s3://{bucket}/outer.zarr/inner"):
        assert run_cli("copy", str(src), url, *options, "--quiet").returncode == 0
    before = s3_place_files(s3_server, bucket)
    for source, destination, why in [
        (f"s3://{bucket}/data.zarr", f"s3://{bucket}/data.zarr", "the same place"),
        (f"s3://{bucket}/data.zarr", f"s3a://{bucket}/data.zarr/", "the same place"),
        (f"s3://{bucket}/outer.zarr/inner", f"s3://{bucket}/outer.zarr", "SRC is inside DST"),
        (f"s3://{bucket}/data.zarr", f"s3://{bucket}/data.zarr/inner", "DST is inside SRC"),
    ]:
        refused = run_cli("copy", source, destination, *options, "--overwrite")
        assert refused.returncode == 2, refused.stderr
        assert why in refused.stderr
    assert s3_place_files(s3_server, bucket) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--skip-existing"])
def test_an_array_replaced_by_one_of_another_shape_in_a_folder(tmp_path: Path, flag: str) -> None:
    # A folder cannot hold the new 1-D chunk `c/0` beside the old 2-D chunks `c/0/0`: the old
    # chunks in the way go first, and the copy ends with DST reading what SRC reads.
    src, dst = tmp_path / "src.zarr", tmp_path / "dst.zarr"
    zarr.create_array(str(dst), shape=(4, 4), chunks=(2, 2), dtype="i4", fill_value=0)[:] = 1
    zarr.create_array(str(src), shape=(4,), chunks=(2,), dtype="i4", fill_value=0)[:] = 2
    done = run_cli("copy", str(src), str(dst), flag, "--verify")
    assert done.returncode == 0, done.stderr
    assert files_of(dst) == files_of(src)
    assert np.asarray(zarr.open_array(str(dst), mode="r")[:]).tolist() == [2, 2, 2, 2]
    # The reverse: the old destination has a key where the new one needs a folder.
    zarr.create_array(str(src), shape=(4, 4), chunks=(2, 2), dtype="i4", overwrite=True)[:] = 3
    done = run_cli("copy", str(src), str(dst), flag, "--verify")
    assert done.returncode == 0, done.stderr
    assert files_of(dst) == files_of(src)


@pytest.mark.parametrize("dst_name", ["new.zarr", "new.zip", "a/b/new.zarr", "a/b/new.zip"])
@pytest.mark.parametrize("failing", ["empty source", "missing path"])
def test_a_failed_copy_to_a_new_local_place_leaves_nothing_there(
    tmp_path: Path, dst_name: str, failing: str
) -> None:
    if failing == "empty source":
        (tmp_path / "src.zarr").mkdir()
        extra: list[str] = []
    else:
        make_hierarchy(tmp_path / "src.zarr")
        extra = ["--path", "no/such/node"]
    result = run_cli(
        "copy", "--quiet", str(tmp_path / "src.zarr"), str(tmp_path / dst_name), *extra
    )
    assert result.returncode == 1, result.stderr
    assert "nothing to copy" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src.zarr"]


def test_a_failed_copy_to_an_empty_file_leaves_it_empty(tmp_path: Path) -> None:
    """A zip destination that is a file of no bytes (``touch new.zip``) is a new archive to the
    store, which writes the archive's directory at close: a copy that fails leaves the file as
    it found it, and one that succeeds fills it."""
    (tmp_path / "src.zarr").mkdir()
    touched = tmp_path / "new.zip"
    touched.touch()
    result = run_cli("copy", "--quiet", str(tmp_path / "src.zarr"), str(touched))
    assert result.returncode == 1, result.stderr
    assert "nothing to copy" in result.stderr
    assert touched.read_bytes() == b""
    src = make_hierarchy(tmp_path / "full.zarr")
    assert run_cli("copy", "--quiet", str(src), str(touched)).returncode == 0
    with zipfile.ZipFile(touched) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == files_of(src)


def test_a_failed_copy_keeps_what_it_wrote_and_what_was_there(tmp_path: Path) -> None:
    """Only a place that holds nothing is taken away: whole keys stay for a resume."""
    made = first_missing(str(tmp_path / "a" / "b" / "new.zarr"))
    assert made == tmp_path / "a"
    (tmp_path / "a" / "b" / "new.zarr" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "new.zarr" / "c" / "0").write_bytes(b"written")
    remove_if_still_empty(made)
    assert (tmp_path / "a" / "b" / "new.zarr" / "c" / "0").read_bytes() == b"written"
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as archive:
        archive.writestr("zarr.json", b"{}")
    remove_if_still_empty(tmp_path / "one.zip")
    assert (tmp_path / "one.zip").exists()
    (tmp_path / "not-a-zip").write_bytes(b"")
    remove_if_still_empty(tmp_path / "not-a-zip")
    assert (tmp_path / "not-a-zip").exists()
    assert first_missing(str(tmp_path)) is None
    assert first_missing("s3://bucket/x.zarr") is None


def test_a_failed_copy_keeps_a_key_another_process_wrote_after_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies into new folders under one that neither found: the one that fails must not
    take the other's key, written between its look at the folder and its removal."""
    made = first_missing(str(tmp_path / "out" / "a.zarr"))
    assert made == tmp_path / "out"
    (tmp_path / "out" / "a.zarr").mkdir(parents=True)
    other = tmp_path / "out" / "b.zarr" / "c" / "0"
    looked = new_place._holds_nothing

    def then_the_other_copy_writes(path: Path) -> bool:
        empty = looked(path)
        if not other.exists():
            other.parent.mkdir(parents=True)
            other.write_bytes(b"the other copy's key")
        return empty

    monkeypatch.setattr(new_place, "_holds_nothing", then_the_other_copy_writes)
    remove_if_still_empty(made)
    assert other.read_bytes() == b"the other copy's key"
    assert not (tmp_path / "out" / "a.zarr").exists()  # what was ours and empty still goes


def test_a_copy_to_a_zip_in_folders_that_do_not_exist_makes_them(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    result = run_cli("copy", "--quiet", str(src), str(tmp_path / "a" / "b" / "new.zip"))
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "a" / "b" / "new.zip") as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == files_of(src)
