"""Remote stores against real servers on loopback: limits, cancellation, faults, rate limits.

Every count here is the server's own (requests received, most in flight at once), not ours.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from zarr.abc.store import OffsetByteRequest, RangeByteRequest
from zarr.core.buffer import default_buffer_prototype

from support.remote import KINDS, fill, http_store
from support.servers import CountingProxy, Faults, HTTPServer, S3Server, s3fs_at
from zarr_anyio import (
    NO_RETRY,
    FsspecStore,
    ObjectStore,
    RateLimit,
    RemoteStore,
    Retry,
    open_store_async,
)
from zarr_anyio._core.bridge import run_on_loop
from zarr_anyio.storage._retry import http_status, is_transient

# Counted in real time against the loopback server: CI runs these apart (`timing`).
pytestmark = [pytest.mark.anyio, pytest.mark.timing]
PROTO = default_buffer_prototype()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("limit", [1, 4, 16])
async def test_max_concurrency_holds_at_the_server(
    http_server: HTTPServer, kind: str, limit: int
) -> None:
    # 100 ms answers: a client short of CPU (the suites beside it) still fills the window
    # (at 20 ms it once had at most 15 of 16 in flight).
    count = 3 * limit + 12
    objects = fill(http_server, count)
    http_server.faults = Faults(delay=0.1)
    store = http_store(kind, http_server, max_concurrency=limit)
    results = await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert [r.to_bytes() if r else None for r in results] == list(objects.values())
    assert http_server.requests == count
    assert http_server.most_in_flight == limit


async def test_an_http_from_url_store_is_not_held_below_its_window_by_aiohttps_pool(
    http_server: HTTPServer,
) -> None:
    # Before: botocore's pool of 10 connections held s3fs to 10 requests at once, aiohttp's
    # pool of 100 held http to 100, whatever max_concurrency said. Each answer takes long
    # enough that a loaded machine still opens over 100 connections while the first are
    # answered (at 0.1 s, with the suites running beside it, it reached 81).
    objects = fill(http_server, 300)
    http_server.faults = Faults(delay=0.5)
    store = FsspecStore.from_url(
        http_server.url, read_only=True, max_concurrency=120, adaptive=False
    )
    await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert http_server.most_in_flight > 100
    # Opened again by its name, with a wider window: the same client, whose pool holds it not.
    http_server.most_in_flight = 0
    http_server.faults = Faults(delay=0.6)
    wider = await open_store_async(str(store), mode="r", max_concurrency=250, adaptive=False)
    await wider.get_partial_values(PROTO, [(key, None) for key in objects])
    assert http_server.most_in_flight > 128
    await store.aclose()


async def test_an_s3_from_url_store_is_not_held_below_its_window_by_botocores_pool(
    s3_server: S3Server,
) -> None:
    bucket = s3_server.new_bucket()
    with CountingProxy(s3_server.endpoint) as proxy:
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"},
        }
        writer = FsspecStore.from_url(f"s3://{bucket}/p", storage_options=options)
        keys = [f"k{i}" for i in range(40)]
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(writer.set, key, PROTO.buffer.from_bytes(b"v"))
        proxy.delay = 0.2
        proxy.most_in_flight = 0
        store = FsspecStore.from_url(
            f"s3://{bucket}/p",
            storage_options=options,
            read_only=True,
            max_concurrency=30,
            adaptive=False,
        )
        values = await store.get_partial_values(PROTO, [(key, None) for key in keys])
        assert all(value is not None and value.to_bytes() == b"v" for value in values)
        assert proxy.most_in_flight > 10
        await store.aclose()
        sized = {**options, "config_kwargs": {"max_pool_connections": 4}}
        store = FsspecStore.from_url(f"s3://{bucket}/p", storage_options=sized)
        assert store.fs.config_kwargs["max_pool_connections"] == 4  # the caller's own size
        await store.aclose()
        await writer.aclose()


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
async def test_a_body_cut_short_is_retried_and_never_returned(
    http_server: HTTPServer, kind: str
) -> None:
    # docs/remote.md: a body cut short of its Content-Length fails in the client and is retried.
    objects = fill(http_server, 200, size=4096)
    http_server.faults = Faults(truncate=0.2, seed=11)
    store = http_store(
        kind, http_server, max_concurrency=8, retry=Retry(attempts=10, base_delay=0.001)
    )
    results = await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert [r.to_bytes() if r else None for r in results] == list(objects.values())
    assert http_server.spoiled["truncate"] > 10
    assert store.stats().retries == http_server.spoiled["truncate"]


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
    # Always 500: a failure counts against the attempts (a throttle would be paced instead).
    http_server.faults = Faults(server_error=1.0)
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
    # Never faster than the limit (a loaded machine only makes it slower): the bound is the
    # promise; the floor only says the limit is not far stricter than asked.
    assert 20 <= rate <= 44


async def test_rate_limit_is_shared_between_stores(http_server: HTTPServer) -> None:
    objects = fill(http_server, 20)
    shared = RateLimit(40)
    stores = [http_store(kind, http_server, rate_limit=shared) for kind in KINDS]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.get_partial_values, PROTO, [(key, None) for key in objects])
    times = http_server.times
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 20 <= rate <= 44


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

    class BotoLike(Exception):
        def __init__(self, status: int, code: str) -> None:
            super().__init__(f"An error occurred ({code})")
            self.response = {
                "Error": {"Code": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }

    transient: list[BaseException] = [
        ConnectionResetError(),
        TimeoutError(),
        Status(503),
        Status(429),
        Status(500),
        BotoLike(503, "SlowDown"),
        BotoLike(400, "RequestTimeout"),
    ]
    permanent: list[BaseException] = [
        FileNotFoundError("c/0"),
        PermissionError("no"),
        Status(404),
        Status(403),
        Status(400),
        BotoLike(412, "PreconditionFailed"),
        ValueError("bad key"),
        # Text is never a status: these only mention one.
        OSError("Server returned non-2xx status code: 503 Service Unavailable"),
        OSError("SlowDown: please reduce your request rate"),
        OSError("HTTP 500 from request id 5030429"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    wrapped = OSError("translated")
    wrapped.__cause__ = Status(502)
    assert is_transient(wrapped)
    # s3fs raises FileNotFoundError for a 404 (permanent); fsspec's http `info` raises it from
    # whatever failed, and a 503 there is a 503.
    not_found = FileNotFoundError("c/0")
    not_found.__cause__ = Status(503)
    assert is_transient(not_found)


def _free_port_with(digits: str) -> int:
    """A loopback port nothing listens on whose number contains ``digits``."""
    for port in range(int(digits) * 100, int(digits) * 100 + 100):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port with {digits} in it")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_connection_error_is_never_taken_for_a_416(kind: str) -> None:
    # Before: FsspecStore read any OSError mentioning "416" as "range past the end" and gave
    # b"", so a refused connection to port 416xx read as an empty value.
    class Nowhere:
        url = f"http://127.0.0.1:{_free_port_with('416')}"

    store = http_store(kind, Nowhere(), retry=NO_RETRY)  # type: ignore[arg-type]
    with pytest.raises(Exception) as error:  # noqa: PT011 -- each client has its own type
        await store.get("c/0", PROTO, OffsetByteRequest(3))
    assert is_transient(error.value)
    assert http_status(error.value) is None


@pytest.mark.parametrize("kind", KINDS)
async def test_a_range_past_the_end_gives_nothing_by_its_status(
    http_server: HTTPServer, kind: str
) -> None:
    http_server.objects["c/0"] = b"hello"
    store = http_store(kind, http_server)
    for byte_range in (OffsetByteRequest(10), RangeByteRequest(10, 20)):
        value = await store.get("c/0", PROTO, byte_range)
        assert value is not None
        assert value.to_bytes() == b""
    assert 416 in http_server.answers


async def test_set_if_not_exists_raises_a_503_whose_text_holds_412(
    http_server: HTTPServer,
) -> None:
    # Before: an error whose text held "412" was taken for "the key exists" and swallowed.
    http_server.faults = Faults(slow_down=1.0, message="Reduce your request rate (request 412).")
    fs = s3fs_at(
        http_server.url,
        asynchronous=True,
        skip_instance_cache=True,
        # As docs/remote.md says to leave retrying to us: one attempt per request.
        config_kwargs={"retries": {"total_max_attempts": 1}},
    )
    fs.retries = 1
    store = FsspecStore(fs, path="bucket/p", retry=NO_RETRY)
    with pytest.raises(OSError, match="412") as error:
        await store.set_if_not_exists("k", PROTO.buffer.from_bytes(b"v"))
    assert http_status(error.value) == 503
    assert http_server.requests == 1  # s3fs and botocore did not retry, as the docs promise
    assert "bucket/p/k" not in http_server.objects


@pytest.mark.parametrize("kind", KINDS)
async def test_keys_reach_an_http_server_as_literal_path_segments(
    http_server: HTTPServer, kind: str
) -> None:
    # Before: FsspecStore sent "%2e%2e/%2e%2e/secret" as "/secret" (outside its root),
    # "a#b" as "a" and "a?x=1" as "a" with a query.
    http_server.objects.update({"secret": b"outside", "data/a": b"plain"})

    class Rooted:
        url = f"{http_server.url}/data"

    store = http_store(kind, Rooted())  # type: ignore[arg-type]
    keys = ["%2e%2e/%2e%2e/secret", "a#b", "a?x=1", "a%2Fb", "a b"]
    assert [await store.get(key, PROTO) for key in keys] == [None] * len(keys)
    received = [urllib.parse.unquote(path) for path in http_server.paths]
    assert received == [f"/data/{key}" for key in keys]  # every key as itself, nothing else
    http_server.objects.update({f"data/{key}": key.encode() for key in keys})
    values = [await store.get(key, PROTO) for key in keys]
    assert [v.to_bytes() if v else None for v in values] == [key.encode() for key in keys]


@pytest.mark.parametrize("backend", KINDS)
@pytest.mark.parametrize("tail", ["?token=SECRET", "?x=1", "#part"])
async def test_a_root_url_with_a_query_or_fragment_is_refused_by_name(
    http_server: HTTPServer, backend: Any, tail: str
) -> None:
    # Before: fsspec's listing of "…/data?x=1" recursed until RecursionError; obstore asked
    # for "…/data?x=1/zarr.json". Keys cannot go after a query, so such a root is refused.
    fill(http_server, 3)
    with pytest.raises(ValueError, match="has a query or a fragment") as caught:
        await open_store_async(f"{http_server.url}/data{tail}", mode="r", backend=backend)
    assert "SECRET" not in str(caught.value)
    assert http_server.requests == 0


# ------------------------------------------------------------------------- obstore specifics


@pytest.mark.parametrize("backend", ["memory", "s3"])
async def test_several_ranges_of_one_key_one_past_its_end(
    backend: str, s3_server: S3Server
) -> None:
    # Before: obstore's get_ranges panicked (RustPanic) on a range that starts past the end.
    import obstore.store

    if backend == "memory":
        client: Any = obstore.store.MemoryStore()
    else:
        client = s3_server.obstore(s3_server.new_bucket())
    store = ObjectStore(client)
    await store.set("a", PROTO.buffer.from_bytes(b"hello"))
    ranges: list[tuple[str, Any]] = [
        ("a", RangeByteRequest(0, 2)),
        ("a", RangeByteRequest(10, 20)),
        ("a", RangeByteRequest(3, 9)),
        ("a", RangeByteRequest(5, 7)),
    ]
    results = await store.get_partial_values(PROTO, ranges)
    singles = [await store.get(key, PROTO, byte_range) for key, byte_range in ranges]
    as_bytes = [None if r is None else r.to_bytes() for r in results]
    assert as_bytes == [b"he", b"", b"lo", b""]
    assert as_bytes == [None if r is None else r.to_bytes() for r in singles]


async def test_list_dir_over_obstore_local_shows_only_names_with_keys(tmp_path: Path) -> None:
    # Before: folders emptied by deletes stayed in list_dir (obstore lists directories).
    import obstore.store

    store = ObjectStore(obstore.store.LocalStore(str(tmp_path)))
    for key in ("x/y/z", "x/w", "v/0", "top"):
        await store.set(key, PROTO.buffer.from_bytes(b"1"))
    await store.delete("x/y/z")
    await store.delete("v/0")
    assert (tmp_path / "x" / "y").is_dir()  # the folder is still there...
    assert [name async for name in store.list_dir("")] == ["top", "x"]  # ...but not listed
    assert [name async for name in store.list_dir("x")] == ["w"]
    assert [name async for name in store.list_dir("x/y")] == []


def test_retry_and_rate_limit_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="per_second"):
        RateLimit(0)
    with pytest.raises(ValueError, match="per_second"):
        RateLimit(float("nan"))
    with pytest.raises(ValueError, match="delays"):
        Retry(max_retry_after=float("nan"))
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


async def test_a_whole_key_is_one_get_at_the_s3_server(s3_server: S3Server) -> None:
    # s3fs (since 2026) asks an object's size (a HEAD) before reading it whole, so that it can split
    # a big one into ranged requests of its own: two requests per chunk, some outside our limit.
    bucket = s3_server.new_bucket()
    values = {f"c/{i}": bytes([i]) * (300_000 + i) for i in range(5)}
    with CountingProxy(s3_server.endpoint) as proxy:
        fs = s3fs_at(
            proxy.url,
            asynchronous=True,
            skip_instance_cache=True,
            default_block_size=100_000,  # smaller than each value: s3fs would split them
        )
        store = FsspecStore(fs, path=f"{bucket}/a")
        await store.set_many([(key, PROTO.buffer.from_bytes(v)) for key, v in values.items()])
        proxy.clear()
        for key, value in values.items():
            found = await store.get(key, PROTO)
            assert found is not None
            assert found.to_bytes() == value
        assert (proxy.count("GET"), proxy.count("HEAD")) == (len(values), 0)
        await store.aclose()


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


def test_a_sync_s3fs_of_the_tests_is_never_closed_on_a_tests_event_loop(
    s3_server: S3Server,
) -> None:
    # s3fs closes a sync filesystem's client when it is collected, on the event loop running
    # in the collecting thread if there is one, not on fsspec's, where the client lives: in
    # CI the task raised "got Future attached to a different loop" into a copy test.
    bucket = s3_server.new_bucket()

    async def drop_one() -> list[str]:
        s3_server.s3fs(skip_instance_cache=True).pipe_file(f"{bucket}/k", b"x")
        gc.collect()
        return [task.get_coro().__qualname__ for task in asyncio.all_tasks()]  # type: ignore[union-attr]

    assert not any("ClientCreatorContext" in name for name in asyncio.run(drop_one()))
