"""Attacks on the promises of the docs, each the smallest program that broke one (or tried to).

Each test names the sentence it holds the library to. Async tests run under asyncio and trio.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from zarr.core.buffer import default_buffer_prototype

from servers import Faults, HTTPServer
from test_remote import fill, http_store
from zarr_anyio import Limiter, Retry

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()
QUICK = Retry(attempts=4, base_delay=0.002, max_delay=0.05, max_retry_after=0.1)


# ------------------------------------------------------------------------ the limiter


def test_a_thread_interrupted_while_waiting_in_blocking_loses_no_token() -> None:
    # Promise (Limiter docstring): "with limiter.blocking(): from a plain thread"; tokens are
    # never lost. Ctrl-C while the main thread waits for a token must leave the queue, or the
    # token handed to the dead waiter later is gone for good.
    limiter = Limiter(1)
    limiter.acquire_nowait()
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    assert main is not None

    def interrupt() -> None:
        while limiter.statistics().tasks_waiting == 0:
            time.sleep(0.005)
        signal.pthread_kill(main, signal.SIGINT)

    poker = threading.Thread(target=interrupt)
    poker.start()
    try:
        with pytest.raises(KeyboardInterrupt), limiter.blocking():
            pass
    finally:
        poker.join()
    limiter.release()
    assert limiter.statistics().tasks_waiting == 0
    assert limiter.statistics().borrowed_tokens == 0
    with limiter.blocking():  # and the token can be had again
        pass


# ------------------------------------------------------------------------ Retry-After


@pytest.mark.parametrize(
    "header",
    [
        "\xc2\xb2",  # UTF-8 of "²", which str.isdigit() takes for a digit
        "Mon, 01 Jan 99999999999999999999999 00:00:00 GMT",  # a year past any datetime
    ],
)
async def test_a_garbage_retry_after_is_ignored_not_raised(
    http_server: HTTPServer, header: str
) -> None:
    # Promise (_retry.parse_retry_after / Retry): a server's Retry-After is read as seconds or
    # an HTTP date; anything else is no Retry-After. And errors come back as themselves: a
    # throttled read is retried, never turned into a ValueError/OverflowError of our parser.
    objects = fill(http_server, 1)
    http_server.faults = Faults(too_many_first=1, retry_after=header)
    store = http_store("fsspec", http_server, retry=QUICK)
    (value,) = await store.get_partial_values(PROTO, [(key, None) for key in objects])
    assert value is not None
    assert value.to_bytes() == objects["c/0"]
    assert http_server.answers == [429, 200]


def test_parse_retry_after_never_raises() -> None:
    from zarr_anyio._retry import parse_retry_after

    for value in ["²", "٣", "1" * 400, "Mon, 01 Jan 99999999999999999999999 00:00:00 GMT"]:
        parsed = parse_retry_after(value)
        assert parsed is None or parsed >= 0
