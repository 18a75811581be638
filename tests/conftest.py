"""Every async test runs twice: under asyncio and under trio."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import zarr_anyio.storage._local
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
