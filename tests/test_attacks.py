"""Attacks on the promises of the docs, each the smallest program that broke one (or tried to).

Each test names the sentence it holds the library to. Async tests run under asyncio and trio.
"""

from __future__ import annotations

import signal
import threading
import time

import anyio
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
