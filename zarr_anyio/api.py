"""zarr's async API (``zarr.api.asynchronous``), usable from asyncio and trio.

    import zarr_anyio.api as za

    arr = await za.create_array("data/a.zarr", shape=(100,), chunks=(10,), dtype="i4")
    await arr.setitem(slice(None), range(100))
    group = await za.open_group("s3://bucket/tree.zarr", mode="r")

Each function has the name and the parameters of its ``zarr.api.asynchronous`` namesake and calls
it, with two differences: ``store=`` takes anything `zarr_anyio.open_store` takes (a zarr_anyio
store, a path, a ``.zip`` path, a URL, a dict; ``None`` is a new `MemoryStore`), made with the
call's ``mode`` and ``storage_options``; and arrays and groups come back as `AsyncArray` and
`AsyncGroup`, whose coroutines run under asyncio on the caller's loop and under trio on the
bridge's loop (see `zarr_anyio.arrays._nodes`). A zarr store or ``StorePath`` is passed on as it is.

The functions are made from zarr's, not written out, so their parameters are zarr's own
(``help()`` shows them), and a node function zarr adds later is here too (module ``__getattr__``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import zarr.api.asynchronous
from zarr.abc.store import Store
from zarr.storage import StorePath

from .arrays._nodes import AsyncArray, AsyncGroup, NodeIterator, adopt, unwrap
from .arrays._run import concurrency_floor
from .storage import MemoryStore, open_store

__all__ = [
    "array",
    "consolidate_metadata",
    "create",
    "create_array",
    "create_group",
    "create_hierarchy",
    "empty",
    "empty_like",
    "from_array",
    "full",
    "full_like",
    "group",
    "load",
    "ones",
    "ones_like",
    "open",
    "open_array",
    "open_consolidated",
    "open_group",
    "open_like",
    "save",
    "save_array",
    "save_group",
    "tree",
    "zeros",
    "zeros_like",
]

# zarr declares these but does not implement them.
_NOT_IMPLEMENTED = frozenset({"copy", "copy_all", "copy_store"})


def _resolve(store: Any, mode: Any, storage_options: Any) -> tuple[Any, bool]:
    """The store to give zarr, and whether ``storage_options`` went into making it."""
    if store is None:
        return MemoryStore(), False
    if isinstance(store, Store | StorePath):
        return store, False
    if isinstance(store, str | Path | MutableMapping):
        return open_store(store, mode=mode or "a", storage_options=storage_options), True
    return store, False  # zarr's own rules (and errors) for anything else


def _with_store(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], int]:
    """``args`` and ``kwargs`` with ``store=`` made into a store, wherever the call passes it,
    and the call's concurrency floor (`concurrency_floor`)."""
    bound = signature.bind_partial(*args, **kwargs)
    parameters = signature.parameters
    named = parameters.get("store")
    extra = next((p.name for p in parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if named is not None and named.kind is not named.VAR_KEYWORD:
        place = bound.arguments
        if "store" not in place and named.default is named.empty:
            return args, kwargs, 0  # a required store left out: zarr says so
    elif extra is not None:
        # zarr.api.asynchronous.zeros(shape, **kwargs) and friends pass store= on to create().
        place = bound.arguments.setdefault(extra, {})
    else:
        return args, kwargs, 0
    everything = {**bound.arguments, **bound.arguments.get(extra or "", {})}
    store, used_options = _resolve(
        place.get("store"), everything.get("mode"), everything.get("storage_options")
    )
    place["store"] = store
    if used_options:
        for where in (bound.arguments, bound.arguments.get(extra or "", {})):
            where.pop("storage_options", None)
    return bound.args, bound.kwargs, concurrency_floor(store)


def _from_zarr(name: str) -> Callable[..., Any]:
    """zarr's ``zarr.api.asynchronous.<name>``, taking our stores and nodes, giving our nodes."""
    target = getattr(zarr.api.asynchronous, name)
    signature = inspect.signature(target)

    @functools.wraps(target)
    def call(*args: Any, **kwargs: Any) -> Any:
        args, kwargs, floor = _with_store(signature, args, kwargs)
        args = tuple(unwrap(arg) for arg in args)
        kwargs = {key: unwrap(value) for key, value in kwargs.items()}
        return adopt(target(*args, **kwargs), floor=floor)

    call.__module__ = __name__
    return call


Node = AsyncArray | AsyncGroup

array: Callable[..., Awaitable[AsyncArray]] = _from_zarr("array")
consolidate_metadata: Callable[..., Awaitable[AsyncGroup]] = _from_zarr("consolidate_metadata")
create: Callable[..., Awaitable[AsyncArray]] = _from_zarr("create")
create_array: Callable[..., Awaitable[AsyncArray]] = _from_zarr("create_array")
create_group: Callable[..., Awaitable[AsyncGroup]] = _from_zarr("create_group")
create_hierarchy: Callable[..., NodeIterator[tuple[str, Node]]] = _from_zarr("create_hierarchy")
empty: Callable[..., Awaitable[AsyncArray]] = _from_zarr("empty")
empty_like: Callable[..., Awaitable[AsyncArray]] = _from_zarr("empty_like")
from_array: Callable[..., Awaitable[AsyncArray]] = _from_zarr("from_array")
full: Callable[..., Awaitable[AsyncArray]] = _from_zarr("full")
full_like: Callable[..., Awaitable[AsyncArray]] = _from_zarr("full_like")
group: Callable[..., Awaitable[AsyncGroup]] = _from_zarr("group")
load: Callable[..., Awaitable[Any]] = _from_zarr("load")
ones: Callable[..., Awaitable[AsyncArray]] = _from_zarr("ones")
ones_like: Callable[..., Awaitable[AsyncArray]] = _from_zarr("ones_like")
open: Callable[..., Awaitable[Node]] = _from_zarr("open")
open_array: Callable[..., Awaitable[AsyncArray]] = _from_zarr("open_array")
open_group: Callable[..., Awaitable[AsyncGroup]] = _from_zarr("open_group")
open_like: Callable[..., Awaitable[AsyncArray]] = _from_zarr("open_like")
save: Callable[..., Awaitable[None]] = _from_zarr("save")
save_array: Callable[..., Awaitable[None]] = _from_zarr("save_array")
save_group: Callable[..., Awaitable[None]] = _from_zarr("save_group")
tree: Callable[..., Awaitable[Any]] = _from_zarr("tree")
zeros: Callable[..., Awaitable[AsyncArray]] = _from_zarr("zeros")
zeros_like: Callable[..., Awaitable[AsyncArray]] = _from_zarr("zeros_like")


def open_consolidated(
    store: Any = None, *, use_consolidated: bool = True, **kwargs: Any
) -> Awaitable[AsyncGroup]:
    """`open_group` with ``use_consolidated=True``, as zarr's ``open_consolidated``."""
    if use_consolidated is not True:
        raise TypeError(
            "'use_consolidated' must be 'True' in 'open_consolidated'. Use 'open' with "
            "'use_consolidated=False' to bypass consolidated metadata."
        )
    return open_group(store, use_consolidated=True, **kwargs)


def __getattr__(name: str) -> Any:
    # A function zarr adds to its async API later works here without new code.
    if name in getattr(zarr.api.asynchronous, "__all__", ()) and name not in _NOT_IMPLEMENTED:
        return _from_zarr(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
