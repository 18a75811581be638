"""Remote stores over the loopback HTTP server (`servers.HTTPServer`), through both backends."""

from __future__ import annotations

from typing import Any

from zarr.core.buffer import default_buffer_prototype

from zarr_anyio import FsspecStore, ObjectStore, RemoteStore, Retry

from .servers import HTTPServer

__all__ = ["KINDS", "QUICK", "fill", "http_store", "read_all"]


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


QUICK = Retry(attempts=10, base_delay=0.002, max_delay=0.05)
"""Retries that wait milliseconds, for tests that provoke many."""


async def read_all(store: RemoteStore, objects: dict[str, bytes]) -> None:
    """Read every object in one bulk call and check each value."""
    prototype = default_buffer_prototype()
    results = await store.get_partial_values(prototype, [(key, None) for key in objects])
    assert [r.to_bytes() if r is not None else None for r in results] == list(objects.values())
