"""``zarr-anyio copy``, run as users run it: the installed console script in a subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import termios
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from support.command_line import (
    TEMP_MARK,
    files_of,
    make_hierarchy,
    run_cli,
    s3_options,
    start_cli,
)
from support.servers import CountingProxy, S3Server

METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


def chunks_written(dst: Path) -> int:
    """How many chunk files the running copy has put under ``dst`` so far."""
    # Walked, not globbed: the copy makes and removes its temporary folder as it goes, and a
    # glob that meets a folder removed under it raises FileNotFoundError.
    return sum(len(files) for folder, _, files in os.walk(dst) if Path(folder).name == "c")


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def bucket_files(server: S3Server, bucket: str, root: str) -> dict[str, bytes]:
    """What moto holds under ``bucket/root``, asked of moto itself (not through the CLI)."""
    fs = server.setup_fs()
    paths = fs.find(f"{bucket}/{root}")
    return {path[len(bucket) + len(root) + 2 :]: fs.cat_file(path) for path in paths}


def is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA


def test_local_to_zip_to_local_is_byte_identical(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    zipped, back = tmp_path / "copy.zip", tmp_path / "back.zarr"

    first = run_cli("copy", str(src), str(zipped), "--quiet")
    assert (first.returncode, first.stdout, first.stderr) == (0, "", "")
    with zipfile.ZipFile(zipped) as archive:
        assert sorted(archive.namelist()) == sorted(files_of(src))

    second = run_cli("copy", str(zipped), str(back), "--verify=bytes", "--json")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["status"] == "done"
    assert summary["keys_copied"] == summary["keys_verified"] == len(files_of(src))
    assert summary["mismatched_keys"] == 0
    assert files_of(back) == files_of(src)
    assert zarr.open_group(str(back), mode="r").attrs["title"] == "test"


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_local_to_s3_and_back(tmp_path: Path, s3_server: S3Server, backend: str) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    options = s3_options(s3_server.endpoint, backend)

    up = run_cli("copy", str(src), url, "--backend", backend, *options, "--verify")
    assert up.returncode == 0, up.stderr
    assert bucket_files(s3_server, bucket, "data.zarr") == files_of(src)

    back = tmp_path / "back.zarr"
    down = run_cli("copy", url, str(back), "--backend", backend, *options, "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["keys_copied"] == len(files_of(src))
    assert files_of(back) == files_of(src)


def test_one_node_is_copied_to_the_root_of_dst(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    dst = tmp_path / "b.zarr"
    result = run_cli("copy", str(src), str(dst), "--path", "sub/b", "--quiet")
    assert result.returncode == 0, result.stderr
    assert files_of(dst) == {
        key.removeprefix("sub/b/"): data
        for key, data in files_of(src).items()
        if key.startswith("sub/b/")
    }
    copied = zarr.open_array(str(dst), mode="r")
    assert np.array_equal(copied[:], zarr.open_array(str(src / "sub/b"), mode="r")[:])


def test_a_killed_copy_resumes_with_only_the_missing_keys(
    tmp_path: Path, s3_server: S3Server
) -> None:
    src = make_hierarchy(tmp_path / "src.zarr", chunks=100)
    keys = files_of(src)
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    with CountingProxy(s3_server.endpoint) as proxy:
        copy = ["copy", str(src), url, *s3_options(proxy.url)]
        process = start_cli(*copy, "--rate", "60", "--quiet")
        try:
            wait_for(lambda: proxy.count("PUT") >= 40)
        finally:
            process.kill()
            process.wait()
        proxy.wait_idle()
        present = bucket_files(s3_server, bucket, "data.zarr")
        assert 0 < len(present) < len(keys)
        # Metadata goes last: what a killed copy leaves is not a hierarchy that opens.
        assert not [key for key in present if is_metadata(key)]
        assert all(keys[key] == data for key, data in present.items())

        proxy.clear()
        again = run_cli(*copy, "--skip-existing", "--json")
        assert again.returncode == 0, again.stderr
        # Counted at the server: one PUT for each key that was missing, none for the others.
        assert proxy.count("PUT") == len(keys) - len(present)
        summary = json.loads(again.stdout)
        assert summary["keys_skipped"] == len(present)
        assert summary["keys_copied"] == len(keys) - len(present)
    assert bucket_files(s3_server, bucket, "data.zarr") == keys


def test_verify_finds_a_corrupted_destination_key(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    dst = tmp_path / "dst.zarr"
    assert run_cli("copy", str(src), str(dst), "--quiet").returncode == 0
    assert run_cli("copy", str(src), str(dst), "--skip-existing", "--verify").returncode == 0

    victim = dst / "a" / "c" / "3"
    spoiled = bytearray(victim.read_bytes())
    spoiled[10] ^= 0xFF
    victim.write_bytes(bytes(spoiled))
    # A dry run checks the copy without touching it. Same size: sizes cannot see it, bytes can.
    check = ["copy", str(src), str(dst), "--dry-run", "--skip-existing"]
    by_size = run_cli(*check, "--verify=sizes")
    assert by_size.returncode == 0, by_size.stderr
    by_bytes = run_cli(*check, "--verify")
    assert by_bytes.returncode == 1
    assert by_bytes.stderr.count("\n") == 1
    assert "a/c/3" in by_bytes.stderr
    assert "differs: a/c/3: bytes differ" in by_bytes.stdout
    assert victim.read_bytes() == spoiled

    # A key cut short: sizes see it.
    truncated = dst / "a" / "c" / "5"
    truncated.write_bytes(truncated.read_bytes()[:100])
    cut = run_cli(*check, "--verify=sizes")
    assert cut.returncode == 1
    assert "a/c/5: 100 bytes, expected 1024" in cut.stdout
    assert truncated.stat().st_size == 100

    # --skip-existing compares bytes: it finds both and mends them.
    mended = run_cli("copy", str(src), str(dst), "--skip-existing", "--verify")
    assert mended.returncode == 0, mended.stderr
    assert files_of(dst) == files_of(src)


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_copy_with_every_key_whole(
    tmp_path: Path, s3_server: S3Server, stop: signal.Signals, code: int
) -> None:
    src = make_hierarchy(tmp_path / "src.zarr", chunks=60, chunk_bytes=256 * 1024)
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    options = s3_options(s3_server.endpoint)
    assert run_cli("copy", str(src), url, *options, "--quiet").returncode == 0

    dst = tmp_path / "dst.zarr"
    process = start_cli("copy", url, str(dst), *options, "--rate", "30", "--max-concurrency", "4")
    try:
        wait_for(lambda: chunks_written(dst) >= 5)
        process.send_signal(stop)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == code, err
    assert f"stopped by {stop.name}" in err
    assert "keys" in out  # the summary of how far it got
    copied = files_of(dst)
    keys = files_of(src)
    assert not [key for key in copied if TEMP_MARK in key]
    assert 0 < len(copied) < len(keys)
    assert all(keys[key] == data for key, data in copied.items())
    assert "zarr.json" not in copied

    finish = run_cli("copy", url, str(dst), *options, "--skip-existing", "--quiet")
    assert finish.returncode == 0, finish.stderr
    assert files_of(dst) == keys


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    dst = tmp_path / "dst.zarr"
    result = run_cli("copy", str(src), str(dst), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True
    assert summary["keys_copied"] == len(files_of(src))
    assert not dst.exists()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_errors_are_one_line_with_the_right_exit_code(tmp_path: Path) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")

    bad_url = run_cli("copy", "nosuch://bucket/x", str(tmp_path / "out"))
    assert bad_url.returncode == 2
    assert "nosuch" in one_line(bad_url.stderr)

    missing = run_cli("copy", str(tmp_path / "missing.zarr"), str(tmp_path / "out"))
    assert missing.returncode == 1
    assert "does not exist" in one_line(missing.stderr)
    assert not (tmp_path / "out").exists()

    unwritable = run_cli("copy", str(src), str(a_file / "dst.zarr"))
    assert unwritable.returncode == 1
    assert "file.txt" in one_line(unwritable.stderr)

    to_http = run_cli("copy", str(src), "https://example.invalid/x.zarr")
    assert to_http.returncode == 2
    assert "read-only" in one_line(to_http.stderr)

    onto_itself = run_cli("copy", str(src), str(src))
    assert onto_itself.returncode == 2
    assert "same place" in one_line(onto_itself.stderr)

    into_itself = run_cli("copy", str(src), str(src / "copy-here"))
    assert into_itself.returncode == 2
    assert "inside SRC" in one_line(into_itself.stderr)
    assert not (src / "copy-here").exists()

    bad_option = run_cli("copy", str(src), str(tmp_path / "out"), "--storage-option", "novalue")
    assert bad_option.returncode == 2

    no_node = run_cli("copy", str(src), str(tmp_path / "out"), "--path", "nothing/here")
    assert no_node.returncode == 1
    assert "nothing to copy" in one_line(no_node.stderr)

    traced = run_cli("copy", str(tmp_path / "missing.zarr"), str(tmp_path / "out"), "--debug")
    assert traced.returncode == 1
    assert "Traceback" in traced.stderr


def test_progress_lines_when_not_a_terminal_and_nothing_when_quiet(
    tmp_path: Path, s3_server: S3Server
) -> None:
    src = make_hierarchy(tmp_path / "src.zarr", chunks=40)
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    options = s3_options(s3_server.endpoint)
    slow = ["--rate", "40", "--progress-interval", "0.2"]

    loud = run_cli("copy", str(src), url, *options, *slow)
    assert loud.returncode == 0, loud.stderr
    lines = [line for line in loud.stderr.splitlines() if line.startswith("copy:")]
    assert len(lines) >= 3, loud.stderr
    assert "keys" in lines[-1]
    assert "B/s" in lines[-1]
    assert "\r" not in loud.stderr
    assert "copied" in loud.stdout

    quiet = run_cli("copy", str(src), url, *options, *slow, "--quiet", "--overwrite")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_a_live_bar_on_a_terminal(tmp_path: Path, s3_server: S3Server) -> None:
    src = make_hierarchy(tmp_path / "src.zarr", chunks=20)
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/data.zarr"
    leader, follower = pty.openpty()
    # A terminal 120 columns wide, as a real one has a size.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = start_cli(
        "copy", str(src), url, *s3_options(s3_server.endpoint), "--rate", "30", stderr=follower
    )
    os.close(follower)
    screen = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the other end closed
                return
            if not data:
                return
            screen.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        process.wait(timeout=60)
    finally:
        process.kill()
        reader.join(timeout=10)
        os.close(leader)
    assert process.returncode == 0
    text = screen.decode(errors="replace")
    assert "\r" in text
    assert "copy:" in text
    assert "100%|" in text
    assert f"keys {len(files_of(src))}/{len(files_of(src))}" in text


@pytest.mark.parametrize("command", ["copy", "ls", "info", "demo"])
def test_help_has_examples(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout
    assert f"zarr-anyio {command}" in result.stdout


def test_demo_still_runs() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "chunks match" in result.stdout
