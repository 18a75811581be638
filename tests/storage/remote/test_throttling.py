"""Remote stores against servers that throttle, refuse, hang or fail: the adaptive window,
Retry-After, the retry budget, timeouts, one error from a bulk call, and stats().

Every count here is the server's own (tests/servers.py), both backends, asyncio and trio.
"""

from __future__ import annotations

import email.utils
import pickle
import time

import anyio
import pytest
from zarr.core.buffer import default_buffer_prototype

from support.remote import KINDS, QUICK, fill, http_store, read_all
from support.servers import Faults, HTTPServer, s3fs_at
from zarr_anyio import (
    NO_RETRY,
    AdaptiveLimiter,
    FsspecStore,
    Limiter,
    ObjectStore,
    RequestStats,
    Retry,
    RetryBudget,
)
from zarr_anyio._core.adaptive import Outcome
from zarr_anyio.storage._retry import describe, is_transient, parse_retry_after

# Counted in real time against the loopback server: CI runs these apart (`timing`).
pytestmark = [pytest.mark.anyio, pytest.mark.timing]
PROTO = default_buffer_prototype()


# ------------------------------------------------------------------------ the adaptive window


@pytest.mark.parametrize("kind", KINDS)
async def test_against_a_rate_limit_the_window_shrinks_and_every_byte_arrives(
    http_server: HTTPServer, kind: str
) -> None:
    objects = fill(http_server, 300)
    limit = Faults(delay=0.01, rate_limit=200, rate_burst=5)
    http_server.faults = limit
    patient = Retry(attempts=1000, base_delay=0.002, max_delay=0.05)
    unbounded = RetryBudget(capacity=10**9)
    fixed = http_store(
        kind, http_server, max_concurrency=64, adaptive=False, retry=patient, retry_budget=unbounded
    )
    await read_all(fixed, objects)
    fixed_throttled = http_server.throttled
    http_server.reset()
    objects = fill(http_server, 300)
    http_server.faults = Faults(delay=0.01, rate_limit=200, rate_burst=5)
    adaptive = http_store(kind, http_server, max_concurrency=64, retry=QUICK)
    await read_all(adaptive, objects)
    stats = adaptive.stats()
    # The same server, the same reads: the fixed window of 64 kept hammering (hundreds of its
    # requests refused: 300-600 here, fewer on a loaded machine, whose client is slower), the
    # adaptive one came down to what the server admits.
    assert fixed_throttled > 150
    assert http_server.throttled < fixed_throttled / 4
    assert stats.throttled == http_server.throttled
    assert stats.requests == http_server.requests == 300 + http_server.throttled
    assert stats.window < 32
    assert http_server.most_in_flight <= 64


@pytest.mark.parametrize("kind", KINDS)
async def test_against_a_concurrency_limit_the_window_settles_near_it(
    http_server: HTTPServer, kind: str
) -> None:
    objects = fill(http_server, 400)
    http_server.faults = Faults(delay=0.02, concurrency_limit=8)
    store = http_store(kind, http_server, max_concurrency=64, retry=QUICK)
    await read_all(store, objects)
    assert http_server.throttled < 100  # a fixed window of 64 would see ~7 of 8 refused
    assert store.stats().window <= 16
    assert store.stats().throttled == http_server.throttled


@pytest.mark.parametrize("kind", KINDS)
async def test_the_window_grows_to_the_ceiling_and_never_past_it(
    http_server: HTTPServer, kind: str
) -> None:
    # 50 ms answers and 400 reads: a client short of CPU (the suite beside it) still keeps
    # the grown window full (at 20 ms and 200 reads, it once had at most 24 in flight).
    objects = fill(http_server, 400)
    http_server.faults = Faults(delay=0.05)
    store = http_store(kind, http_server, limiter=AdaptiveLimiter(48, initial=2))
    await read_all(store, objects)
    assert store.stats().window == 48  # grew from 2 to the ceiling, nothing was refused...
    assert 24 < http_server.most_in_flight <= 48  # ...and never past it
    assert store.max_concurrency == 48


@pytest.mark.parametrize("kind", KINDS)
async def test_one_window_shared_by_two_stores(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 100)
    http_server.faults = Faults(delay=0.02)
    shared = AdaptiveLimiter(6)
    first = http_store(kind, http_server, limiter=shared)
    second = http_store(kind, http_server, limiter=shared)
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_all, first, objects)
        tg.start_soon(read_all, second, objects)
    assert http_server.requests == 200
    assert http_server.most_in_flight == 6
    assert first.stats().window == second.stats().window == 6


@pytest.mark.parametrize("kind", KINDS)
async def test_adaptive_false_keeps_a_fixed_window(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 60)
    http_server.faults = Faults(delay=0.01, concurrency_limit=4)
    store = http_store(
        kind,
        http_server,
        max_concurrency=12,
        adaptive=False,
        retry=Retry(attempts=1000, base_delay=0.002, max_delay=0.05),
        retry_budget=RetryBudget(capacity=10**9),
    )
    assert not store.adaptive
    await read_all(store, objects)
    assert store.stats().window == 12  # refused again and again, the window stays
    assert http_server.throttled > 0
    assert http_store(kind, http_server, adaptive=False).max_concurrency == 32
    assert http_store(kind, http_server).max_concurrency == 128


def test_the_window_follows_its_control_law() -> None:
    window = AdaptiveLimiter(64, initial=4)
    # Slow start: one more token per answer while the window is in use...
    for _ in range(4):
        window.record(Outcome.ANSWERED, 0.02, window.epoch, in_flight=4)
    assert window.total_tokens == 8
    # ...but not when the caller uses less than half of it (nothing was learnt).
    window.record(Outcome.ANSWERED, 0.02, window.epoch, in_flight=1)
    assert window.total_tokens == 8
    # The first throttling answer ends slow start and takes 10% off; answers to requests sent
    # before that decrease take 5% more each; the next episode 10% again.
    started = window.epoch
    window.record(Outcome.THROTTLED, 0.001, started, in_flight=8)
    assert window.window == pytest.approx(7.2)
    window.record(Outcome.THROTTLED, 0.001, started, in_flight=8)
    assert window.window == pytest.approx(6.84)
    window.record(Outcome.TIMED_OUT, 30.0, window.epoch, in_flight=4)
    assert window.window == pytest.approx(6.156)
    assert window.total_tokens == 6
    # Other failures say nothing of load.
    window.record(Outcome.FAILED, 0.001, window.epoch, in_flight=4)
    assert window.window == pytest.approx(6.156)
    # Latency that climbs (a server queueing) stops growth.
    queued = AdaptiveLimiter(64, initial=4)
    for _ in range(20):
        queued.record(Outcome.ANSWERED, 0.02, queued.epoch, in_flight=64)
    grown = queued.total_tokens
    for _ in range(20):
        queued.record(Outcome.ANSWERED, 0.2, queued.epoch, in_flight=64)
    assert queued.total_tokens <= grown + 2
    # Never past the ceiling, never below one.
    small = AdaptiveLimiter(3, initial=8)
    assert small.total_tokens == 3
    for _ in range(10):
        small.record(Outcome.ANSWERED, 0.02, small.epoch, in_flight=3)
        small.record(Outcome.THROTTLED, 0.02, small.epoch, in_flight=3)
    assert small.total_tokens == 1
    copy = pickle.loads(pickle.dumps(window))
    assert isinstance(copy, AdaptiveLimiter)
    assert (copy.ceiling, copy.total_tokens) == (64, 4)
    with pytest.raises(ValueError, match="ceiling"):
        AdaptiveLimiter(0)


# ------------------------------------------------------------------------ Retry-After


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    soon = email.utils.formatdate(time.time() + 5, usegmt=True)
    after = parse_retry_after(soon)
    assert after is not None
    assert 3 <= after <= 5
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert Retry(base_delay=0.001, max_delay=0.001).delay(0, retry_after=2.0) == 2.0
    assert Retry(max_retry_after=1.0).delay(0, retry_after=60.0) == 1.0


@pytest.mark.parametrize("header", ["seconds", "date"])
async def test_retry_after_is_honoured(http_server: HTTPServer, header: str) -> None:
    # obstore's errors carry no headers (see docs/remote.md): fsspec's http answers do.
    objects = fill(http_server, 1)
    value = "1" if header == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    http_server.faults = Faults(too_many_first=1, retry_after=value)
    store = http_store("fsspec", http_server, retry=QUICK)
    await read_all(store, objects)
    assert http_server.answers == [429, 200]
    waited = http_server.times[1] - http_server.times[0]
    assert waited >= 0.95  # QUICK alone would have waited a few milliseconds
    assert store.stats().throttled == 1


async def test_retry_after_is_read_from_s3fs(http_server: HTTPServer) -> None:
    http_server.objects["bucket/k"] = b"v"
    http_server.faults = Faults(too_many_first=1, retry_after="1")
    fs = s3fs_at(
        http_server.url,
        asynchronous=True,
        skip_instance_cache=True,
        config_kwargs={"retries": {"total_max_attempts": 1}},
    )
    fs.retries = 1
    store = FsspecStore(fs, path="bucket", retry=QUICK)
    value = await store.get("k", PROTO)
    assert value is not None
    assert value.to_bytes() == b"v"
    assert http_server.answers[0] == 429
    assert http_server.answers[1:] in ([200], [200, 200])  # s3fs may HEAD before it GETs
    assert http_server.times[1] - http_server.times[0] >= 0.95


async def test_a_request_waiting_out_a_retry_after_lends_its_worker(
    http_server: HTTPServer,
) -> None:
    # Two workers for a window of two: the first request is told to come back in 3 s, the
    # second hangs until the test lets it go. The refused request waits without its token,
    # and without its worker: another worker takes the free token and sends the next key at
    # once. (Before, the sleeping request kept its worker, so the window went a token short
    # for its wait: nothing more was sent until its own retry, 3 s later. Against a token
    # bucket of 300/s answering Retry-After: 1, that was 264 requests/s for the second after
    # each refusal.)
    objects = fill(http_server, 6)
    http_server.faults = Faults(
        too_many_first=1, retry_after="3", hang_first=1, hang_from=2, hang_for=30
    )
    store = http_store("fsspec", http_server, retry=QUICK, max_concurrency=2)
    assert store.max_concurrency == 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_all, store, objects)
        with anyio.fail_after(20):
            while http_server.requests < 3:
                await anyio.sleep(0.01)
        third = http_server.paths[2]
        http_server.release()
    refused, hung = http_server.paths[:2]
    assert http_server.answers[0] == 429
    # The third request is a key of its own, not the refused one's retry.
    assert third not in (refused, hung)
    assert http_server.paths.count(refused) == 2
    assert http_server.admission.early == 0  # and the retry came when it was told
    assert store.stats().throttled == 1


async def test_obstore_retries_a_429_without_its_headers(http_server: HTTPServer) -> None:
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=1, retry_after="1")
    store = http_store("obstore", http_server, retry=QUICK)
    await read_all(store, objects)
    assert http_server.answers == [429, 200]
    assert store.stats().throttled == 1


# ------------------------------------------------------------------------ the retry budget


@pytest.mark.parametrize("kind", KINDS)
async def test_a_spent_retry_budget_surfaces_errors_at_once(
    http_server: HTTPServer, kind: str
) -> None:
    fill(http_server, 1)
    # Always 500: a failure (a throttle would be paced, not spent from the budget).
    http_server.faults = Faults(server_error=1.0)
    budget = RetryBudget(capacity=50, retry_cost=5)  # ten retries
    store = http_store(kind, http_server, retry=QUICK, retry_budget=budget)
    sent = []
    for _ in range(3):
        before = http_server.requests
        with pytest.raises(Exception) as error:  # noqa: PT011 -- each client has its own type
            await store.get("c/0", PROTO)
        sent.append(http_server.requests - before)
        assert describe(error.value).status == 500
    # QUICK allows ten attempts: the first call spends nine retries of the budget's ten, the
    # second one, the third none: a bounded number of requests, and a clear word why.
    assert sent == [10, 2, 1]
    assert any("retry budget is spent" in note for note in error.value.__notes__)
    assert store.stats().errors == 3
    # Answers refill it.
    http_server.faults = Faults()
    for _ in range(5):
        await store.get("c/0", PROTO)
    assert budget.available == 5


# ------------------------------------------------------------------------ timeouts


@pytest.mark.parametrize("kind", KINDS)
async def test_a_hung_attempt_times_out_and_is_retried(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 1)
    http_server.faults = Faults(hang_first=1, hang_for=30)
    store = http_store(kind, http_server, retry=QUICK, timeout=0.5)
    with anyio.fail_after(10):
        await read_all(store, objects)
    assert http_server.requests == 2
    stats = store.stats()
    assert (stats.timeouts, stats.retries, stats.requests) == (1, 1, 2)
    assert is_transient(TimeoutError())


@pytest.mark.parametrize("kind", KINDS)
async def test_cancelling_while_the_server_hangs(http_server: HTTPServer, kind: str) -> None:
    fill(http_server, 1)
    http_server.faults = Faults(hang_first=1, hang_for=30)
    store = http_store(kind, http_server, timeout=None)
    tasks_before = len(anyio.get_running_tasks())
    # The server holds the request for 30 s: a cancellation that waited for it would hit this.
    with anyio.move_on_after(5) as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.get, "c/0", PROTO)
            while http_server.hung < 1:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught
    assert len(anyio.get_running_tasks()) == tasks_before
    assert store.stats().in_flight == 0
    assert http_server.requests == 1  # not retried: cancelled


def test_timeout_is_checked() -> None:
    from obstore.store import MemoryStore

    assert ObjectStore(MemoryStore()).timeout == 30.0
    assert ObjectStore(MemoryStore(), timeout=None).timeout is None
    with pytest.raises(ValueError, match="timeout"):
        ObjectStore(MemoryStore(), timeout=0)
    with pytest.raises(ValueError, match="adaptive"):
        ObjectStore(MemoryStore(), limiter=AdaptiveLimiter(4), adaptive=False)
    fixed = ObjectStore(MemoryStore(), limiter=Limiter(5))
    assert (fixed.adaptive, fixed.max_concurrency) == (False, 5)


# ------------------------------------------------------------------------ one error per call


@pytest.mark.parametrize("kind", KINDS)
async def test_bulk_calls_raise_one_error_not_a_group(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 40)
    http_server.faults = Faults(server_error=1.0, delay=0.05)  # every worker fails at once
    store = http_store(kind, http_server, retry=NO_RETRY, max_concurrency=8, adaptive=False)
    with pytest.raises(Exception) as error:  # noqa: PT011 -- each client has its own type
        await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert not isinstance(error.value, BaseExceptionGroup)
    assert describe(error.value).status == 500
    with pytest.raises(Exception) as error:  # noqa: PT011
        async with store.fetch_many(list(objects)) as results:
            async for _ in results:
                pass
    assert not isinstance(error.value, BaseExceptionGroup)
    writable = http_store(kind, http_server, retry=NO_RETRY, max_concurrency=8)
    writable._read_only = False
    with pytest.raises(Exception) as error:  # noqa: PT011
        await writable.set_many([(key, PROTO.buffer.from_bytes(b"x")) for key in objects])
    assert not isinstance(error.value, BaseExceptionGroup)
    assert describe(error.value).status == 500


# ------------------------------------------------------------------------ stats


@pytest.mark.parametrize("kind", KINDS)
async def test_stats_count_what_the_server_saw(http_server: HTTPServer, kind: str) -> None:
    objects = fill(http_server, 200, size=1000)
    http_server.faults = Faults(slow_down=0.05, delay=0.005, seed=3)
    store = http_store(kind, http_server, retry=QUICK, max_concurrency=16)
    seen: list[RequestStats] = []

    async def watch() -> None:
        async for stats in store.watch(0.01):
            seen.append(stats)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await read_all(store, objects)
        tg.cancel_scope.cancel()
    stats = store.stats()
    assert stats.requests == http_server.requests
    assert stats.throttled == http_server.spoiled["503"] > 0
    assert stats.retries == stats.throttled
    assert stats.bytes_received == 200 * 1000
    assert (stats.timeouts, stats.errors, stats.in_flight) == (0, 0, 0)
    assert await store.get("nope", PROTO) is None  # an answer, not an error
    assert store.stats().errors == 0
    assert stats.ceiling == 16
    assert 1 <= stats.window <= 16
    assert any(snapshot.in_flight > 0 for snapshot in seen)  # watched while it read
    assert [s.requests for s in seen] == sorted(s.requests for s in seen)
