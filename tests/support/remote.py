"""Remote stores over the loopback HTTP server (`servers.HTTPServer`), through both backends."""

from __future__ import annotations

from typing import Any

from zarr_anyio import FsspecStore, ObjectStore, RemoteStore

from .servers import HTTPServer

__all__ = ["KINDS", "fill", "http_store"]


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
