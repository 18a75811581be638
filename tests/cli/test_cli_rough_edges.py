"""``zarr-anyio``'s small promises, run as users run it: a dry run's plan, ``--version``, errors
that speak command line, ``ls`` where there is no Zarr root, S3 option names of either client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from support.command_line import files_of, make_hierarchy, run_cli, s3_options
from support.servers import S3Server
from zarr_anyio.cli.copy import CopyReport
from zarr_anyio.cli.options import client_options
from zarr_anyio.cli.progress import progress_line, seconds_left


def test_a_dry_run_lists_every_key_sorted(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr", chunks=40)
    keys = sorted(files_of(src))
    assert len(keys) > 40  # more than a report keeps as examples

    text = run_cli("copy", str(src), str(tmp_path / "dst.zarr"), "--dry-run")
    assert text.returncode == 0, text.stderr
    planned = [line.removeprefix("would copy ") for line in text.stdout.splitlines()]
    assert planned[: len(keys)] == keys

    as_json = run_cli("copy", str(src), str(tmp_path / "dst.zarr"), "--dry-run", "--json")
    summary = json.loads(as_json.stdout)
    assert summary["would_copy"] == keys
    assert summary["would_delete"] == []
    assert not (tmp_path / "dst.zarr").exists()


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("zarr-anyio 0.")
    assert "zarr 3." in result.stdout


def test_a_url_typo_is_a_command_line_error(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    typo = run_cli("copy", str(src), "s3:/bucket/data.zarr", cwd=tmp_path)
    assert typo.returncode == 2
    line = typo.stderr.strip()
    assert "\n" not in line
    assert "s3://bucket/data.zarr" in line
    assert "pathlib" not in line
    assert not (tmp_path / "s3:").exists()

    # The way out the message names: a path that starts with ./ is a path.
    colon = run_cli("copy", str(src), "./with:colon.zarr", "--quiet", cwd=tmp_path)
    assert colon.returncode == 0, colon.stderr
    assert files_of(tmp_path / "with:colon.zarr") == files_of(src)


def test_ls_where_there_is_no_zarr_root_shows_what_is_there(tmp_path: Path) -> None:
    make_hierarchy(tmp_path / "data.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")

    listed = run_cli("ls", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "no Zarr group or array here" in lines[0]
    assert lines[1:] == ["data.zarr/  Zarr v3", "notes.txt  5.00B", "other/"]

    as_json = json.loads(run_cli("ls", str(tmp_path), "--json").stdout)
    assert as_json["entries"][0] == {"name": "data.zarr", "size": None, "zarr": "Zarr v3"}

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run_cli("ls", str(empty))
    assert nothing.returncode == 1
    assert "no Zarr group or array" in nothing.stderr


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_ls_of_a_bucket_of_datasets(tmp_path: Path, s3_server: S3Server, backend: str) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    bucket = s3_server.new_bucket()
    options = ["--backend", backend, *s3_options(s3_server.endpoint, backend)]
    up = run_cli("copy", str(src), f"s3://{bucket}/one.zarr", *options, "--quiet")
    assert up.returncode == 0, up.stderr

    listed = run_cli("ls", f"s3://{bucket}/", *options)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1:] == ["one.zarr/  Zarr v3"]


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_s3_options_in_either_clients_names(
    tmp_path: Path, s3_server: S3Server, backend: str
) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    bucket = s3_server.new_bucket()
    # The other client's spelling of every option, and no allow_http for an http:// endpoint.
    if backend == "fsspec":
        pairs = ["endpoint=" + s3_server.endpoint, "access_key_id=testing", "region=us-east-1"]
        pairs.append("secret_access_key=testing")
    else:
        pairs = ["endpoint_url=" + s3_server.endpoint, "key=testing", "secret=testing"]
        pairs.append("client_kwargs.region_name=us-east-1")
    options = [arg for pair in pairs for arg in ("--storage-option", pair)]
    url = f"s3://{bucket}/data.zarr"
    up = run_cli("copy", str(src), url, "--backend", backend, *options, "--verify", "--quiet")
    assert up.returncode == 0, up.stderr

    unknown = run_cli("copy", str(src), url, "--storage-option", "nosuch=1", "--overwrite")
    assert unknown.returncode == 2
    assert "'nosuch'" in unknown.stderr
    assert unknown.stderr.count("\n") == 1


def test_client_options_map_names_and_allow_plain_http() -> None:
    assert client_options("s3", "fsspec", {"endpoint": "http://h:1", "region": "r"}) == {
        "endpoint_url": "http://h:1",
        "client_kwargs": {"region_name": "r"},
    }
    assert client_options("s3", "obstore", {"client_kwargs": {"endpoint_url": "http://h:1"}}) == {
        "endpoint": "http://h:1",
        "client_options": {"allow_http": True},
    }
    # https needs nothing; a user's own client_options are kept.
    assert client_options("s3", "obstore", {"endpoint": "https://h"}) == {"endpoint": "https://h"}
    assert client_options("http", "obstore", {"client_options": {"timeout": "5s"}}) == {
        "client_options": {"timeout": "5s", "allow_http": True}
    }
    assert client_options("http", "fsspec", {}) == {}
    with pytest.raises(ValueError, match=r"client_kwargs\.verify"):
        client_options("s3", "obstore", {"client_kwargs": {"verify": False}})


@pytest.mark.parametrize("name", ["new.zarr", "new.zip"])
def test_a_dry_run_onto_a_destination_that_does_not_exist_yet(tmp_path: Path, name: str) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    dst = tmp_path / name
    plan = run_cli("copy", str(src), str(dst), "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["would_copy"] == sorted(files_of(src))

    checked = run_cli("copy", str(src), str(dst), "--dry-run", "--verify=sizes")
    assert checked.returncode == 1
    assert f"--verify found {len(files_of(src))} keys that differ" in checked.stderr
    assert "zarr.json: missing" in checked.stderr
    assert not dst.exists()


def test_the_time_left_starts_sensible_when_small_keys_come_first() -> None:
    # Two seconds in, half the keys done, but they were the small ones: a byte rate alone says
    # the gigabyte left takes hours.
    started = time.monotonic() - 2
    report = CopyReport(
        keys_total=100, bytes_total=1 << 30, keys_copied=50, bytes_copied=50_000, started=started
    )
    left = seconds_left(report)
    assert left is not None
    assert left < 10
    assert "<00:0" in progress_line(report, None)

    # Big keys first: the keys' rate alone would say hours, the bytes' rate is the telling one.
    report = CopyReport(
        keys_total=10_000, bytes_total=1000, keys_copied=1, bytes_copied=500, started=started
    )
    assert seconds_left(report) == pytest.approx(2, rel=0.1)

    # In the first second, no estimate.
    report = CopyReport(keys_total=10, bytes_total=10, keys_copied=1, bytes_copied=1)
    assert seconds_left(report) is None
    assert "<?," in progress_line(report, None)
