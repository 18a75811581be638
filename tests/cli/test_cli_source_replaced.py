"""``zarr-anyio copy`` of a folder whose large values are replaced while they are copied.

A writer that puts a new value in place (a temporary file renamed over the key, as zarr and
this package write) must not leave the copy a value the source never held: the first parts of
the old value and the last of the new one. What is promised: each value copied is one of the
values the source held, whole.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.command_line import make_hierarchy, run_cli, s3_options
from support.servers import CountingProxy, S3Server
from zarr_anyio import LocalStore
from zarr_anyio.cli.copy_stream import SourceChanged, ranged_parts

MiB = 1 << 20
OLD = b"A" * (16 * MiB)
NEW = b"B" * (16 * MiB)


@contextlib.contextmanager
def replaced_over_and_over(path: Path, spare: Path) -> Iterator[None]:
    """``path`` replaced by a rename, OLD and NEW in turn, until the block ends."""
    stop = threading.Event()

    def flip() -> None:
        turn = 0
        while not stop.is_set():
            spare.write_bytes(NEW if turn % 2 else OLD)
            os.replace(spare, path)
            turn += 1

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.anyio
async def test_a_value_renamed_over_between_two_parts_is_read_whole(tmp_path: Path) -> None:
    root = tmp_path / "src.zarr"
    root.mkdir()
    (root / "big").write_bytes(OLD)
    store = await LocalStore.open(root, read_only=True)
    parts = ranged_parts(store, "big", len(OLD), MiB)
    async with contextlib.aclosing(parts):
        read = [await anext(parts)]
        (tmp_path / "spare").write_bytes(NEW)
        os.replace(tmp_path / "spare", root / "big")
        read += [data async for data in parts]
    assert b"".join(read) == OLD


@pytest.mark.parametrize("round_", range(3))
def test_a_copy_never_writes_a_value_the_source_did_not_hold(tmp_path: Path, round_: int) -> None:
    src = make_hierarchy(tmp_path / "src.zarr")
    (src / "c").mkdir()
    (src / "c" / "big").write_bytes(OLD)
    dst = tmp_path / "dst.zarr"
    with replaced_over_and_over(src / "c" / "big", tmp_path / "spare"):
        done = run_cli("copy", str(src), str(dst), "--max-memory", "8M", "--quiet", timeout=120)
    assert done.returncode == 0, done.stderr
    copied = (dst / "c" / "big").read_bytes()
    assert copied in (OLD, NEW), f"a torn value: {copied.count(b'A')} A, {copied.count(b'B')} B"


@pytest.mark.anyio
async def test_a_value_written_over_in_place_between_two_parts_is_a_change(
    tmp_path: Path,
) -> None:
    root = tmp_path / "src.zarr"
    root.mkdir()
    (root / "big").write_bytes(OLD)
    # Its times well in the past, so that the write below changes them whatever the clock's
    # granularity.
    os.utime(root / "big", ns=(10**18, 10**18))
    store = await LocalStore.open(root, read_only=True)
    parts = ranged_parts(store, "big", len(OLD), MiB)
    with pytest.raises(SourceChanged):
        async with contextlib.aclosing(parts):
            await anext(parts)
            with (root / "big").open("r+b") as file:
                file.write(NEW)
            async for _ in parts:
                pass


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_an_s3_value_replaced_after_its_stream_broke_is_never_copied_torn(
    tmp_path: Path, s3_server: S3Server, backend: str
) -> None:
    # The value is read as one streamed GET; cut after 3 MiB, the rest comes in ranged reads.
    # Replaced in between, those read the new object. Before: exit 0 with 3 MiB of the old
    # value and 13 MiB of the new, on both backends. Each ranged part is now taken only while
    # the object's ETag is the one the stream began with.
    bucket = s3_server.new_bucket()
    fs = s3_server.setup_fs()
    fs.put(str(make_hierarchy(tmp_path / "h.zarr")), f"{bucket}/src.zarr", recursive=True)
    fs.pipe_file(f"{bucket}/src.zarr/c/big", OLD)
    dst = tmp_path / "dst.zarr"
    with CountingProxy(s3_server.endpoint) as proxy:
        proxy.cut_get = (
            "/src.zarr/c/big",
            3 * MiB,
            lambda: fs.pipe_file(f"{bucket}/src.zarr/c/big", NEW),
        )
        done = run_cli(
            "copy",
            f"s3://{bucket}/src.zarr",
            str(dst),
            "--backend",
            backend,
            *s3_options(proxy.url, backend),
            "--max-memory",
            "8M",
            "--quiet",
            timeout=120,
        )
    assert proxy.cut_get is None  # the stream was cut
    assert done.returncode == 1, done.stderr
    assert "c/big changed while it was copied" in done.stderr
    assert not (dst / "c" / "big").exists() or (dst / "c" / "big").read_bytes() in (OLD, NEW)
