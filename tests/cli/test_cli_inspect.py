"""``zarr-anyio ls`` and ``zarr-anyio info`` on v2 and v3 hierarchies, sharded arrays and
consolidated metadata, run as the installed console script."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr

from support.command_line import files_of, make_hierarchy, run_cli, s3_options
from support.servers import S3Server


def stored_under(root: Path, prefix: str) -> int:
    return sum(len(data) for key, data in files_of(root).items() if key.startswith(prefix))


def ls_json(*args: str) -> dict[str, Any]:
    result = run_cli("ls", *args, "--json")
    assert result.returncode == 0, result.stderr
    tree: dict[str, Any] = json.loads(result.stdout)
    return tree


def members(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {member["path"]: member for member in node["members"]}


def make_v2(root: Path, *, consolidated: bool) -> Path:
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    array = group.create_array(
        "temps",
        shape=(30, 40),
        chunks=(10, 10),
        dtype="float32",
        filters=[numcodecs.Delta(dtype="<f4")],
        compressors=numcodecs.Zstd(level=1),
    )
    array[:10, :] = 1.5  # 4 of the 12 chunks
    group.create_group("inner").create_array("ids", shape=(8,), chunks=(8,), dtype="i8")[:] = 7
    if consolidated:
        zarr.consolidate_metadata(str(root))
    return root


def test_ls_v3_with_a_sharded_array(tmp_path: Path) -> None:
    root = make_hierarchy(tmp_path / "data.zarr")
    tree = ls_json(str(root))
    assert tree["node_type"] == "group"
    assert tree["zarr_format"] == 3
    assert tree["stored_bytes"] == stored_under(root, "")
    a = members(tree)["a"]
    assert a["shape"] == [4096]
    assert a["dtype"] == "int32"
    assert a["chunks"] == [256]
    assert a["shards"] is None
    assert a["codecs"] == ["bytes"]
    assert (a["chunks_present"], a["chunks_possible"]) == (16, 16)
    b = members(members(tree)["sub"])["sub/b"]
    assert (b["chunks"], b["shards"]) == ([8, 8], [32, 32])
    assert b["codecs"] == ["sharding_indexed(bytes, zstd)"]
    assert (b["chunks_present"], b["chunks_possible"]) == (4, 4)
    assert b["stored_bytes"] == stored_under(root, "sub/b/")

    text = run_cli("ls", str(root))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("/  group  v3  2 members")
    assert lines[1].startswith("├── a  array  v3  int32  shape (4096,)  chunks (256,)")
    assert "└── sub  group" in lines[2]
    assert (
        "    └── b  array  v3  float64  shape (64, 64)  chunks (8, 8)  shards (32, 32)" in lines[3]
    )
    assert "in 4/4 shards" in lines[3]


@pytest.mark.parametrize("consolidated", [False, True])
def test_ls_v2_with_and_without_consolidated_metadata(tmp_path: Path, consolidated: bool) -> None:
    root = make_v2(tmp_path / "v2.zarr", consolidated=consolidated)
    tree = ls_json(str(root))
    assert tree["zarr_format"] == 2
    temps = members(tree)["temps"]
    assert temps["dtype"] == "float32"
    assert temps["codecs"] == ["delta", "zstd"]
    assert (temps["chunks_present"], temps["chunks_possible"]) == (4, 12)
    assert members(members(tree)["inner"])["inner/ids"]["chunks_present"] == 1
    assert tree["stored_bytes"] == stored_under(root, "")


def test_ls_v3_consolidated_and_depth(tmp_path: Path) -> None:
    root = make_hierarchy(tmp_path / "data.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec
        zarr.consolidate_metadata(str(root))
    tree = ls_json(str(root))
    assert members(members(tree)["sub"])["sub/b"]["shards"] == [32, 32]

    shallow = ls_json(str(root), "--depth", "1")
    assert members(shallow)["sub"]["members"] == []
    # The bytes of what is not shown still count for the group above them.
    assert members(shallow)["sub"]["stored_bytes"] == stored_under(root, "sub/")

    node = ls_json(str(root), "--path", "sub")
    assert node["path"] == "sub"
    assert list(members(node)) == ["sub/b"]


def test_ls_on_a_zip_and_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    root = make_hierarchy(tmp_path / "data.zarr")
    zipped = tmp_path / "data.zip"
    assert run_cli("copy", str(root), str(zipped), "--quiet").returncode == 0
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    options = s3_options(s3_server.endpoint)
    assert run_cli("copy", str(root), url, *options, "--quiet").returncode == 0

    local = ls_json(str(root))
    assert ls_json(str(zipped)) == local
    assert ls_json(url, *options) == local
    assert ls_json(url, *s3_options(s3_server.endpoint, "obstore"), "--backend", "obstore") == local


def test_info_on_an_array_and_a_group(tmp_path: Path) -> None:
    root = make_v2(tmp_path / "v2.zarr", consolidated=True)
    result = run_cli("info", str(root), "--path", "temps")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Type               : Array" in lines  # zarr's own info
    assert "Shape              : (30, 40)" in lines
    assert "Chunks present     : 4 of 12" in lines
    assert f"Stored             : {stored_under(root, 'temps/')} " in result.stdout

    detail = json.loads(run_cli("info", str(root), "--path", "temps", "--json").stdout)
    assert detail["chunks_present"] == 4
    assert "members" not in detail

    group = run_cli("info", str(root))
    assert group.returncode == 0, group.stderr
    assert "Type        : Group" in group.stdout
    assert "Zarr format : 2" in group.stdout

    sharded_root = make_hierarchy(tmp_path / "v3.zarr")
    sharded = run_cli("info", str(sharded_root), "--path", "sub/b")
    assert "Shards present     : 4 of 4" in sharded.stdout
    assert "Shard shape        : (32, 32)" in sharded.stdout


def test_a_partly_written_sharded_array_counts_its_shards(tmp_path: Path) -> None:
    array = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=(64, 64), chunks=(8, 8), shards=(32, 32), dtype="u2"
    )
    array[:32, :32] = np.ones((32, 32), dtype="u2")
    node = json.loads(run_cli("info", str(tmp_path / "s.zarr"), "--json").stdout)
    assert (node["chunks_present"], node["chunks_possible"]) == (1, 4)


def test_inspecting_what_is_not_there(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    nothing = run_cli("ls", str(tmp_path / "empty"))
    assert nothing.returncode == 1
    assert "no Zarr group or array" in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1

    missing = run_cli("info", str(tmp_path / "missing.zarr"))
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr

    root = make_hierarchy(tmp_path / "data.zarr")
    no_node = run_cli("info", str(root), "--path", "no/such/node")
    assert no_node.returncode == 1
    assert "no Zarr group or array at 'no/such/node'" in no_node.stderr
