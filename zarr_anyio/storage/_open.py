"""``open_store``: a store from whatever a user has in hand, with zarr's own modes.

It mirrors ``zarr.storage.make_store_path`` (``make_store``, then ``StorePath.open``), so a user
moving from ``zarr.open_group(store=…, mode=…)`` gets the same store and the same checks:

========  ==========================================================================
mode      what happens
========  ==========================================================================
``None``  read-write for a store made here; a store passed in is returned as it is
``"r"``   read-only (a writable store passed in is replaced by ``with_read_only()``);
          a folder or zip file must exist
``"r+"``  read-write; a folder or zip file must exist
``"a"``   read-write, created if missing
``"w"``   read-write, and everything in the store is deleted first
``"w-"``  read-write; ``FileExistsError`` if the store holds anything (``"x"``: the same)
========  ==========================================================================

A writable mode on a read-only store raises zarr's ``ValueError``. What zarr_anyio adds to
zarr's rules: a path ending in ``.zip`` is a `ZipStore` (zarr only makes folders), a malformed
URL (``s3:/bucket``) or an unknown scheme is a ``ValueError`` instead of a folder of that name,
and ``str()`` of every store opens the same store again — ``memory://…`` and ``object_store://…``
through the registry of live stores (`._live`), since their names alone cannot reach their data.

A ``zarr.storage`` store is converted to its zarr_anyio namesake over the same data (the same
dict, folder, filesystem or obstore client), not passed through: ``open_store`` promises a store
that trio can await and that bounds its I/O, and zarr's stores are neither. A writable
``zarr.storage.ZipStore`` that is open is refused (two writers would corrupt the file).
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal

import zarr.storage
from zarr.abc.store import Store
from zarr.core.buffer import Buffer

from zarr_anyio._core.bridge import run_blocking
from zarr_anyio._core.extras import require_for_url

from . import _live
from ._base import AnyioStore
from ._client_retries import obstore_options_without_retries
from ._fsspec import FsspecStore
from ._local import LocalStore
from ._localfs import check_root
from ._memory import MemoryStore
from ._obstore import ObjectStore
from ._redact import scrub
from ._remote import check_http_root
from ._zip import ZipStore

__all__ = ["AccessMode", "make_store", "open_store", "open_store_async"]

AccessMode = Literal["r", "r+", "a", "w", "w-", "x"]
MODES = (None, "r", "r+", "a", "w", "w-", "x")
StoreLike = AnyioStore | Store | MutableMapping[str, Buffer] | str | Path | None

# URLs of servers (the command line treats them as remote; open_store takes every fsspec URL).
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https")
# Schemes obstore's from_url takes (open_store(..., backend="obstore")).
OBSTORE_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https")
# A URL's scheme, as RFC 3986 spells it; two letters at least, so "C:" stays a drive.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):(.*)", re.DOTALL)
# str() of an obstore store: S3Store(bucket="b", prefix="p"), HTTPStore("https://…"), …
_OBSTORE_REPR = re.compile(r"(\w+)\((.*)\)", re.DOTALL)
_OBSTORE_ARG = re.compile(r'(?:(\w+)=)?"((?:[^"\\]|\\.)*)"')


def open_store(
    store_like: StoreLike = None,
    *,
    mode: AccessMode | None = None,
    storage_options: dict[str, Any] | None = None,
    backend: Literal["fsspec", "obstore"] = "fsspec",
    **store_kwargs: Any,
) -> AnyioStore:
    """A zarr_anyio store for ``store_like``, opened in ``mode`` as zarr opens one.

    ``store_like`` is

    * ``None``: a new `MemoryStore`; a dict (any mutable mapping): a `MemoryStore` over it;
    * a zarr_anyio store: itself (or its read-only copy for ``mode="r"``); a ``zarr.storage``
      store: its zarr_anyio namesake over the same data;
    * ``str(store)`` of any zarr_anyio store: that store's data again (``memory://…``,
      ``file://…``, ``zip://…``, ``object_store://…``, ``s3://…``);
    * ``"s3://…"``, ``"gs://…"``, ``"az://…"``, ``"http(s)://…"`` and every other fsspec URL
      (chained ones too): an `FsspecStore`, or with ``backend="obstore"`` an `ObjectStore`
      (``storage_options`` go to the client);
    * a path (or ``file://`` URL) ending in ``.zip`` that is not a folder: a `ZipStore`; any
      other path: a `LocalStore`.

    ``mode`` is zarr's (see the module docs): ``None`` and ``"a"`` read-write, ``"r"``
    read-only, ``"r+"`` must exist, ``"w"`` deletes what is there, ``"w-"`` (or ``"x"``)
    refuses a store that holds anything. ``store_kwargs`` (``max_concurrency=``, ``limiter=``,
    ``retry=``, …) go to the store made.

    This call blocks while it opens the store (and clears it for ``"w"``); from an event loop,
    ``await open_store_async(…)`` does the same without blocking it.
    """
    return run_blocking(
        lambda: open_store_async(
            store_like,
            mode=mode,
            storage_options=storage_options,
            backend=backend,
            **store_kwargs,
        )
    )


async def open_store_async(
    store_like: StoreLike = None,
    *,
    mode: AccessMode | None = None,
    storage_options: dict[str, Any] | None = None,
    backend: Literal["fsspec", "obstore"] = "fsspec",
    **store_kwargs: Any,
) -> AnyioStore:
    """`open_store` for a caller on an event loop (asyncio or trio): the same store, opened
    without blocking the loop."""
    mode = _mode_with_read_only(mode, store_kwargs)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in ("fsspec", "obstore"):
        raise ValueError(f"backend must be 'fsspec' or 'obstore', got {backend!r}")
    zarr_mode = "w-" if mode == "x" else mode
    if storage_options is not None and not isinstance(store_like, str):
        raise TypeError(
            "'storage_options' was provided but unused: it only applies to a URL "
            f"(got {type(store_like).__name__})"
        )
    given = isinstance(store_like, Store)
    if given and store_kwargs:
        raise TypeError(
            f"store keywords {sorted(store_kwargs)} apply only to a store that open_store "
            f"makes, not to the store passed in ({store_like!r})"
        )
    store = _make_store(store_like, zarr_mode, storage_options, backend, store_kwargs, lazy=False)
    # Made here, not open yet; not the caller's store, nor a zip writer the URL named.
    made = store is not store_like and not store._is_open
    try:
        return await _apply_mode(store, zarr_mode)
    except BaseException:
        if made:
            # A store made here for a mode that then failed (w- on data): let go of its file.
            await store.aclose()
        raise


# ---------------------------------------------------------------------- making the store


def make_store(
    store_like: StoreLike,
    *,
    mode: AccessMode | None = None,
    storage_options: dict[str, Any] | None = None,
    backend: Literal["fsspec", "obstore"] = "fsspec",
    **store_kwargs: Any,
) -> AnyioStore:
    """The store `open_store` would give, made but not opened: no I/O, so no mode's check
    (the command line opens its stores itself, to say which of them does not exist)."""
    mode = _mode_with_read_only(mode, store_kwargs)
    zarr_mode = "w-" if mode == "x" else mode
    return _make_store(store_like, zarr_mode, storage_options, backend, store_kwargs, lazy=True)


def _mode_with_read_only(mode: AccessMode | None, store_kwargs: dict[str, Any]) -> Any:
    """``mode``, with a ``read_only=`` keyword (every store's constructor takes one) read as
    the mode it means instead of reaching the constructor beside the mode's own."""
    if "read_only" not in store_kwargs:
        return mode
    read_only = store_kwargs.pop("read_only")
    if not isinstance(read_only, bool):
        raise TypeError(f"read_only must be a bool, got {type(read_only).__name__}")
    if read_only and mode in (None, "r"):
        return "r"
    if not read_only and mode != "r":
        return mode
    raise ValueError(
        f"read_only={read_only} contradicts mode={mode!r}: pass one of them "
        "(mode='r' opens read-only)"
    )


def _make_store(
    store_like: StoreLike,
    mode: str | None,
    storage_options: dict[str, Any] | None,
    backend: str,
    kwargs: dict[str, Any],
    *,
    lazy: bool,
) -> AnyioStore:
    read_only = mode == "r"
    if store_like is None:
        return MemoryStore(read_only=read_only, **kwargs)
    if isinstance(store_like, AnyioStore):
        return store_like
    if isinstance(store_like, Store):
        return _from_zarr_store(store_like)
    if _is_fsmap(store_like):
        return FsspecStore.from_mapper(store_like, read_only=read_only, **kwargs)
    if isinstance(store_like, MutableMapping):
        return MemoryStore(store_like, read_only=read_only, **kwargs)
    if isinstance(store_like, Path):
        return _from_path(store_like, mode, kwargs, lazy)
    if not isinstance(store_like, str):
        raise TypeError(f"cannot make a store from {type(store_like).__name__}: {store_like!r}")
    try:
        return _from_string(store_like, mode, storage_options, backend, kwargs, lazy)
    except Exception as error:
        scrub(error)  # the messages name the URL, which may hold a password
        raise


def _is_fsmap(value: object) -> bool:
    try:
        from fsspec.mapping import FSMap
    except ImportError:  # pragma: no cover - fsspec is a dependency of the remote extras
        return False
    return isinstance(value, FSMap)


def _from_string(
    url: str,
    mode: str | None,
    storage_options: dict[str, Any] | None,
    backend: str,
    kwargs: dict[str, Any],
    lazy: bool,
) -> AnyioStore:
    read_only = mode == "r"
    live = _live.find(url)
    if live is not None and storage_options is None:
        return _same_data(live, mode, kwargs)
    if "::" in url:
        # A chained fsspec URL (simplecache::s3://…): fsspec's to resolve, as zarr does.
        require_for_url(url, url.partition("://")[0].rpartition("::")[2])
        return FsspecStore.from_url(
            url, storage_options=storage_options, read_only=read_only, **kwargs
        )
    scheme, separator, rest = url.partition("://")
    if not separator:
        malformed = _SCHEME.fullmatch(url)
        if malformed and not os.path.exists(url):
            name, after = malformed.groups()
            raise ValueError(
                f"{url!r} looks like a URL, but its scheme {name!r} is not followed by '://' "
                f"(did you mean '{name}://{after.lstrip('/')}'?). For a local path that "
                "holds a colon, pass a pathlib.Path."
            )
        if storage_options is not None:
            raise TypeError(f"'storage_options' was provided but unused: {url!r} is a path")
        return _from_path(Path(url), mode, kwargs, lazy)
    scheme = scheme.lower()
    if scheme in ("file", "zip", "memory") and storage_options is not None:
        raise TypeError(f"'storage_options' was provided but unused for {url!r}")
    if scheme == "file":
        return _from_path(Path(rest), mode, kwargs, lazy)
    if scheme == "zip":
        return _zip_store(Path(rest), mode, kwargs)
    if scheme == "memory":
        return _memory_store(url, rest, mode, kwargs)
    if scheme == "object_store":
        return _object_store_from_str(url, rest, read_only, storage_options, kwargs)
    if backend == "obstore":
        if scheme not in OBSTORE_SCHEMES:
            raise ValueError(
                f"no zarr_anyio store for the scheme {scheme!r} of {url!r} with "
                f"backend='obstore' (it takes {', '.join(OBSTORE_SCHEMES)})"
            )
        require_for_url(url, scheme, backend="obstore")
        check_http_root(url)
        from obstore.store import from_url

        # The client's own retries off: the store retries, and its window sees every throttle.
        client = from_url(url, **obstore_options_without_retries(storage_options))
        return ObjectStore(client, read_only=read_only, **kwargs)
    # Before asking fsspec: without it (or the package a scheme needs) the URL is not unknown,
    # just missing its extra, and the error should say which.
    require_for_url(url, scheme)
    protocols = _fsspec_protocols()
    if scheme not in protocols:
        fsspecs = (
            "nor one that fsspec knows (s3, gs, az, http, https, …)"
            if protocols
            else "and fsspec, which knows others, is not installed"
        )
        raise ValueError(
            f"no zarr_anyio store for the scheme {scheme!r} of {url!r}: it is neither ours "
            f"(file, zip, memory, object_store) {fsspecs}"
        )
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only, **kwargs)


def _fsspec_protocols() -> set[str]:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency of the remote extras
        return set()
    return set(fsspec.available_protocols())


def _from_path(path: Path, mode: str | None, kwargs: dict[str, Any], lazy: bool) -> AnyioStore:
    if path.suffix == ".zip" and not path.is_dir():
        return _zip_store(path, mode, kwargs)
    # As zarr's LocalStore.open: "r" and "r+" need the folder, the others create it.
    must_exist = mode in ("r", "r+") and not lazy
    if must_exist:
        check_root(path)
    return LocalStore(path, read_only=mode == "r", **kwargs)


def _zip_store(path: Path, mode: str | None, kwargs: dict[str, Any]) -> AnyioStore:
    live = _live.find(f"zip://{path}")
    if isinstance(live, ZipStore) and live._open_for_writing():
        # This process already writes the file: a second writer would corrupt it.
        return _same_data(live, mode, kwargs)
    if mode == "r":
        return ZipStore(path, mode="r", **kwargs)
    if mode == "r+" and not path.exists():
        raise FileNotFoundError(
            f"{path}: no such zip file (mode 'r+' opens an existing one; 'a' creates it)"
        )
    # "w" truncates the file as it opens: the same as zarr's clearing, without reading it.
    return ZipStore(path, mode="w" if mode == "w" else "a", **kwargs)


def _memory_store(url: str, name: str, mode: str | None, kwargs: dict[str, Any]) -> AnyioStore:
    if name.isdigit():
        raise FileNotFoundError(
            f"{url} names no MemoryStore alive in this process: str() of a MemoryStore (the "
            "id of its dict) reaches its data only in the process that made it, while a store "
            "over that dict lives. Pass the store itself, or use a LocalStore to share data "
            "between processes."
        )
    if mode in ("r", "r+"):
        raise FileNotFoundError(
            f"{url}: no MemoryStore of that name is alive in this process (mode {mode!r} "
            "opens an existing store; 'a' or 'w' makes a new one)"
        )
    store = MemoryStore(read_only=False, **kwargs)
    if name:
        # A named store: open_store(url) reaches it again while it lives.
        _live.remember(url, store)
    return store


def _object_store_from_str(
    url: str,
    described: str,
    read_only: bool,
    storage_options: dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> AnyioStore:
    """An ObjectStore from ``str()`` of one that is no longer alive: rebuilt from the obstore
    store's description (its kind, bucket and prefix; credentials and endpoints come from
    ``storage_options`` or the environment, as for any URL)."""
    parsed = _OBSTORE_REPR.fullmatch(described.strip())
    if parsed is None:
        raise ValueError(
            f"{url!r} names no ObjectStore alive in this process, and it cannot be rebuilt "
            "from that name (obstore's MemoryStore lives only in the process that made it; "
            "S3Store(bucket=…), GCSStore, AzureStore, HTTPStore and LocalStore can be)"
        )
    kind, inner = parsed.groups()
    positional = [value for name, value in _OBSTORE_ARG.findall(inner) if not name]
    named = {name: value for name, value in _OBSTORE_ARG.findall(inner) if name}
    options = obstore_options_without_retries(storage_options)
    prefix = named.get("prefix", "")
    from obstore.store import LocalStore as ObstoreLocal
    from obstore.store import from_url

    if kind == "LocalStore" and positional:
        return ObjectStore(ObstoreLocal(positional[0]), read_only=read_only, **kwargs)
    if kind == "HTTPStore" and positional:
        location = positional[0]
    elif kind == "S3Store" and "bucket" in named:
        location = f"s3://{named['bucket']}/{prefix}"
    elif kind == "GCSStore" and "bucket" in named:
        location = f"gs://{named['bucket']}/{prefix}"
    elif kind == "AzureStore" and "container_name" in named:
        if "account_name" in named:
            options.setdefault("account_name", named["account_name"])
        location = f"az://{named['container_name']}/{prefix}"
    else:
        raise ValueError(
            f"{url!r} names no ObjectStore alive in this process, and a {kind} cannot be "
            "rebuilt from its name (an obstore MemoryStore lives only in its process)"
        )
    return ObjectStore(from_url(location, **options), read_only=read_only, **kwargs)


def _same_data(live: AnyioStore, mode: str | None, kwargs: dict[str, Any]) -> AnyioStore:
    """A store over the data of ``live`` (a store alive in this process that the URL named)."""
    return live._over_same_data(mode == "r", kwargs)


def _from_zarr_store(store: Store) -> AnyioStore:
    """The zarr_anyio namesake of one of zarr's own stores, over the same data."""
    read_only = store.read_only
    if isinstance(store, zarr.storage.MemoryStore):
        return MemoryStore(store._store_dict, read_only=read_only)
    if isinstance(store, zarr.storage.LocalStore):
        return LocalStore(store.root, read_only=read_only)
    if isinstance(store, zarr.storage.ZipStore):
        path = getattr(store, "path", None)
        if not isinstance(path, Path):
            raise TypeError(f"{store!r} reads a file object, not a path: open it by its path")
        if store._is_open and not read_only:
            raise ValueError(
                f"{store!r} is open for writing: zarr's ZipStore writes the zip's directory "
                "when it closes, and a second writer would corrupt the file. Close it first "
                f"(store.close()), then open_store({str(path)!r})."
            )
        return ZipStore(path, mode="r" if read_only else "a", read_only=read_only)
    if isinstance(store, zarr.storage.FsspecStore):
        return FsspecStore(
            store.fs,
            read_only=read_only,
            path=store.path,
            allowed_exceptions=store.allowed_exceptions,
        )
    obstore_class = getattr(zarr.storage, "ObjectStore", None)
    if obstore_class is not None and isinstance(store, obstore_class):
        return ObjectStore(store.store, read_only=read_only)
    raise TypeError(
        f"open_store makes zarr_anyio stores, and {type(store).__module__}."
        f"{type(store).__qualname__} is not one of zarr.storage's (MemoryStore, LocalStore, "
        "ZipStore, FsspecStore, ObjectStore) that it can convert: use it with zarr directly, "
        "or write a zarr_anyio store for its backend (see 'Custom stores' in the docs)."
    )


# ---------------------------------------------------------------------- the mode


async def _apply_mode(store: AnyioStore, mode: str | None) -> AnyioStore:
    """``StorePath.open``'s rules, for the whole store."""
    if mode is None:
        await store._ensure_open()
        return store
    if store.read_only and mode != "r":
        raise ValueError(
            f"Store is read-only but mode is {mode!r}. Create a writable store or use 'r' "
            f"mode. ({store!r} was made read-only.)"
        )
    if mode == "r" and not store.read_only:
        copy = store.with_read_only(True)
        assert isinstance(copy, AnyioStore)
        store = copy
    await store._ensure_open()
    if mode == "w-" and not await store.is_empty(""):
        raise FileExistsError(
            f"{store} already holds data, and mode 'w-' only creates: use mode 'w' to "
            "replace what is there, or 'a' to add to it"
        )
    if mode == "w":
        await store.clear()
    return store
