"""Remote stores against real servers on loopback: limits, cancellation, faults, rate limits.

Every count here is the server's own (requests received, most in flight at once), not ours.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from zarr.core.buffer import default_buffer_prototype

from servers import Faults, HTTPServer, S3Server
from zarr_anyio import FsspecStore, ObjectStore, RateLimit, RemoteStore, Retry
from zarr_anyio._bridge import run_on_loop
from zarr_anyio._limits import is_transient

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()


def http_store(kind: str, server: HTTPServer, **kwargs: Any) -> RemoteStore:
    """A store reading ``server``'s objects, with the client's own retries off."""
    if kind == "fsspec":
        import fsspec

        fs = fsspec.filesystem("http", asynchronous=True, skip_instance_cache=True)
        return FsspecStore(fs, path=server.url, read_only=True, **kwargs)
    from obstore.store import HTTPStore

    store = HTTPStore.from_url(
        server.url, client_options={"allow_http": True}, retry_config={"max_retries": 0}
    )
    return ObjectStore(store, read_only=True, **kwargs)


KINDS = ["fsspec", "obstore"]


def fill(server: HTTPServer, count: int, size: int = 256) -> dict[str, bytes]:
    objects = {f"c/{i}": bytes([i % 251]) * size for i in range(count)}
    server.objects.update(objects)
    return objects


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("limit", [1, 4, 16])
async def test_max_concurrency_holds_at_the_server(
    http_server: HTTPServer, kind: str, limit: int
) -> None:
    objects = fill(http_server, 60)
    http_server.faults = Faults(delay=0.02)
    store = http_store(kind, http_server, max_concurrency=limit)
    results = await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert [r.to_bytes() if r else None for r in results] == list(objects.values())
    assert http_server.requests == 60
    assert http_server.most_in_flight == limit


@pytest.mark.parametrize("kind", KINDS)
async def test_two_stores_on_one_limiter(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 40)
    http_server.faults = Faults(delay=0.02)
    shared = anyio.CapacityLimiter(3)
    first = http_store(kind, http_server, limiter=shared)
    second = http_store(kind, http_server, limiter=shared)
    async with anyio.create_task_group() as tg:
        for store in (first, second):
            tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in objects])
    assert http_server.requests == 80
    assert http_server.most_in_flight == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_cancelling_a_bulk_read_stops_it(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 200)
    http_server.faults = Faults(delay=0.3)
    store = http_store(kind, http_server, max_concurrency=8)
    tasks_before = len(anyio.get_running_tasks())
    threads_before = threading.active_count()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in objects])
            with anyio.fail_after(10):
                while http_server.in_flight < 8:
                    await anyio.sleep(0.01)
            scope.cancel()
    started = http_server.requests
    assert started < 200
    assert len(anyio.get_running_tasks()) == tasks_before
    await anyio.sleep(0.5)
    assert http_server.requests == started  # nothing started after the cancellation
    # Worker threads are pooled, not running for us: no more of them than before the read
    # plus the pool's idle ones, and none busy (the server saw every request end).
    assert http_server.in_flight == 0
    assert threading.active_count() <= threads_before + 8 + 2


@pytest.mark.parametrize("kind", KINDS)
async def test_faults_are_retried_and_every_byte_arrives(
    http_server: HTTPServer, kind: str
) -> None:
    objects = fill(http_server, 1000, size=64)
    http_server.faults = Faults(slow_down=0.08, server_error=0.04, drop=0.04, seed=7)
    store = http_store(
        kind, http_server, max_concurrency=16, retry=Retry(attempts=10, base_delay=0.001)
    )
    results = await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert [r.to_bytes() if r else None for r in results] == list(objects.values())
    spoiled = sum(http_server.spoiled.values())
    assert spoiled > 50  # the faults happened...
    assert http_server.requests == 1000 + spoiled  # ...and each cost exactly one more request


@pytest.mark.parametrize("kind", KINDS)
async def test_a_missing_key_is_never_retried(http_server: HTTPServer, kind: str) -> None:
    store = http_store(kind, http_server, retry=Retry(attempts=5, base_delay=0.001))
    assert await store.get("nope", PROTO) is None
    assert http_server.paths.count("/nope") == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_persistent_server_errors_give_up_after_the_attempts(
    http_server: HTTPServer, kind: str
) -> None:
    fill(http_server, 1)
    http_server.faults = Faults(slow_down=1.0)
    store = http_store(kind, http_server, retry=Retry(attempts=3, base_delay=0.001))
    with pytest.raises(Exception) as error:  # noqa: PT011 -- each client has its own type
        await store.get("c/0", PROTO)
    assert is_transient(error.value)
    assert http_server.requests == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limit_holds_the_request_rate(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 41)
    store = http_store(kind, http_server, max_concurrency=16, rate_limit=RateLimit(40))
    await store.get_partial_values(PROTO, [(key, None) for key in objects])
    times = http_server.times
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 36 <= rate <= 44


async def test_rate_limit_is_shared_between_stores(http_server: HTTPServer) -> None:
    objects = fill(http_server, 20)
    shared = RateLimit(40)
    stores = [http_store(kind, http_server, rate_limit=shared) for kind in KINDS]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in objects])
    times = http_server.times
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 36 <= rate <= 44


# ------------------------------------------------------------------------------- the bridge


async def test_bridge_returns_results_and_errors_as_themselves() -> None:
    import asyncio

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def fail() -> None:
        raise KeyError("which")

    assert await run_on_loop(lambda: double(21)) == 42
    with pytest.raises(KeyError, match="which"):
        await run_on_loop(fail)


async def test_cancelling_the_caller_cancels_the_bridged_task_and_waits_for_it() -> None:
    import asyncio

    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a while
            events.append("ended")

    with anyio.move_on_after(0.05):
        await run_on_loop(slow)
    # The cancellation reached the caller only after the bridged task had ended.
    assert events == ["ended"]


def test_transient_errors_are_told_from_permanent_ones() -> None:
    class Status(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"status {status}")
            self.status = status

    transient: list[BaseException] = [
        ConnectionResetError(),
        TimeoutError(),
        Status(503),
        Status(429),
        Status(500),
        OSError("Server returned non-2xx status code: 503 Service Unavailable"),
        OSError("SlowDown: please reduce your request rate"),
    ]
    permanent: list[BaseException] = [
        FileNotFoundError("c/0"),
        PermissionError("no"),
        Status(404),
        Status(403),
        Status(400),
        ValueError("bad key"),
        OSError("Server returned non-2xx status code: 412 Precondition Failed"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    wrapped = OSError("translated")
    wrapped.__cause__ = Status(502)
    assert is_transient(wrapped)


def test_retry_and_rate_limit_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="per_second"):
        RateLimit(0)
    with pytest.raises(TypeError, match="retry"):
        ObjectStore(_memory(), retry="often")  # type: ignore[arg-type]
    store = ObjectStore(_memory(), retry=2, rate_limit=10)
    assert store.retry == Retry(attempts=2)
    assert isinstance(store.rate_limit, RateLimit)
    with pytest.raises(TypeError, match="obstore"):
        ObjectStore(object())


def _memory() -> Any:
    from obstore.store import MemoryStore

    return MemoryStore()


# ------------------------------------------------------------------------- S3 from trio


async def test_set_if_not_exists_is_a_conditional_put_on_s3(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    stores: list[Callable[[], RemoteStore]] = [
        lambda: FsspecStore(s3_server.s3fs(asynchronous=True), path=f"{bucket}/fsspec"),
        lambda: ObjectStore(s3_server.obstore(bucket, prefix="obstore")),
    ]
    for make in stores:
        store = make()
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(store.set_if_not_exists, "lock", PROTO.buffer.from_bytes(b"%d" % i))
        value = await store.get("lock", PROTO)
        assert value is not None
        assert int(value.to_bytes()) in range(10)
        await store.set_if_not_exists("lock", PROTO.buffer.from_bytes(b"later"))
        again = await store.get("lock", PROTO)
        assert again is not None
        assert again.to_bytes() == value.to_bytes()


# ------------------------------------------------------------------ closing network sessions


async def test_closing_a_from_url_store_closes_its_session_and_it_can_reopen(
    http_server: HTTPServer, s3_server: S3Server
) -> None:
    objects = fill(http_server, 1)
    bucket = s3_server.new_bucket()
    s3_options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
    }
    http = FsspecStore.from_url(http_server.url, read_only=True)
    s3 = FsspecStore.from_url(f"s3://{bucket}/closing", storage_options=s3_options)
    await s3.set("c/0", PROTO.buffer.from_bytes(objects["c/0"]))
    for store, attribute in ((http, "_session"), (s3, "_s3")):
        first = await store.get("c/0", PROTO)
        assert first is not None
        assert first.to_bytes() == objects["c/0"]
        session = getattr(store.fs, attribute)
        assert session is not None
        await store.aclose()
        assert getattr(store.fs, attribute) is None
        if attribute == "_session":
            assert session.closed
        # Used again, the store opens a new session.
        again = await store.get("c/0", PROTO)
        assert again is not None
        assert again.to_bytes() == objects["c/0"]
        assert getattr(store.fs, attribute) not in (None, session)
        store.close()  # the blocking close, from inside a running event loop, works too
        assert getattr(store.fs, attribute) is None


async def test_a_filesystem_the_caller_passed_is_left_open(http_server: HTTPServer) -> None:
    fill(http_server, 1)
    store = http_store("fsspec", http_server)
    assert await store.get("c/0", PROTO) is not None
    session = store.fs._session  # type: ignore[attr-defined]
    await store.aclose()
    assert store.fs._session is session  # type: ignore[attr-defined]
    assert not session.closed
    await run_on_loop(session.close)
