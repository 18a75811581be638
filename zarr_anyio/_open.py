"""``open_store``: a store from whatever a user has in hand, as zarr's implicit store creation."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal

from zarr.core.buffer import Buffer

from ._base import AnyioStore
from .fsspec import FsspecStore
from .local import LocalStore
from .memory import MemoryStore
from .object import ObjectStore
from .zip import ZipStore

__all__ = ["open_store"]

AccessMode = Literal["r", "r+", "a", "w", "w-"]
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https")
_ZIP_MODES: dict[str, Literal["r", "w", "a", "x"]] = {
    "r": "r",
    "r+": "a",
    "a": "a",
    "w": "w",
    "w-": "x",
}


def open_store(
    store_like: AnyioStore | MutableMapping[str, Buffer] | str | Path,
    *,
    mode: AccessMode = "r",
    storage_options: dict[str, Any] | None = None,
    backend: Literal["fsspec", "obstore"] = "fsspec",
    **store_kwargs: Any,
) -> AnyioStore:
    """A zarr_anyio store for ``store_like``, read-only when ``mode == "r"``.

    * a zarr_anyio store: itself;
    * a dict (any mutable mapping): a `MemoryStore` over it; ``"memory://…"``: a new one;
    * ``"s3://…"``, ``"gs://…"``, ``"az://…"``, ``"http(s)://…"``: an `FsspecStore`, or with
      ``backend="obstore"`` an `ObjectStore` (``storage_options`` go to the client);
    * a path or ``"file://…"`` ending in ``.zip``: a `ZipStore`; any other path: a `LocalStore`.

    ``store_kwargs`` (``max_concurrency=``, ``limiter=``, ``retry=``, …) go to the store.
    """
    if mode not in _ZIP_MODES:
        raise ValueError(f"mode must be one of {sorted(_ZIP_MODES)}, got {mode!r}")
    read_only = mode == "r"
    if isinstance(store_like, AnyioStore):
        return store_like
    if isinstance(store_like, MutableMapping):
        return MemoryStore(store_like, read_only=read_only, **store_kwargs)
    if isinstance(store_like, Path):
        store_like = str(store_like)
    if not isinstance(store_like, str):
        raise TypeError(f"cannot make a store from {type(store_like).__name__}: {store_like!r}")
    scheme, separator, rest = store_like.partition("://")
    if not separator:
        scheme, rest = "", store_like
    if scheme == "memory":
        return MemoryStore(read_only=read_only, **store_kwargs)
    if scheme in REMOTE_SCHEMES:
        if backend == "obstore":
            from obstore.store import from_url

            client = from_url(store_like, **(storage_options or {}))
            return ObjectStore(client, read_only=read_only, **store_kwargs)
        return FsspecStore.from_url(
            store_like, storage_options=storage_options, read_only=read_only, **store_kwargs
        )
    if scheme not in ("", "file"):
        raise ValueError(f"no zarr_anyio store for the scheme {scheme!r} of {store_like!r}")
    if rest.endswith(".zip"):
        return ZipStore(rest, mode=_ZIP_MODES[mode], read_only=read_only, **store_kwargs)
    return LocalStore(rest, read_only=read_only, **store_kwargs)
