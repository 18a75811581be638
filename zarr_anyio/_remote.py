"""The base of the stores that talk to a server (`FsspecStore`, `ObjectStore`).

Every request holds a token of the store's limit, waits its turn under the rate limit, and is
retried when it failed transiently (`_retry`); a bulk call raises its first failure as itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from ._base import AnyioStore
from ._bridge import run_blocking
from ._limit import LimiterLike
from ._retry import RateLimit, Retry, call_with_retries

__all__ = ["RemoteStore"]

T = TypeVar("T")


class RemoteStore(AnyioStore):
    """A store that talks to a server: every request holds a token, waits its turn under the
    rate limit, and is retried on transient failures (see `Retry`).

    Parameters (beyond `AnyioStore`'s)
    ----------
    retry
        A `Retry`, or an int (the number of attempts), or ``None`` for the default
        (``Retry()``: 4 attempts). ``NO_RETRY`` turns this layer off.
    rate_limit
        A `RateLimit` (shareable between stores), or requests per second, or ``None``.
    """

    def __init__(
        self,
        *,
        read_only: bool = False,
        max_concurrency: int | None = None,
        limiter: LimiterLike | None = None,
        retry: Retry | int | None = None,
        rate_limit: RateLimit | float | None = None,
    ) -> None:
        super().__init__(read_only=read_only, max_concurrency=max_concurrency, limiter=limiter)
        if retry is None:
            retry = Retry()
        elif isinstance(retry, int) and not isinstance(retry, bool):
            retry = Retry(attempts=retry)
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry, an int or None, got {retry!r}")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            rate_limit = RateLimit(rate_limit)
        self.retry = retry
        self.rate_limit = rate_limit

    def _store_kwargs(self) -> dict[str, Any]:
        return {**super()._store_kwargs(), "retry": self.retry, "rate_limit": self.rate_limit}

    async def _request(self, make: Callable[[], Awaitable[T]]) -> T:
        """One request to the server: a token, the rate limit, and retries."""
        async with self._limit.current():
            return await call_with_retries(make, self.retry, self.rate_limit)

    # ------------------------------------------------------------ zarr >= 3.4's sync surface
    # Offered (blocking calls made through the bridge's loop), but zarr is told not to take its
    # sync path here: that path makes one call at a time, which for a server means one request
    # at a time instead of ``max_concurrency``.
    _supports_sync_io = False

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        return run_blocking(lambda: self.get(key, prototype, byte_range))

    def set_sync(self, key: str, value: Buffer) -> None:
        run_blocking(lambda: self.set(key, value))

    def delete_sync(self, key: str) -> None:
        run_blocking(lambda: self.delete(key))
