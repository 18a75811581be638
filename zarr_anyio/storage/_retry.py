"""What a remote store does when a request fails: tell a transient failure from a permanent one,
retry the transient ones with backoff, and hold a request rate.

Failures are judged by what the client *structurally* says about them: the HTTP status and
headers it carries (aiohttp's ``ClientResponseError.status``, botocore's ``response`` dict, which
s3fs keeps as the ``__cause__`` of the ``OSError`` it raises), S3's error code, and the type of a
connection error. Never by searching an error's text: a message holds URLs, ports, request ids
and server-chosen bodies, so "416" or "SlowDown" in it proves nothing (a connection error to port
41666 is not a 416). The one client that carries no status, obstore, has its message parsed
against the exact shape object_store prints (see `_obstore_failure`).
"""

from __future__ import annotations

import functools
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from zarr_anyio._core.fork import reset_in_child
from zarr_anyio._core.limit import adopt_copy, copy_in_process

__all__ = [
    "DEFAULT_DEADLINE",
    "NO_RETRY",
    "DeadlineExceeded",
    "Failure",
    "RateLimit",
    "Retry",
    "RetryBudget",
    "describe",
    "http_status",
    "is_transient",
    "parse_retry_after",
]

T = TypeVar("T")

DEFAULT_DEADLINE = 120.0
"""Seconds a request may keep being refused (throttled or failing) before it is given up on.

Throttles are retried for as long as this allows, never against the retry budget: a server that
paces us is not broken. Two minutes of refusals for one request is far beyond any pacing a
healthy server does (S3 scales a prefix up within minutes, and every throttled request here
waits at most ``Retry.max_delay`` between tries), and short enough that a server answering
nothing but 503 is reported rather than waited on forever."""


class DeadlineExceeded(TimeoutError):
    """A request the server kept refusing until the store's ``deadline`` passed.

    Raised from the server's last answer; ``elapsed`` is how long the request had been tried,
    ``throttled`` and ``failed`` how often the server asked it to slow down and how often it
    failed otherwise.
    """

    def __init__(self, elapsed: float, throttled: int, failed: int, deadline: float) -> None:
        self.elapsed = elapsed
        self.throttled = throttled
        self.failed = failed
        self.deadline = deadline
        if throttled + failed:
            told = (
                f"the server refused this request {throttled + failed} times over "
                f"{elapsed:.1f} s ({throttled} of them asking to slow down); no retry could "
                "start"
            )
        else:
            # Never sent: it waited its turn behind a window and pace that the server's
            # throttling of other requests had narrowed.
            told = (
                f"this request waited {elapsed:.1f} s for its turn (the store's window and pace, "
                "narrowed by the server's throttling) and could not be sent"
            )
        super().__init__(f"{told} within the store's deadline of {deadline:g} s (deadline=)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.elapsed, self.throttled, self.failed, self.deadline))


_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_THROTTLE_STATUS = frozenset({429, 503})
# S3 (and S3-like) error codes that mean "try again", and those that mean "slow down".
_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
    }
)
_TRANSIENT_CODES = _THROTTLE_CODES | {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}
# Connection failures of the HTTP clients our backends use, by module and class name, so that
# this module imports none of them (each is optional).
_CONNECTION_ERRORS = {
    "aiohttp": frozenset(
        {
            "ClientConnectionError",
            "ClientPayloadError",
            "ServerTimeoutError",
        }
    ),
    "botocore": frozenset(
        {
            "ConnectionError",
            "HTTPClientError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "ResponseStreamingError",
            "IncompleteReadError",
        }
    ),
    "urllib3": frozenset({"HTTPError"}),
    "http.client": frozenset({"IncompleteRead", "RemoteDisconnected"}),
}


@dataclass(frozen=True)
class Failure:
    """What a failed request structurally tells: its HTTP status, S3 error code, whether it
    never got an answer (connection trouble), and the server's ``Retry-After`` if it sent one."""

    status: int | None = None
    code: str | None = None
    connection: bool = False
    retry_after: float | None = None

    @property
    def transient(self) -> bool:
        if self.connection:
            return True
        if self.code is not None and self.code in _TRANSIENT_CODES:
            return True
        return self.status in _TRANSIENT_STATUS

    @property
    def throttled(self) -> bool:
        """The server asked us to slow down (429, 503, S3's ``SlowDown`` and kin)."""
        if self.code is not None and self.code in _THROTTLE_CODES:
            return True
        return self.status in _THROTTLE_STATUS


_PERMANENT = Failure()


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from: the explicit cause, else the implicit context."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def _is_connection_error(error: BaseException) -> bool:
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    for cls in type(error).__mro__:
        module = cls.__module__.partition(".")[0]
        module = "http.client" if cls.__module__ == "http.client" else module
        if cls.__name__ in _CONNECTION_ERRORS.get(module, ()):
            return True
    return False


def _botocore_failure(response: dict[str, Any]) -> Failure | None:
    metadata = response.get("ResponseMetadata")
    error = response.get("Error")
    if not isinstance(metadata, dict) and not isinstance(error, dict):
        return None
    status = metadata.get("HTTPStatusCode") if isinstance(metadata, dict) else None
    code = error.get("Code") if isinstance(error, dict) else None
    headers = metadata.get("HTTPHeaders") if isinstance(metadata, dict) else None
    retry_after = None
    if isinstance(headers, dict):
        retry_after = parse_retry_after(headers.get("retry-after"))
    return Failure(
        status=status if isinstance(status, int) else None,
        code=str(code) if code is not None else None,
        retry_after=retry_after,
    )


# obstore's exceptions carry no status: only a message, made by object_store's `Display`
# (0.12 appends "\n\nDebug source:\n" and the `Debug` form). A `GenericError` of a request
# reads, from its first character:
#   Generic <store> error: Error performing <METHOD> <uri> in <elapsed>
#   [, after <n> retries, max_retries: <m>, retry_timeout: <t> ] - <what failed>
# where <uri> is percent-encoded (no spaces) and <what failed> is "Server returned non-2xx
# status code: <status> <reason>: <body>", "Server returned error response: <body>" (a 200 whose
# body holds an S3 error) or "HTTP error: ..." (no answer: connect, send, timeout). Matched from
# the start only, so no URL, key or body can forge a status.
_OBSTORE_REQUEST = re.compile(
    r"Generic [A-Za-z0-9]+ error: Error performing [A-Z]+ \S+ in \S+"
    r"(?:, after \d+ retries, max_retries: \d+, retry_timeout: \S+ )? - "
    r"(?:Server returned non-2xx status code: (?P<status>[1-5]\d\d)\b"
    r"|(?P<response>Server returned error response: )"
    r"|(?P<http>HTTP error: ))"
)

# A body that broke off while being read (a dropped connection mid-answer; a body cut short of
# its Content-Length) comes later, from the stream, with no request in the message:
#   Generic <store> error: HTTP error: <reqwest's description>
_OBSTORE_BODY = re.compile(r"Generic [A-Za-z0-9]+ error: HTTP error: ")

# The stores without a server (memory, local files) answer a range that starts past the end
# with their own errors, read here as the 416 a server would send:
#   Generic InMemory error: Invalid range: Wanted range starting at <n>, but object was only
#   <m> bytes long
#   Generic LocalFileSystem error: Requested range was invalid
_OBSTORE_LOCAL_RANGE = re.compile(
    r"Generic (?:InMemory error: Invalid range: Wanted range starting at \d+, but object was"
    r" only \d+ bytes long|LocalFileSystem error: Requested range was invalid)(?:\n|\Z)"
)


def _obstore_failure(error: BaseException) -> Failure | None:
    cls = type(error)
    if not cls.__module__.startswith("obstore") or cls.__name__ != "GenericError":
        return None
    message = str(error)
    if _OBSTORE_LOCAL_RANGE.match(message):
        return Failure(status=416)
    if _OBSTORE_BODY.match(message):
        return Failure(connection=True)
    match = _OBSTORE_REQUEST.match(message)
    if match is None:
        return _PERMANENT
    if match["status"]:
        return Failure(status=int(match["status"]))
    # A 200 whose body is an S3 error: object_store makes these only of `InternalError` and
    # `SlowDown` bodies, both transient; treated as a 503.
    if match["response"]:
        return Failure(status=503)
    return Failure(connection=True)


def describe(error: BaseException) -> Failure:
    """What ``error`` structurally says about the failed request (`Failure`).

    Without a status or connection error anywhere in its chain, an error is permanent (a
    missing key, a refused permission, a bad request fail the same way again). A
    ``FileNotFoundError`` raised *from* a 503 (fsspec's http ``info`` does that) is a 503.
    """
    if isinstance(error, DeadlineExceeded):
        # Already retried for as long as the caller allows: no layer above retries it again.
        return _PERMANENT
    for current in _chain(error):
        obstore = _obstore_failure(current)
        if obstore is not None:
            return obstore
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            found = _botocore_failure(response)
            if found is not None:
                return found
        status = getattr(current, "status", None)
        if not isinstance(status, int) or isinstance(status, bool):
            status = getattr(current, "status_code", None)
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
            headers = getattr(current, "headers", None)
            retry_after = None
            if headers is not None and hasattr(headers, "get"):
                retry_after = parse_retry_after(headers.get("Retry-After"))
            return Failure(status=status, retry_after=retry_after)
        if _is_connection_error(current):
            return Failure(connection=True)
    return _PERMANENT


def http_status(error: BaseException) -> int | None:
    """The HTTP status of the answer that ``error`` reports, if the client says."""
    return describe(error).status


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` may succeed: throttling, a server error, a dropped connection.

    Never a missing key, a refused permission or a bad request: those fail the same way again.
    """
    return describe(error).transient


def parse_retry_after(value: object) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() too, and float() refuses it
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past any datetime
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Retry:
    """How a remote store retries a request that failed transiently (see `is_transient`).

    ``attempts`` counts the first try; it bounds the retries of failures (a 500, a dropped
    connection, a timeout), not those of throttles (429, 503 ``SlowDown``), which go on until
    the store's ``deadline``. ``attempts=1`` (`NO_RETRY`) retries nothing, throttles included.
    Waits grow exponentially from ``base_delay`` up to ``max_delay``, with full jitter (a random
    wait between 0 and the bound), so many clients throttled at once do not come back at once.
    A server's ``Retry-After`` (seconds or an HTTP date) lengthens the wait to what it asks, up
    to ``max_retry_after`` seconds. Permanent errors are raised at once.
    """

    attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 2.0
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        delays = (self.base_delay, self.max_delay, self.max_retry_after)
        # ``not d >= 0`` also refuses NaN, which would silently turn a bound off.
        if any(not delay >= 0 for delay in delays):
            raise ValueError(f"delays must be numbers of seconds, not negative, got {delays}")

    def delay(
        self, retry_number: int, retry_after: float | None = None, *, most: float | None = None
    ) -> float:
        """How long to wait before retry number ``retry_number`` (0 for the first); throttles
        count their own retries (the n-th throttle of a request waits as the n-th retry).
        ``most`` lowers ``max_delay`` for this wait (not a ``Retry-After``)."""
        bound = self.max_delay if most is None else min(self.max_delay, most)
        # Capped exponent: a request throttled a thousand times must not overflow a float.
        wait = random.uniform(0, min(bound, self.base_delay * 2 ** min(retry_number, 64)))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


NO_RETRY = Retry(attempts=1)


class RetryBudget:
    """A token bucket that retries draw on, so that a failing server is not sent a retry storm.

    The AWS SDKs' retry quota: it holds ``capacity`` tokens; a retry takes ``retry_cost`` (a
    retry after a timeout ``timeout_cost``: a server that stopped answering is the costliest to
    keep trying); an answered request puts one back, or, if it had been retried, the cost of its
    last retry. With the defaults, 100 retries in a row empty it; while it is empty no request is
    retried and failures surface at once; every answer refills it. Shareable between stores
    (``retry_budget=``); works across event loops and threads.
    """

    def __init__(self, capacity: int = 500, retry_cost: int = 5, timeout_cost: int = 10) -> None:
        if capacity < 0 or retry_cost < 0 or timeout_cost < 0:
            raise ValueError("capacity and costs must not be negative")
        self.capacity = capacity
        self.retry_cost = retry_cost
        self.timeout_cost = timeout_cost
        self._available = float(capacity)
        self._lock = threading.Lock()
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it as it forked

    @property
    def available(self) -> float:
        return self._available

    def take(self, *, timed_out: bool = False) -> int | None:
        """Take the cost of one retry; ``None`` (and nothing taken) if the budget is spent."""
        cost = self.timeout_cost if timed_out else self.retry_cost
        with self._lock:
            if cost > self._available:
                return None
            self._available -= cost
        return cost

    def refund(self, last_cost: int | None) -> None:
        """An answered request: give back its last retry's cost, or one token."""
        with self._lock:
            self._available = min(
                float(self.capacity), self._available + (last_cost if last_cost else 1)
            )

    def __getstate__(self) -> dict[str, Any]:
        return {"args": (self.capacity, self.retry_cost, self.timeout_cost)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"RetryBudget(capacity={self.capacity}, available={self._available:g})"


class RateLimit:
    """At most ``per_second`` requests a second, with bursts of up to ``burst``: a token bucket.

    Shared like a limiter: pass one object to several stores to put them on one rate. It works
    across event loops and threads (it keeps its own monotonic clock and waits with
    ``anyio.sleep``), so a store can be used from zarr's loop thread and a trio program at once.
    """

    def __init__(self, per_second: float, burst: int = 1) -> None:
        if not per_second > 0:  # NaN too: it would silently disable the limit
            raise ValueError(f"per_second must be positive, got {per_second}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.per_second = float(per_second)
        self.burst = burst
        self._interval = 1.0 / self.per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()
        # Who this is, for its copies in other processes (see _limit.copy_in_process).
        self._origin = os.getpid()
        self._token = uuid.uuid4().hex
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by a thread the child does not have; the schedule of
        # requests is the parent's, kept (the server sees both processes' requests).
        self._lock = threading.Lock()
        adopt_copy(self)  # one pickled in the parent and unpickled here is this one

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

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy starts afresh with the same rate; copies in one other process are one object
        # there (a dask worker's tasks share the worker's rate).
        make = functools.partial(RateLimit, self.per_second, self.burst)
        return (copy_in_process, (self._origin, self._token, make))

    def __repr__(self) -> str:
        return f"RateLimit(per_second={self.per_second}, burst={self.burst})"
