"""Every async test runs twice: under asyncio and under trio."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import zarr_anyio.storage._local
import zarr_anyio.storage._localfs
from support.doubles import ConcurrencyProbe
from support.servers import HTTPServer, S3Server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, for the whole session."""
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http_server_session() -> Iterator[HTTPServer]:
    server = HTTPServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def http_server(http_server_session: HTTPServer) -> HTTPServer:
    """The loopback HTTP server, emptied and with no faults, for one test."""
    http_server_session.reset()
    return http_server_session


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], ConcurrencyProbe]:
    """Replaces LocalStore's blocking read with a `ConcurrencyProbe`; give it ``hold_until``."""

    def install(hold_until: int) -> ConcurrencyProbe:
        double = ConcurrencyProbe(zarr_anyio.storage._localfs.read_file, hold_until)
        monkeypatch.setattr(zarr_anyio.storage._local, "read_file", double)
        # Every read to a thread, where the double counts it (small cached reads are otherwise
        # made on the event loop, without a hop; storage/local/test_local_reads.py covers those).
        monkeypatch.setattr(zarr_anyio.storage._local.LocalStore, "_reads_on_loop", False)
        return double

    return install


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on a 2 MiB tmpfs (as root), or, elsewhere, one whose LocalStore writes fail with
    ENOSPC once 2 MiB are written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
        try:
            yield disk
        finally:
            # Lazily, so a failing test that left a file open cannot leave the mount behind.
            subprocess.run(["umount", "-l", str(disk)], check=True)
        return
    budget = [2 << 20]

    def write_piece(fd: int, piece: memoryview) -> int:
        if len(piece) > budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(piece)
        return os.write(fd, piece)

    monkeypatch.setattr(zarr_anyio.storage._localfs, "_write_piece", write_piece)
    yield disk
