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

The functions are written out (``async def``, typed), so that ``inspect``, type checkers, IDEs and
``help()`` see them as what they are; their parameters are those of every zarr we support (a
parameter one zarr version lacks is refused there only if given), and
tests/arrays/test_api_signatures.py keeps them in step with the installed zarr's. Parameter
types that zarr spells differently from version to version are ``Any`` here. A function zarr
adds later is here too, untyped, until it is written out (module ``__getattr__``).
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy.typing as npt
import zarr
import zarr.api.asynchronous
from zarr.abc.store import Store
from zarr.core.array import DEFAULT_FILL_VALUE
from zarr.core.common import JSON, AccessModeLiteral, MemoryOrder, ZarrFormat
from zarr.storage import StorePath

from .arrays._nodes import AsyncArray, AsyncGroup, NodeIterator, adopt, unwrap
from .arrays._run import concurrency_floor
from .storage import MemoryStore, open_store

__all__ = [
    "StoreLike",
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

StoreLike: TypeAlias = Store | StorePath | MutableMapping[str, Any] | str | Path
"""What ``store=`` takes: a store (ours or zarr's), a ``StorePath``, a dict, a path or a URL."""

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


def _zarr_call(name: str, arguments: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """zarr's function ``name`` and its arguments from the ``locals()`` of our namesake: by name,
    and by position where zarr takes ``*args``; a parameter the installed zarr does not take is
    dropped when left at its default, refused when given."""
    target = getattr(zarr.api.asynchronous, name)
    ours, theirs = _parameters(name)
    for key, value in arguments.items():
        parameter = ours[key]
        given = value is not parameter.default
        if given and key not in theirs and parameter.kind is not parameter.VAR_KEYWORD:
            raise TypeError(f"{name}() got {key}=, which zarr {zarr.__version__} does not take")
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    takes_args = any(p.kind is p.VAR_POSITIONAL for p in theirs.values())
    for key, parameter in theirs.items():
        if parameter.kind is parameter.VAR_POSITIONAL:
            positional.extend(arguments.get(key, ()))
        elif parameter.kind is parameter.VAR_KEYWORD:
            keywords.update(arguments.get(key, {}))
        elif key not in arguments:
            continue  # one of zarr's that we lack: the signature test says so
        elif takes_args and parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
            positional.append(arguments[key])
        else:
            keywords[key] = arguments[key]
    if not any(p.kind is p.VAR_KEYWORD for p in theirs.values()):
        # **kwargs of another zarr version: this one's own TypeError names what it does not take.
        keywords.update(arguments.get("kwargs", {}))
    return target, tuple(positional), keywords


@functools.cache
def _parameters(
    name: str,
) -> tuple[Mapping[str, inspect.Parameter], Mapping[str, inspect.Parameter]]:
    """The parameters of our ``name`` and of the installed zarr's."""
    theirs = inspect.signature(getattr(zarr.api.asynchronous, name)).parameters
    return inspect.signature(globals()[name]).parameters, theirs


def _start(name: str, arguments: dict[str, Any]) -> Any:
    target, args, kwargs = _zarr_call(name, arguments)
    args, kwargs, floor = _with_store(inspect.signature(target), args, kwargs)
    args = tuple(unwrap(arg) for arg in args)
    kwargs = {key: unwrap(value) for key, value in kwargs.items()}
    return adopt(target(*args, **kwargs), floor=floor)


async def _call(name: str, arguments: dict[str, Any]) -> Any:
    """Call zarr's ``name`` with our namesake's arguments, and await it as `run_zarr` does."""
    return await _start(name, arguments)


def _call_iter(name: str, arguments: dict[str, Any]) -> Any:
    """`_call` for zarr's async generators: a `NodeIterator`."""
    return _start(name, arguments)


async def array(
    data: Any,
    **kwargs: Any,
) -> AsyncArray:
    """A new array holding ``data`` (a numpy array, or one of ours).

    Example::

        arr = await za.array(np.arange(10), store="data/a.zarr")
    """
    result: AsyncArray = await _call("array", locals())
    return result


async def consolidate_metadata(
    store: StoreLike,
    path: str | None = None,
    zarr_format: ZarrFormat | None = None,
) -> AsyncGroup:
    """Gather the metadata of every node below ``path`` into the group's own, and give that
    group.

    Example::

        group = await za.consolidate_metadata("data/tree.zarr")
    """
    result: AsyncGroup = await _call("consolidate_metadata", locals())
    return result


async def create(
    shape: int | tuple[int, ...],
    *,
    chunks: Any = None,
    dtype: Any = None,
    compressor: Any = "auto",
    fill_value: Any = DEFAULT_FILL_VALUE,
    order: MemoryOrder | None = None,
    store: StoreLike | None = None,
    synchronizer: Any = None,
    overwrite: bool = False,
    path: str | None = None,
    chunk_store: StoreLike | None = None,
    filters: Any = None,
    cache_metadata: bool | None = None,
    cache_attrs: bool | None = None,
    read_only: bool | None = None,
    object_codec: Any = None,
    dimension_separator: Any = None,
    write_empty_chunks: bool | None = None,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    meta_array: Any = None,
    attributes: dict[str, JSON] | None = None,
    chunk_shape: Any = None,
    chunk_key_encoding: Any = None,
    codecs: Any = None,
    dimension_names: Any = None,
    storage_options: dict[str, Any] | None = None,
    config: Any = None,
    mode: AccessModeLiteral | None = None,
    data: npt.ArrayLike | None = None,
    **kwargs: Any,
) -> AsyncArray:
    """A new array, with zarr-python 2's keywords (`create_array` takes the newer ones).

    Example::

        arr = await za.create((100,), chunks=(10,), dtype="i4", store="data/a.zarr")
    """
    result: AsyncArray = await _call("create", locals())
    return result


async def create_array(
    store: StoreLike,
    *,
    name: str | None = None,
    shape: int | tuple[int, ...] | None = None,
    dtype: Any = None,
    data: Any = None,
    chunks: Any = "auto",
    shards: Any = None,
    filters: Any = "auto",
    compressors: Any = "auto",
    serializer: Any = "auto",
    fill_value: Any = DEFAULT_FILL_VALUE,
    order: MemoryOrder | None = None,
    zarr_format: ZarrFormat | None = 3,
    attributes: dict[str, JSON] | None = None,
    chunk_key_encoding: Any = None,
    dimension_names: Any = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    config: Any = None,
    write_data: bool = True,
) -> AsyncArray:
    """A new array in ``store``.

    Example::

        arr = await za.create_array("data/a.zarr", shape=(100,), chunks=(10,), dtype="i4")
    """
    result: AsyncArray = await _call("create_array", locals())
    return result


async def create_group(
    *,
    store: StoreLike,
    path: str | None = None,
    overwrite: bool = False,
    zarr_format: ZarrFormat | None = None,
    attributes: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> AsyncGroup:
    """A new group in ``store`` at ``path``.

    What differs from zarr's ``zarr.api.asynchronous.create_group`` (its documentation describes
    the parameters): ``store=`` takes whatever `zarr_anyio.open_store` takes (a zarr_anyio store,
    a path, a ``.zip`` path, a URL, a dict), opened with ``storage_options``; the call runs under
    asyncio or trio and ends with its work; the group comes back as an `AsyncGroup`.

    Example::

        root = await za.create_group(store="data/tree.zarr", attributes={"title": "t"})
    """
    result: AsyncGroup = await _call("create_group", locals())
    return result


def create_hierarchy(
    *,
    store: StoreLike,
    nodes: Any,
    overwrite: bool = False,
) -> NodeIterator[tuple[str, AsyncArray | AsyncGroup]]:
    """Create the groups and arrays of ``nodes`` at once, giving ``(path, node)`` for each as
    it is made.

    Example::

        async for path, node in za.create_hierarchy(store=store, nodes=nodes):
            print(path, node)
    """
    result: NodeIterator[tuple[str, AsyncArray | AsyncGroup]] = _call_iter(
        "create_hierarchy", locals()
    )
    return result


async def empty(
    shape: tuple[int, ...],
    **kwargs: Any,
) -> AsyncArray:
    """A new array of ``shape`` whose chunks are not written (reading gives the fill value).

    Example::

        arr = await za.empty((100,), chunks=(10,), dtype="f8", store="data/a.zarr")
    """
    result: AsyncArray = await _call("empty", locals())
    return result


async def empty_like(
    a: Any,
    *,
    zarr_format: ZarrFormat | None = None,
    **kwargs: Any,
) -> AsyncArray:
    """A new array shaped like ``a``, chunks not written.

    Example::

        copy = await za.empty_like(arr, store="data/b.zarr")
    """
    result: AsyncArray = await _call("empty_like", locals())
    return result


async def from_array(
    store: StoreLike,
    *,
    data: Any,
    write_data: bool = True,
    name: str | None = None,
    chunks: Any = "keep",
    shards: Any = "keep",
    filters: Any = "keep",
    compressors: Any = "keep",
    serializer: Any = "keep",
    fill_value: Any = DEFAULT_FILL_VALUE,
    order: MemoryOrder | None = None,
    zarr_format: ZarrFormat | None = None,
    attributes: dict[str, JSON] | None = None,
    chunk_key_encoding: Any = None,
    dimension_names: Any = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    config: Any = None,
) -> AsyncArray:
    """A new array in ``store`` with the data (and by default the settings) of ``data``.

    Example::

        copy = await za.from_array("data/copy.zarr", data=arr)
    """
    result: AsyncArray = await _call("from_array", locals())
    return result


async def full(
    shape: tuple[int, ...],
    fill_value: Any,
    **kwargs: Any,
) -> AsyncArray:
    """A new array of ``shape`` filled with ``fill_value``.

    Example::

        arr = await za.full((100,), 7, chunks=(10,), dtype="i4", store="data/a.zarr")
    """
    result: AsyncArray = await _call("full", locals())
    return result


async def full_like(
    a: Any,
    *,
    zarr_format: ZarrFormat | None = None,
    **kwargs: Any,
) -> AsyncArray:
    """A new array shaped like ``a``, filled with ``fill_value``.

    Example::

        copy = await za.full_like(arr, fill_value=7, store="data/b.zarr")
    """
    result: AsyncArray = await _call("full_like", locals())
    return result


async def group(
    *,
    store: StoreLike | None = None,
    overwrite: bool = False,
    chunk_store: StoreLike | None = None,
    cache_attrs: bool | None = None,
    synchronizer: Any = None,
    path: str | None = None,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    meta_array: Any = None,
    attributes: dict[str, JSON] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> AsyncGroup:
    """A group: opened, or made if missing (zarr-python 2's keywords; see `open_group`).

    Example::

        root = await za.group(store="data/tree.zarr")
    """
    result: AsyncGroup = await _call("group", locals())
    return result


async def load(
    *,
    store: StoreLike,
    path: str | None = None,
    zarr_format: ZarrFormat | None = None,
    zarr_version: ZarrFormat | None = None,
) -> Any:
    """The data of an array (a numpy array), or of every array of a group (a dict), read into
    memory.

    Example::

        values = await za.load(store="data/a.zarr")
    """
    result: Any = await _call("load", locals())
    return result


async def ones(
    shape: tuple[int, ...],
    **kwargs: Any,
) -> AsyncArray:
    """A new array of ``shape`` filled with ones.

    Example::

        arr = await za.ones((100,), chunks=(10,), dtype="i4", store="data/a.zarr")
    """
    result: AsyncArray = await _call("ones", locals())
    return result


async def ones_like(
    a: Any,
    *,
    zarr_format: ZarrFormat | None = None,
    **kwargs: Any,
) -> AsyncArray:
    """A new array shaped like ``a``, filled with ones.

    Example::

        copy = await za.ones_like(arr, store="data/b.zarr")
    """
    result: AsyncArray = await _call("ones_like", locals())
    return result


async def open(
    *,
    store: StoreLike | None = None,
    mode: AccessModeLiteral | None = None,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    path: str | None = None,
    storage_options: dict[str, Any] | None = None,
    config: Any = None,
    **kwargs: Any,
) -> AsyncArray | AsyncGroup:
    """The array or the group that ``store`` holds at ``path`` (a new array for a writing
    ``mode`` with ``shape=``).

    Example::

        node = await za.open(store="data/a.zarr", mode="r")
    """
    result: AsyncArray | AsyncGroup = await _call("open", locals())
    return result


async def open_array(
    *,
    store: StoreLike | None = None,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    path: str = "",
    storage_options: dict[str, Any] | None = None,
    config: Any = None,
    **kwargs: Any,
) -> AsyncArray:
    """The array that ``store`` holds at ``path``.

    Example::

        arr = await za.open_array(store="data/a.zarr", mode="r")
    """
    result: AsyncArray = await _call("open_array", locals())
    return result


async def open_group(
    store: StoreLike | None = None,
    *,
    mode: AccessModeLiteral = "a",
    cache_attrs: bool | None = None,
    synchronizer: Any = None,
    path: str | None = None,
    chunk_store: StoreLike | None = None,
    storage_options: dict[str, Any] | None = None,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    meta_array: Any = None,
    attributes: dict[str, JSON] | None = None,
    use_consolidated: Any = None,
) -> AsyncGroup:
    """The group that ``store`` holds at ``path`` (made if missing, for modes ``a``, ``w`` and
    ``w-``).

    Example::

        root = await za.open_group("s3://bucket/tree.zarr", mode="r")
    """
    result: AsyncGroup = await _call("open_group", locals())
    return result


async def open_like(
    a: Any,
    path: str,
    *,
    zarr_format: ZarrFormat | None = None,
    **kwargs: Any,
) -> AsyncArray:
    """An array at ``path`` with the shape, chunks and dtype of ``a``.

    Example::

        other = await za.open_like(arr, "data/b.zarr")
    """
    result: AsyncArray = await _call("open_like", locals())
    return result


async def save(
    store: StoreLike,
    *args: Any,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    path: str | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """Save one array (to ``store``), or several (by name, as a group).

    Example::

        await za.save("data/a.zarr", np.arange(10))
    """
    await _call("save", locals())


async def save_array(
    store: StoreLike,
    arr: Any,
    *,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    path: str | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """Save ``arr`` (a numpy array) as the array of ``store``.

    Example::

        await za.save_array("data/a.zarr", np.arange(10))
    """
    await _call("save_array", locals())


async def save_group(
    store: StoreLike,
    *args: Any,
    zarr_version: ZarrFormat | None = None,
    zarr_format: ZarrFormat | None = None,
    path: str | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """Save several numpy arrays, by name, as the arrays of a group.

    Example::

        await za.save_group("data/tree.zarr", x=np.arange(10), y=np.ones(5))
    """
    await _call("save_group", locals())


async def tree(
    grp: AsyncGroup,
    expand: bool | None = None,
    level: int | None = None,
) -> Any:
    """A printable tree of the hierarchy under the group ``grp``.

    Example::

        print(await za.tree(root))
    """
    result: Any = await _call("tree", locals())
    return result


async def zeros(
    shape: tuple[int, ...],
    **kwargs: Any,
) -> AsyncArray:
    """A new array of ``shape`` filled with zeros.

    Example::

        arr = await za.zeros((100,), chunks=(10,), dtype="i4", store="data/a.zarr")
    """
    result: AsyncArray = await _call("zeros", locals())
    return result


async def zeros_like(
    a: Any,
    *,
    zarr_format: ZarrFormat | None = None,
    **kwargs: Any,
) -> AsyncArray:
    """A new array shaped like ``a``, filled with zeros.

    Example::

        copy = await za.zeros_like(arr, store="data/b.zarr")
    """
    result: AsyncArray = await _call("zeros_like", locals())
    return result


async def open_consolidated(
    *args: Any, use_consolidated: Literal[True] = True, **kwargs: Any
) -> AsyncGroup:
    """`open_group` with ``use_consolidated=True`` (its arguments are `open_group`'s), as zarr's
    ``open_consolidated``.

    Example::

        root = await za.open_consolidated("data/tree.zarr", mode="r")
    """
    if use_consolidated is not True:
        raise TypeError(
            "'use_consolidated' must be 'True' in 'open_consolidated'. Use 'open' with "
            "'use_consolidated=False' to bypass consolidated metadata."
        )
    return await open_group(*args, use_consolidated=True, **kwargs)


_WHAT_DIFFERS = (
    "What differs from zarr's ``zarr.api.asynchronous.{name}`` (its documentation describes the "
    "parameters): ``store=`` takes whatever `zarr_anyio.open_store` takes (a zarr_anyio store, a "
    "path, a ``.zip`` path, a URL, a dict; ``None`` is a new `MemoryStore`), opened with the "
    "call's ``mode`` and ``storage_options``; the call runs under asyncio or trio and ends with "
    "its work; arrays and groups come back as `AsyncArray` and `AsyncGroup`."
)


def _say_what_differs(function: Callable[..., Any]) -> None:
    """Put the paragraph every function of zarr's shares after ``function``'s first line (one
    text, written once, that ``help()`` and the API reference show with each)."""
    summary, _, rest = (function.__doc__ or "").partition("\n\n")
    note = textwrap.fill(
        _WHAT_DIFFERS.format(name=function.__name__),
        width=96,
        initial_indent="    ",
        subsequent_indent="    ",
    )
    function.__doc__ = f"{summary}\n\n{note}\n\n{rest}"


for _function in (
    array,
    consolidate_metadata,
    create,
    create_array,
    create_hierarchy,
    empty,
    empty_like,
    from_array,
    full,
    full_like,
    group,
    load,
    ones,
    ones_like,
    open,
    open_array,
    open_group,
    open_like,
    save,
    save_array,
    save_group,
    tree,
    zeros,
    zeros_like,
):
    _say_what_differs(_function)
del _function


def __getattr__(name: str) -> Any:
    # A function zarr adds to its async API later works here without new code.
    if name in getattr(zarr.api.asynchronous, "__all__", ()) and name not in _NOT_IMPLEMENTED:
        return _from_zarr(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
