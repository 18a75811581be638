"""Connection pools at least as wide as the store's window, in the clients we make.

A client's connection pool is a second bound beneath the store's: botocore's holds 10
connections, so an s3fs store ran at most 10 requests at once whatever ``max_concurrency`` said,
and aiohttp's holds 100, below the adaptive window's default ceiling of 128. A client that
`FsspecStore.from_url` (and so `open_store`) makes gets a pool as wide as the store may ever
have requests in flight, and at least 1,024 (a store reopened over the same client may have a
wider window); a pool is a most, not a start, so a wider one costs nothing. A pool
the caller sized, and a client the caller made, are left as they are. (obstore's client has no
such bound.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

from zarr_anyio._core.adaptive import DEFAULT_CEILING

__all__ = ["fsspec_options_with_pool", "pool_size"]

POOL_AT_LEAST = 1024
"""The least pool we give: `open_store(str(store), max_concurrency=…)` reopens a live store over
the same client, so its pool must not hold a second store with a wider window either."""


def pool_size(store_options: dict[str, Any]) -> int:
    """The most requests in flight a store made with ``store_options`` may ever have."""
    sizes = [DEFAULT_CEILING, POOL_AT_LEAST]
    max_concurrency = store_options.get("max_concurrency")
    if isinstance(max_concurrency, int) and not isinstance(max_concurrency, bool):
        sizes.append(max_concurrency)
    limiter = store_options.get("limiter")
    bound = getattr(limiter, "ceiling", getattr(limiter, "total_tokens", None))
    if isinstance(bound, int | float) and math.isfinite(bound):
        sizes.append(int(bound))
    return max(sizes)


async def http_client_with_pool(size: int, **client_kwargs: Any) -> Any:
    """fsspec's ``get_client`` for its HTTP filesystem, with a pool of ``size`` connections
    (called on the filesystem's loop, where aiohttp wants its connector made)."""
    import aiohttp

    client_kwargs.setdefault("connector", aiohttp.TCPConnector(limit=size))
    return aiohttp.ClientSession(**client_kwargs)


def fsspec_options_with_pool(protocol: str, options: dict[str, Any], size: int) -> dict[str, Any]:
    """``storage_options`` for fsspec's ``url_to_fs`` with a pool of ``size`` connections for
    S3 (botocore's ``max_pool_connections``) and HTTP (aiohttp's connector), unless set."""
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", size)
        return {**options, "config_kwargs": config}
    if protocol in ("http", "https"):
        client_kwargs = options.get("client_kwargs") or {}
        if "get_client" in options or "connector" in client_kwargs:
            return options
        return {**options, "get_client": functools.partial(http_client_with_pool, size)}
    return options
