"""``zarr-anyio copy --skip-existing`` compares by checksum where S3 keeps one, without reading.

An S3 object written by one PUT has the MD5 of its bytes as its ETag. Two S3 stores: the ETags
are compared (a HEAD a side); a folder and S3: the folder's bytes are hashed and the S3 value is
not downloaded. Requests are counted at the S3 server (through a proxy), so "not read" means no
GET of the object reached it, whichever client. Each way, a change that keeps every size and a
damaged destination chunk are found, and the keys that match are neither read from S3 nor
written again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import zarr

from support.command_line import files_of, make_hierarchy, run_cli, s3_options
from support.servers import CountingProxy, S3Server


@dataclass
class Side:
    """One end of a copy: its URL and how to read and write its keys from outside."""

    url: str
    s3_root: str | None  # "bucket/path" on S3, None for a folder
    folder: Path | None

    def files(self, server: S3Server) -> dict[str, bytes]:
        if self.folder is not None:
            return files_of(self.folder)
        fs = server.setup_fs()
        root = str(self.s3_root)
        return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}

    def put(self, server: S3Server, key: str, data: bytes) -> None:
        if self.folder is not None:
            (self.folder / key).write_bytes(data)
        else:
            server.setup_fs().pipe_file(f"{self.s3_root}/{key}", data)


def object_gets(log: list[tuple[str, str]]) -> set[str]:
    """The keys whose values were downloaded (GETs of objects, not listings)."""
    found = set()
    for method, path in log:
        name = unquote(path.split("?")[0])
        if method == "GET" and "/data.zarr/" in name:
            found.add(name.split("/data.zarr/", 1)[1])
        elif method == "GET" and "/src.zarr/" in name:
            found.add(name.split("/src.zarr/", 1)[1])
    return found


WAYS = ["folder-to-s3", "s3-to-s3", "s3-to-folder"]


def sides(tmp_path: Path, server: S3Server, way: str, endpoint: str) -> tuple[Side, Side]:
    bucket = server.new_bucket()
    src = make_hierarchy(tmp_path / "src.zarr")
    if way.startswith("s3"):
        server.setup_fs().put(str(src), f"{bucket}/src.zarr", recursive=True)
        source = Side(f"s3://{bucket}/src.zarr", f"{bucket}/src.zarr", None)
    else:
        source = Side(str(src), None, src)
    if way.endswith("s3"):
        target = Side(f"s3://{bucket}/data.zarr", f"{bucket}/data.zarr", None)
    else:
        target = Side(str(tmp_path / "dst.zarr"), None, tmp_path / "dst.zarr")
    return source, target


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
@pytest.mark.parametrize("way", WAYS)
def test_skip_existing_finds_changes_by_checksum_and_reads_no_matching_value(
    tmp_path: Path, s3_server: S3Server, way: str, backend: str
) -> None:
    with CountingProxy(s3_server.endpoint) as proxy:
        src, dst = sides(tmp_path, s3_server, way, proxy.url)
        options = ["--backend", backend, *s3_options(proxy.url, backend)]
        first = run_cli("copy", src.url, dst.url, *options, "--quiet")
        assert first.returncode == 0, first.stderr

        # Half of the array's chunks change, each keeping its size; one chunk that did not
        # change is damaged at the destination.
        source = src.files(s3_server)
        changed = [f"a/c/{i}" for i in range(0, 16, 2)]
        for key in changed:
            values = np.frombuffer(source[key], dtype="int32") + 1
            src.put(s3_server, key, values.tobytes())
        damaged = bytearray(source["a/c/5"])
        damaged[10] ^= 0xFF
        dst.put(s3_server, "a/c/5", bytes(damaged))
        source = src.files(s3_server)
        before = dst.files(s3_server)
        assert {k: len(v) for k, v in before.items()} == {k: len(v) for k, v in source.items()}
        matching = {key for key, value in before.items() if source[key] == value}
        assert "a/c/5" not in matching
        assert not matching & set(changed)

        proxy.log.clear()
        again = run_cli("copy", src.url, dst.url, *options, "--skip-existing", "--json")
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout)
        assert dst.files(s3_server) == source
        # Around any change the metadata goes down and up again, whole.
        metadata = {key for key in source if key.endswith("zarr.json")}
        data = set(source) - metadata
        # A matching value is never downloaded: S3's side of it was one HEAD.
        read = object_gets(proxy.log) & matching & data
        assert matching & data
        assert not read, sorted(read)
        assert summary["keys_copied"] == len(data - matching) + len(metadata)
        assert summary["keys_compared_by_checksum"] == len(data)

        proxy.log.clear()
        done = run_cli("copy", src.url, dst.url, *options, "--skip-existing", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["keys_copied"] == 0
        assert object_gets(proxy.log) == set()


def test_two_folders_still_compare_bytes(tmp_path: Path) -> None:
    # Neither side keeps a checksum: a same-size change is found by reading both.
    src = make_hierarchy(tmp_path / "src.zarr")
    dst = tmp_path / "dst.zarr"
    assert run_cli("copy", str(src), str(dst), "--quiet").returncode == 0
    array = zarr.open_array(str(src / "a"), mode="r+")
    array[:] = np.asarray(array[:]) + 1
    again = run_cli("copy", str(src), str(dst), "--skip-existing", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["keys_compared_by_checksum"] == 0
    assert summary["keys_copied"] == 16 + 4  # the chunks, and the metadata written again
    assert files_of(dst) == files_of(src)


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_a_value_uploaded_in_parts_has_no_md5_and_is_compared_by_its_bytes(
    tmp_path: Path, s3_server: S3Server, backend: str
) -> None:
    # 12 MiB with --max-memory 8M goes up as a multipart upload (parts of 5 MiB): its ETag is
    # no MD5, so only the bytes can tell whether it changed.
    items = 3 << 20
    src = tmp_path / "src.zarr"
    array = zarr.create_array(
        str(src), shape=(items,), chunks=(items,), dtype="int32", compressors=None
    )
    array[:] = np.arange(items, dtype="int32")
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    options = ["--backend", backend, *s3_options(s3_server.endpoint, backend), "--max-memory"]
    options.append("8M")
    assert run_cli("copy", str(src), url, *options, "--quiet").returncode == 0
    fs = s3_server.setup_fs()
    assert "-" in fs.info(f"{bucket}/data.zarr/c/0")["ETag"]

    same = run_cli("copy", str(src), url, *options, "--skip-existing", "--json")
    assert same.returncode == 0, same.stderr
    summary = json.loads(same.stdout)
    assert summary["keys_copied"] == 0
    assert summary["keys_compared_by_checksum"] == 1  # zarr.json, one PUT: its MD5

    array[:] = np.arange(items, dtype="int32")[::-1]
    changed = run_cli("copy", str(src), url, *options, "--skip-existing", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["keys_copied"] == 2  # the chunk, and zarr.json around it
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/data.zarr/c/0") == (src / "c" / "0").read_bytes()
