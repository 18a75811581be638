"""The remote stores' request policy: which errors are transient, retries, the request rate.

(The concurrency limit itself lives in `._limit`.)
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from ._loops import current_loop_key

__all__ = [
    "NO_RETRY",
    "RateLimit",
    "Retry",
    "call_with_retries",
    "current_loop_key",
    "is_transient",
]

T = TypeVar("T")


# ------------------------------------------------------------------------ retries


_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "TooManyRequests",
    }
)
# Client errors of aiohttp and friends that mean "the connection failed", by class name, so
# that this module imports none of them.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ClientConnectionError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteRead",
    }
)
# What clients say when a connection broke (obstore's Rust client, among others).
_CONNECTION_TROUBLE = (
    "error sending request",
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "incompletemessage",
    "operation timed out",
    "unexpected eof",
)
_STATUS_IN_MESSAGE = re.compile(r"\b(?:status(?: code)?|HTTP)\W{0,3}(429|5\d\d)\b", re.IGNORECASE)


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "status", None) or getattr(error, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    return None


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` may succeed: throttling, a server error, a dropped connection.

    Never a missing key, a refused permission or a bad request: those fail the same way again.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(current).__mro__):
            return True
        status = _status_of(current)
        if status is not None:
            return status in _TRANSIENT_STATUS
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code is not None:
                return code in _TRANSIENT_CODES or str(code) in {str(s) for s in _TRANSIENT_STATUS}
        text = str(current)
        if "SlowDown" in text or _STATUS_IN_MESSAGE.search(text):
            return True
        if any(trouble in text.lower() for trouble in _CONNECTION_TROUBLE):
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class Retry:
    """How a remote store retries a request that failed transiently (see `is_transient`).

    ``attempts`` counts the first try. Waits grow exponentially from ``base_delay`` up to
    ``max_delay``, with full jitter (a random wait between 0 and the bound), so many clients
    throttled at once do not come back at once. Permanent errors are raised at once.
    """

    attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    def delay(self, retry_number: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**retry_number))


NO_RETRY = Retry(attempts=1)


# ------------------------------------------------------------------------ rate limit


class RateLimit:
    """At most ``per_second`` requests a second, with bursts of up to ``burst``: a token bucket.

    Shared like a limiter: pass one object to several stores to put them on one rate. It works
    across event loops and threads (it keeps its own monotonic clock and waits with
    ``anyio.sleep``), so a store can be used from zarr's loop thread and a trio program at once.
    """

    def __init__(self, per_second: float, burst: int = 1) -> None:
        if per_second <= 0:
            raise ValueError(f"per_second must be positive, got {per_second}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.per_second = float(per_second)
        self.burst = burst
        self._interval = 1.0 / self.per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    async def acquire(self) -> None:
        """Wait for this request's turn (a reservation: no request can overtake another)."""
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - (self.burst - 1) * self._interval)
            self._next = start + self._interval
        if start > now:
            await anyio.sleep(start - now)
        else:
            await anyio.lowlevel.checkpoint()

    def __getstate__(self) -> dict[str, Any]:
        return {"per_second": self.per_second, "burst": self.burst}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["per_second"], state["burst"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"RateLimit(per_second={self.per_second}, burst={self.burst})"


async def call_with_retries(
    make: Callable[[], Awaitable[T]], retry: Retry, rate_limit: RateLimit | None
) -> T:
    """Await ``make()``, again after a transient failure, each try waiting its turn."""
    for retry_number in range(retry.attempts):
        if rate_limit is not None:
            await rate_limit.acquire()
        try:
            return await make()
        except Exception as error:
            if retry_number + 1 >= retry.attempts or not is_transient(error):
                raise
        await anyio.sleep(retry.delay(retry_number))
    raise AssertionError("unreachable")  # pragma: no cover
