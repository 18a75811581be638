"""Throttling is pacing, not failure: bulk reads that hold against any server's limiter, the
deadline that ends what the server keeps refusing, every throttle seen by the window (client
retries off in the clients we make, a warning for those we are given), counters shared with
read-only copies, and the sessions of the stores we make closed at exit.

Every count here is the server's own (support.servers), both backends, asyncio and trio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import anyio
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype

from support import TOP
from support.remote import KINDS, QUICK, fill, http_store, read_all
from support.servers import Faults, HTTPServer, s3fs_at
from zarr_anyio import (
    DEFAULT_DEADLINE,
    NO_RETRY,
    AdaptiveLimiter,
    ClientRetriesWarning,
    DeadlineExceeded,
    FsspecStore,
    ObjectStore,
    RemoteStore,
    Retry,
    open_store_async,
)
from zarr_anyio._core.adaptive import Outcome
from zarr_anyio._core.bridge import run_blocking
from zarr_anyio.storage._remote import PACED_WAIT_MOST
from zarr_anyio.storage._retry import describe

# Counted in real time against the loopback server: CI runs these apart (`timing`).
pytestmark = [pytest.mark.anyio, pytest.mark.timing]
PROTO = default_buffer_prototype()


# ------------------------------------------------------------------------ pacing, not failure


@pytest.mark.parametrize("limiter", ["sliding", "fixed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_bulk_read_completes_against_a_window_limiter(
    http_server: HTTPServer, kind: str, limiter: str
) -> None:
    # A server that admits 200 requests in any one second (or in each second of the clock) and
    # answers 503 SlowDown at once beyond: the default store, its default budget and attempts.
    objects = fill(http_server, 600, size=64)
    http_server.faults = Faults(window_limit=200, window_kind=limiter)
    store = http_store(kind, http_server)
    await read_all(store, objects)
    assert http_server.throttled > 0
    assert_paced(store, http_server, len(objects))


def assert_paced(store: RemoteStore, server: HTTPServer, count: int) -> None:
    """After a bulk read of ``count`` objects: the store saw every throttle of the server's and
    retried it, and was paced, not failed: the budget guards failures, and there were none."""
    stats = store.stats()
    assert stats.throttled == server.throttled
    assert stats.requests == server.requests == count + server.throttled
    assert stats.retries == server.throttled
    assert stats.errors == 0
    assert stats.retry_budget == store.retry_budget.capacity


@pytest.mark.parametrize("kind", KINDS)
async def test_a_bulk_read_completes_against_a_concurrency_cap(
    http_server: HTTPServer, kind: str
) -> None:
    # 2 requests in flight admitted, 503 SlowDown at once beyond; the store starts at 32, so
    # a request is refused many times over before its turn comes (more than `attempts`).
    objects = fill(http_server, 150, size=64)
    http_server.faults = Faults(delay=0.01, concurrency_limit=2)
    store = http_store(kind, http_server)
    await read_all(store, objects)
    assert http_server.throttled > 0
    assert_paced(store, http_server, len(objects))


@pytest.mark.parametrize("kind", KINDS)
async def test_a_bulk_read_completes_against_a_server_that_queues(
    http_server: HTTPServer, kind: str
) -> None:
    # 4 places, 10 ms each; the rest wait for one: the answers slow down, none is refused.
    # Slow answers are load, not failure: nothing is timed out, retried or counted throttled.
    objects = fill(http_server, 200, size=64)
    http_server.faults = Faults(delay=0.01, concurrency_limit=4, queue=True)
    store = http_store(kind, http_server, timeout=5)
    await read_all(store, objects)
    assert http_server.admission.queued > 0  # it did queue: more were sent than it serves
    assert http_server.throttled == 0
    assert_paced(store, http_server, len(objects))
    assert store.stats().retries == store.stats().timeouts == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_bulk_read_against_429s_with_retry_after(
    http_server: HTTPServer, kind: str
) -> None:
    # 100 requests/s admitted, 429 with `Retry-After: 1` beyond. The server counts a request
    # for a key that comes back sooner than its last answer asked ("early").
    objects = fill(http_server, 60, size=64)
    http_server.faults = Faults(
        delay=0.005, rate_limit=100, rate_burst=10, limit_status=429, retry_after="1"
    )
    store = http_store(kind, http_server)
    await read_all(store, objects)
    assert http_server.throttled > 0
    assert set(http_server.answers) == {429, 200}
    assert_paced(store, http_server, len(objects))
    # fsspec's errors carry the header: no retry comes before it. obstore's carry no headers
    # (docs/remote.md), so an ObjectStore retries on its own backoff, sooner.
    early = http_server.admission.early
    assert early == 0 if kind == "fsspec" else early > 0


async def test_a_request_told_retry_after_waits_without_its_token(
    http_server: HTTPServer,
) -> None:
    # A window of one, two reads, the first request answered 429 `Retry-After: 1`. Held
    # through that second, the token kept the other read from the server the whole time (a
    # burst of such refusals left the window a few tokens to send with); given back, the other
    # read is answered while the refused one waits. (fsspec's errors carry the header; an
    # ObjectStore's carry none, so it waits its own short backoff under its token.)
    fill(http_server, 2, size=64)
    http_server.faults = Faults(too_many_first=1, retry_after="1")
    store = http_store("fsspec", http_server, adaptive=False, max_concurrency=1)
    async with anyio.create_task_group() as tg:
        for key in ("c/0", "c/1"):
            tg.start_soon(store.get, key, PROTO)
    assert http_server.answers == [429, 200, 200]
    first, second, third = http_server.paths
    assert second != first
    assert third == first
    assert http_server.admission.early == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_bulk_read_survives_a_rate_that_drops_mid_run(
    http_server: HTTPServer, kind: str
) -> None:
    # 300 requests/s, 100 from 0.5 s after the first request, 300 again from 1.5 s: at most
    # 155 + 105 are admitted before the rate comes back, so the read spans all three.
    objects = fill(http_server, 400, size=64)
    http_server.faults = Faults(
        delay=0.005, rate_limit=300, rate_burst=5, rate_changes=((0.5, 100.0), (1.5, 300.0))
    )
    store = http_store(kind, http_server)
    await read_all(store, objects)
    assert http_server.throttled > 0
    phases = http_server.admission.phases
    assert len(phases) == 3
    assert all(admitted > 0 for admitted, _ in phases)
    assert_paced(store, http_server, len(objects))


@pytest.mark.parametrize("kind", KINDS)
async def test_a_read_outlasts_more_throttles_than_the_budget_holds_retries(
    http_server: HTTPServer, kind: str
) -> None:
    # The default budget holds 100 retries: a request throttled 150 times still arrives.
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=150)
    store = http_store(kind, http_server, retry=Retry(base_delay=0.001, max_delay=0.004))
    await read_all(store, objects)
    assert http_server.answers == [429] * 150 + [200]
    stats = store.stats()
    assert (stats.throttled, stats.retries, stats.errors) == (150, 150, 0)
    assert stats.retry_budget == store.retry_budget.capacity


@pytest.mark.parametrize("kind", KINDS)
async def test_the_deadline_ends_a_read_the_server_keeps_throttling(
    http_server: HTTPServer, kind: str
) -> None:
    objects = fill(http_server, 3)
    http_server.faults = Faults(slow_down=1.0)  # always 503 SlowDown
    store = http_store(kind, http_server, retry=QUICK, deadline=0.5)
    assert store.deadline == 0.5
    with pytest.raises(DeadlineExceeded) as raised:
        await store.get("c/0", PROTO)
    error = raised.value
    # How long and how often, in the error; the server's last answer as its cause.
    # Refused more often than QUICK's attempts allow: throttles are not counted against them.
    # (At most what the server refused: a request cancelled at the end of the test before may
    # still reach it after its counts were reset.)
    assert QUICK.attempts < error.throttled <= http_server.spoiled["503"]
    assert error.failed == 0
    # It gave up when the next retry could not start in time (waits are at most max_delay).
    assert error.elapsed > 0.5 - QUICK.max_delay
    assert f"{error.throttled} times over" in str(error)
    assert "deadline of 0.5 s" in str(error)
    assert describe(error.__cause__ or error).throttled
    assert not describe(error).transient  # retried already, for as long as allowed
    stats = store.stats()
    assert stats.errors == 1
    assert stats.retry_budget == store.retry_budget.capacity
    # A bulk read raises it as itself, not in a group.
    with pytest.raises(DeadlineExceeded):
        await read_all(store, objects)


def refused_behind_a_held_request(
    http_server: HTTPServer, kind: str, *, tokens: int, deadline: float
) -> tuple[Callable[[str], Coroutine[Any, Any, None]], list[DeadlineExceeded]]:
    """A store of ``tokens`` on a server that refuses every request with 429 and holds the
    first until released; ``get(key)`` reads a key, keeping its `DeadlineExceeded`."""
    http_server.faults = Faults(too_many_first=10**6, hang_first=1, hang_for=30)
    store = http_store(
        kind,
        http_server,
        limiter=AdaptiveLimiter(tokens, initial=tokens),
        deadline=deadline,
        retry=Retry(base_delay=0.01, max_delay=0.02),
    )
    errors: list[DeadlineExceeded] = []

    async def get(key: str) -> None:
        try:
            await store.get(key, PROTO)
        except DeadlineExceeded as error:
            errors.append(error)

    return get, errors


@pytest.mark.parametrize("kind", KINDS)
async def test_no_retry_is_sent_past_the_deadline_after_waiting_for_a_token(
    http_server: HTTPServer, kind: str
) -> None:
    fill(http_server, 2)
    # Every request refused with 429; the first held by the server until released.
    get, errors = refused_behind_a_held_request(http_server, kind, tokens=2, deadline=1.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(get, "c/0")  # holds a token while the server holds it
        while http_server.requests < 1:
            await anyio.sleep(0.01)
        started = time.monotonic()
        # Refused until the window shrinks below the two tokens held: then it gives its token
        # back and queues for one, which comes free only when the first is released.
        tg.start_soon(get, "c/1")
        await anyio.sleep(2.5)
        http_server.release()
    assert len(errors) == 2
    # Its retry got a token 1.5 s past its deadline: it must not be sent then.
    late = [
        when - started
        for when, path in zip(http_server.times, http_server.paths, strict=True)
        if path.endswith("/c/1") and when - started > 1.5
    ]
    assert late == []
    assert all(describe(error.__cause__ or error).throttled for error in errors)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_request_queued_past_its_deadline_is_never_sent(
    http_server: HTTPServer, kind: str
) -> None:
    # Independent callers (a task each, as web handlers are) behind one token that a slow
    # request holds past their deadlines, on a server that then refuses everything. Before,
    # each was still sent when the token came free (and retried until its own deadline: a
    # minute for 400 callers and a deadline of 2 s).
    objects = fill(http_server, 12)
    get, errors = refused_behind_a_held_request(http_server, kind, tokens=1, deadline=0.5)

    first, *others = objects
    async with anyio.create_task_group() as tg:
        tg.start_soon(get, first)  # holds the token while the server holds it
        while http_server.requests < 1:
            await anyio.sleep(0.01)
        for key in others:
            tg.start_soon(get, key)
        await anyio.sleep(1.5)
        http_server.release()
    assert len(errors) == len(objects)
    assert {
        path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1] for path in http_server.paths
    } == {first}
    never_sent = [error for error in errors if error.throttled == 0]
    assert len(never_sent) == len(others)
    assert all("waited" in str(error) and error.__cause__ is None for error in never_sent)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_throttled_request_goes_again_under_its_own_token(
    http_server: HTTPServer, kind: str
) -> None:
    # One token, two reads, the first three answers 429. The throttled read keeps its token
    # and goes again under it while the other waits: given back and taken again, the token
    # went to the other read, fresh, and a window of refused requests kept probing at the
    # shortest backoff however long the server refused.
    objects = fill(http_server, 2)
    http_server.faults = Faults(too_many_first=3)
    store = http_store(kind, http_server, adaptive=False, max_concurrency=1, retry=QUICK)
    async with anyio.create_task_group() as tg:
        for key in objects:
            tg.start_soon(store.get, key, PROTO)
    first = http_server.paths[0]
    (second,) = {path for path in http_server.paths if path != first}
    assert http_server.paths == [first] * 4 + [second]
    assert http_server.answers == [429] * 3 + [200] * 2


def window_at_a_probes_pace() -> AdaptiveLimiter:
    """A window of 4 that has been throttled before a second of answers: paced at a probe's
    10 turns a second, its tokens all free."""
    window = AdaptiveLimiter(4, initial=4)
    for _ in range(3):
        window.record(Outcome.ANSWERED, 0.01, window.epoch, 1)
    window.record(Outcome.THROTTLED, 0.001, window.epoch, 1)
    assert window.pace is not None
    assert window.total_tokens == 4
    return window


def shrink_to_two(window: AdaptiveLimiter) -> None:
    """Refusals fed to ``window`` (as another store sharing it would) until it holds 2."""
    while window.total_tokens > 2:
        window.record(Outcome.THROTTLED, 0.001, window.epoch, 4)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_request_whose_window_shrank_while_it_waited_its_turn_waits_for_a_token_again(
    http_server: HTTPServer, kind: str
) -> None:
    # Four reads under a window of 4 and a probe's pace (a turn every 0.1 s), against a server
    # that holds 2 at a time for a second and refuses beyond. The first read is sent at once,
    # the others wait their turns holding tokens when refusals (fed to the window here, as
    # another store sharing it would) shrink it to 2. Sent anyway, the third and fourth found
    # the server full and were refused: against 48 places, such refusals after slow start's
    # burst each began an episode of their own, and the window stayed at half the server's
    # places for a second. A request whose turn comes with more tokens out than the window
    # holds gives its token back and waits for one again.
    objects = fill(http_server, 4, size=64)
    http_server.faults = Faults(delay=1.0, concurrency_limit=2)
    window = window_at_a_probes_pace()
    store = http_store(kind, http_server, limiter=window)

    async def shrink() -> None:
        while window.borrowed_tokens < 4:
            await anyio.sleep(0.001)
        shrink_to_two(window)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_all, store, objects)
        tg.start_soon(shrink)
    assert http_server.answers == [200] * 4
    assert http_server.most_in_flight == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_a_step_never_retried_waits_for_a_token_again_too(
    http_server: HTTPServer, kind: str
) -> None:
    # A step that a repeat would get wrong (a streamed read's next part, an upload's part:
    # `_request_once`) whose window shrank below the tokens out while it waited its turn is not
    # sent either: it gives its token back, and is sent once, when the window has room.
    window = window_at_a_probes_pace()
    window.reserve()  # the step's turn is a tenth of a second away
    store = http_store(kind, http_server, limiter=window)
    sent: list[tuple[int, int]] = []

    async def step() -> str:
        sent.append((window.borrowed_tokens, window.total_tokens))
        return "answered"

    async def three_others() -> None:
        while window.borrowed_tokens < 1:
            await anyio.sleep(0.001)
        for _ in range(3):
            window.acquire_nowait()
        shrink_to_two(window)
        await anyio.sleep(0.3)  # past the step's turn
        assert sent == []
        for _ in range(3):
            window.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(three_others)
        assert await store._request_once(step) == "answered"
    assert sent == [(1, 2)]


@pytest.mark.parametrize("kind", KINDS)
async def test_under_an_adaptive_window_a_throttled_request_waits_at_most_a_second(
    http_server: HTTPServer, kind: str
) -> None:
    # It waits holding its token: after a window limiter's spent second, the tokens of its
    # refused requests, asleep up to `max_delay` (2 s), held the window shut once the server
    # admitted again. The window's pace spaces the retries; a fixed window, which has none,
    # keeps the whole backoff.
    waits: list[tuple[float | None, float]] = []

    class Recording(Retry):
        def delay(
            self, retry_number: int, retry_after: float | None = None, *, most: float | None = None
        ) -> float:
            wait = super().delay(retry_number, retry_after, most=most)
            waits.append((most, wait))
            return wait

    retry = Recording(base_delay=0.5, max_delay=5.0)
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=3)
    await read_all(http_store(kind, http_server, retry=retry), objects)
    assert [most for most, _ in waits] == [PACED_WAIT_MOST] * 3
    assert all(wait <= PACED_WAIT_MOST for _, wait in waits)
    waits.clear()
    http_server.reset()
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=2)
    await read_all(http_store(kind, http_server, retry=retry, adaptive=False), objects)
    assert [most for most, _ in waits] == [None] * 2


@pytest.mark.parametrize("kind", KINDS)
async def test_failures_still_spend_attempts_and_throttles_do_not(
    http_server: HTTPServer, kind: str
) -> None:
    objects = fill(http_server, 1)
    # Twelve throttles (more than QUICK's ten attempts), then two failures: it arrives.
    http_server.faults = Faults(too_many_first=12)
    store = http_store(kind, http_server, retry=QUICK)
    await read_all(store, objects)
    http_server.reset()
    objects = fill(http_server, 1)
    http_server.faults = Faults(server_error=1.0)
    with pytest.raises(Exception) as raised:  # noqa: PT011 -- each client has its own type
        await store.get("c/0", PROTO)
    assert describe(raised.value).status == 500
    assert http_server.requests == QUICK.attempts
    # NO_RETRY turns retrying off, throttles included.
    http_server.reset()
    fill(http_server, 1)
    http_server.faults = Faults(slow_down=1.0)
    unretried = http_store(kind, http_server, retry=NO_RETRY)
    with pytest.raises(Exception) as raised:  # noqa: PT011
        await unretried.get("c/0", PROTO)
    assert describe(raised.value).throttled
    assert http_server.requests == 1


def test_the_deadline_is_checked() -> None:
    from obstore.store import MemoryStore

    assert ObjectStore(MemoryStore()).deadline == DEFAULT_DEADLINE
    assert ObjectStore(MemoryStore(), deadline=None).deadline is None
    assert ObjectStore(MemoryStore(), deadline=3).with_read_only(True).deadline == 3
    with pytest.raises(ValueError, match="deadline"):
        ObjectStore(MemoryStore(), deadline=0)


# ------------------------------------------------------------------------ every throttle seen


def _url_store_options(backend: str, scheme: str, server: HTTPServer) -> tuple[str, dict[str, Any]]:
    if scheme == "http":
        options = {"client_options": {"allow_http": True}} if backend == "obstore" else {}
        return server.url, options
    if backend == "obstore":
        return "s3://bucket", {
            "endpoint": server.url,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "region": "us-east-1",
            "client_options": {"allow_http": True},
        }
    return "s3://bucket", {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": server.url, "region_name": "us-east-1"},
    }


@pytest.mark.parametrize("scheme", ["http", "s3"])
@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
async def test_stores_made_from_urls_see_every_throttle(
    http_server: HTTPServer, backend: Literal["fsspec", "obstore"], scheme: str
) -> None:
    url, options = _url_store_options(backend, scheme, http_server)
    objects = fill(http_server, 100)
    if scheme == "s3":
        # The HTTP server answers S3's path-style GETs: the bucket is the first segment.
        http_server.objects.update({f"bucket/{key}": value for key, value in objects.items()})
    http_server.faults = Faults(slow_down=0.3, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClientRetriesWarning)  # nothing to warn of: ours
        store = await open_store_async(
            url, mode="r", backend=backend, storage_options=options, retry=QUICK
        )
    assert isinstance(store, RemoteStore)
    await read_all(store, objects)
    stats = store.stats()
    assert http_server.spoiled["503"] > 10
    assert stats.throttled == http_server.spoiled["503"]
    assert stats.errors == 0
    await store.aclose()


def test_a_client_that_retries_itself_draws_one_warning(http_server: HTTPServer) -> None:
    from obstore.store import HTTPStore

    client = HTTPStore.from_url(http_server.url, client_options={"allow_http": True})
    with pytest.warns(ClientRetriesWarning, match="retry_config=.'max_retries': 0."):
        store = ObjectStore(client)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClientRetriesWarning)
        ObjectStore(client)  # once per client
        store.with_read_only(True)
        quiet = HTTPStore.from_url(
            http_server.url, client_options={"allow_http": True}, retry_config={"max_retries": 0}
        )
        ObjectStore(quiet)
    with pytest.warns(ClientRetriesWarning, match="fs.retries = 1"):
        FsspecStore(
            s3fs_at(http_server.url, client_retries=True, skip_instance_cache=True), path="bucket"
        )
    fs = s3fs_at(http_server.url, skip_instance_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClientRetriesWarning)
        FsspecStore(fs, path="bucket")


# ------------------------------------------------------------------------ counters and copies


@pytest.mark.parametrize("kind", KINDS)
async def test_read_only_copies_count_in_the_stores_stats(
    http_server: HTTPServer, kind: str
) -> None:
    objects = fill(http_server, 10)
    store = http_store(kind, http_server)
    copy = store.with_read_only(True)
    await read_all(copy, objects)
    assert store.stats().requests == copy.stats().requests == 10
    assert store.stats().bytes_received == sum(len(v) for v in objects.values())


def test_zarr_reads_in_mode_r_count_in_the_stores_stats(http_server: HTTPServer) -> None:
    source = zarr.storage.MemoryStore()
    array = zarr.create_array(source, shape=(40,), chunks=(10,), dtype="int32")
    array[:] = range(40)
    for key, buffer in source._store_dict.items():
        http_server.objects[f"data/{key}"] = buffer.to_bytes()
    # Writable, as a user's store often is: zarr reads through its read-only copy.
    store = FsspecStore.from_url(f"{http_server.url}/data")
    assert zarr.open_array(store=store, mode="r")[:].tolist() == list(range(40))  # type: ignore[union-attr]
    assert store.stats().requests >= 5  # the metadata and four chunks
    store.close()


# ------------------------------------------------------------------------ sessions


READER = """
import sys
import zarr
import zarr_anyio
from zarr.core.buffer import default_buffer_prototype

url = sys.argv[1]
opened = zarr_anyio.open_store(url, mode="r")
made = zarr_anyio.FsspecStore.from_url(url, read_only=True)
for store in (opened, made, made.with_read_only(True)):
    assert zarr_anyio.api  # the package imported in full
    value = zarr.core.sync.sync(store.get("c/0", default_buffer_prototype()))
    assert value is not None
closed = zarr_anyio.FsspecStore.from_url(url, read_only=True)
assert zarr.core.sync.sync(closed.exists("c/0"))
closed.close()
del made
print("read")
"""


def test_stores_made_from_urls_close_their_sessions_at_exit(http_server: HTTPServer) -> None:
    fill(http_server, 1)
    done = subprocess.run(
        [sys.executable, "-c", READER, http_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TOP)},
        cwd=TOP,
    )
    assert done.stdout.strip() == "read", done.stderr
    assert "Unclosed" not in done.stderr, done.stderr
    assert done.stderr.strip() == ""


def test_a_store_given_a_filesystem_leaves_its_session_alone(http_server: HTTPServer) -> None:
    import fsspec

    fill(http_server, 1)
    fs = fsspec.filesystem("http", asynchronous=True, skip_instance_cache=True)
    store = FsspecStore(fs, path=http_server.url, read_only=True)
    assert zarr.core.sync.sync(store.exists("c/0"))
    session = fs._session
    assert session is not None
    store.close()
    del store
    assert fs._session is session
    assert not session.closed
    run_blocking(session.close)
