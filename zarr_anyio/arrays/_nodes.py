"""zarr's `AsyncArray` and `AsyncGroup`, awaitable from asyncio and trio alike.

zarr's async API is asyncio code. Our wrappers forward every attribute to the zarr object and
run what comes back as a coroutine where asyncio can run it:

* under asyncio (uvloop included), on the caller's own loop, in a task of its own (so that a
  cancellation reaches zarr's work once, however often anyio repeats it): no hop, no thread;
* under trio, on the bridge's asyncio loop (`zarr_anyio._core.bridge.run_on_loop`): the trio
  task waits on an event, holding no thread, and cancelling it cancels the zarr task and waits
  for its end.

Either way the call ends only when every store operation made for it has ended
(`zarr_anyio.arrays._run`): no chunk read or write of a returned, failed or cancelled call is
left running.

Forwarding is generic (``__getattr__``): a coroutine method zarr adds later works unchanged, async
generators (``members()``, ``keys()``) are stepped one item per hop, and zarr nodes coming back are
wrapped. Written out here is only what zarr's async classes lack and its sync `Array` has: the
orthogonal, coordinate, mask and block selections for writing (and, before zarr 3.1.1, reading),
``oindex``/``vindex``/``blocks``, and a ``getitem``/``setitem`` that take every selection kind.

zarr caps the chunk requests of one call at its ``async.concurrency`` setting (default 10). A
zarr_anyio store has a bound of its own (``max_concurrency``, default 32) that holds across calls,
so a lower zarr cap would silently win: inside each call on a zarr_anyio store, zarr reads its
setting raised (never lowered) to the store's bound (`zarr_anyio.arrays._run.concurrency_floor`),
and the store's bound is the one that holds; outside our calls the setting is as the user left
it. Measured: 64 chunk reads in flight with ``max_concurrency=64``, against 10 without this.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar, cast

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import BufferPrototype, default_buffer_prototype
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.core.indexing import (
    BasicIndexer,
    BlockIndexer,
    CoordinateIndexer,
    MaskIndexer,
    OrthogonalIndexer,
    ensure_tuple,
    is_coordinate_selection,
    is_mask_selection,
    is_pure_fancy_indexing,
    is_pure_orthogonal_indexing,
    is_scalar,
    pop_fields,
    replace_lists,
)

from zarr_anyio.storage import AnyioStore

from ._blocks import stream_blocks
from ._compat import VindexInvalidSelectionError, chunk_grid
from ._fast_read import fast_read
from ._pipeline import AnyioCodecPipeline
from ._run import concurrency_floor, run_zarr

__all__ = [
    "AsyncArray",
    "AsyncGroup",
    "NodeIterator",
    "adopt",
    "forward",
    "unwrap",
]

T = TypeVar("T")


def unwrap(value: Any) -> Any:
    # An array goes to zarr as a zarr.Array, the form its async functions take as data
    # (``from_array``, ``array``, ``*_like``), reading it through its async array.
    if isinstance(value, AsyncArray):
        return zarr.Array(value._zarr)
    if isinstance(value, AsyncGroup):
        return value._zarr
    return value


def _wrap(value: Any) -> Any:
    """Our wrapper for a zarr node, also inside tuples, lists and dicts; anything else as it is."""
    if isinstance(value, zarr.AsyncArray):
        return AsyncArray(_with_our_pipeline(value))
    if isinstance(value, zarr.AsyncGroup):
        return AsyncGroup(value)
    if type(value) is tuple:
        return tuple(_wrap(item) for item in value)
    if type(value) is list:
        return [_wrap(item) for item in value]
    if type(value) is dict:
        return {key: _wrap(item) for key, item in value.items()}
    return value


async def _finish(coroutine: Coroutine[Any, Any, Any], owner: _Node | None, floor: int) -> Any:
    try:
        result = await run_zarr(lambda: coroutine, floor)
    finally:
        coroutine.close()  # if cancelled before it started, it was never awaited: no warning
    if owner is not None and result is owner._zarr:
        return owner  # update_attributes() and friends return the node itself
    return _wrap(result)


def adopt(result: Any, owner: _Node | None = None, floor: int | None = None) -> Any:
    """What a call into zarr gave, made usable from any backend: coroutines become awaitables
    that run as `run_zarr` says, async generators `NodeIterator`s, zarr nodes our wrappers.
    ``floor`` is zarr's concurrency floor for the call (`concurrency_floor`; by default, that
    of ``owner``'s store)."""
    if floor is None:
        floor = owner._floor if owner is not None else 0
    if inspect.iscoroutine(result):
        return _finish(result, owner, floor)
    if inspect.isasyncgen(result):
        return NodeIterator(cast("AsyncGenerator[Any, None]", result), floor)
    if owner is not None and result is owner._zarr:
        return owner
    return _wrap(result)


def forward(target: Callable[..., Any], owner: _Node | None = None) -> Callable[..., Any]:
    """``target`` (a zarr function or method) taking our nodes and giving adopted results."""

    @functools.wraps(target)
    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(unwrap(arg) for arg in args)
        kwargs = {key: unwrap(value) for key, value in kwargs.items()}
        return adopt(target(*args, **kwargs), owner)

    return call


_END = object()


class NodeIterator(Generic[T]):
    """One of zarr's async generators (``group.members()``, ``group.keys()``, …), stepped from
    any backend, each item one call of `run_zarr` (under trio, one hop to the bridge loop): the
    generator runs only while an item is asked for, and nothing is held open between items.

    ``async for`` works as on zarr's; ``async with group.members() as members:`` also closes the
    generator when the block is left early (otherwise that happens when it is garbage-collected).
    """

    def __init__(self, generator: AsyncGenerator[T, None], floor: int = 0) -> None:
        self._generator = generator
        self._floor = floor

    def __aiter__(self) -> NodeIterator[T]:
        return self

    async def __anext__(self) -> T:
        generator = self._generator

        async def step() -> Any:
            try:
                return await generator.__anext__()
            except StopAsyncIteration:
                return _END

        item = await run_zarr(step, self._floor)
        if item is _END:
            raise StopAsyncIteration
        wrapped: T = _wrap(item)
        return wrapped

    async def aclose(self) -> None:
        generator = self._generator

        async def close() -> None:
            await generator.aclose()

        await run_zarr(close, self._floor)

    async def __aenter__(self) -> NodeIterator[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------------ nodes


class _Node:
    """What arrays and groups share: generic forwarding to the zarr object."""

    _zarr: Any

    @property
    def _floor(self) -> int:
        return concurrency_floor(self._zarr.store)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_zarr":
            raise AttributeError(name)
        value = getattr(self._zarr, name)
        if callable(value):
            return forward(value, self)
        return _wrap(value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._zarr)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Node) and type(other) is type(self) and self._zarr == other._zarr

    def __hash__(self) -> int:
        return hash(self._zarr)

    def __repr__(self) -> str:
        return f"<zarr_anyio.{type(self).__name__} of {self._zarr!r}>"


def _fitted(value: Any, target: tuple[int, ...]) -> Any:
    """``value`` broadcast to ``target`` by numpy's rules, or numpy's ``ValueError``.

    zarr cuts the value chunk by chunk while it writes, so a value of another shape either fails
    halfway, leaving the chunks before it written, or (longer) is silently cut short. Checked and
    broadcast first (a view, no copy), it is all written or nothing is.
    """
    value_shape = np.shape(value)
    if value_shape == target:
        return value
    shape = value_shape
    while len(shape) > len(target) and shape[0] == 1:
        shape = shape[1:]  # numpy drops the value's leading length-1 axes
    try:
        fits = np.broadcast_shapes(shape, target) == target
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"could not broadcast input array from shape {value_shape} into shape {target}"
        )
    return np.broadcast_to(np.asarray(value).reshape(shape), target)


def _with_our_pipeline(array: zarr.AsyncArray[Any]) -> zarr.AsyncArray[Any]:
    """An array zarr made for a call of ours, set to read and write through our codec pipeline
    (`._pipeline`) when it is on one of our stores and has zarr's default pipeline (a pipeline
    the user chose, zarrs say, is kept). Arrays the user wraps themselves are left as they are."""
    if isinstance(array.store, AnyioStore) and type(array.codec_pipeline) is BatchedCodecPipeline:
        object.__setattr__(array, "codec_pipeline", AnyioCodecPipeline(array.codec_pipeline))
    return array


class AsyncArray(_Node):
    """zarr's ``AsyncArray``, usable from asyncio and trio.

    ``AsyncArray(array)`` wraps a ``zarr.Array``, a ``zarr.AsyncArray`` or one of ours. Every
    attribute and coroutine method of zarr's ``AsyncArray`` is here (``shape``, ``getitem``,
    ``resize``, ``append``, ``update_attributes``, ``info_complete``, …), and the selections of
    zarr's sync ``Array``, awaited: ``get_/set_`` ``basic``, ``orthogonal``, ``mask``,
    ``coordinate`` and ``block`` selections, ``oindex``, ``vindex``, ``blocks``.
    """

    def __init__(self, array: zarr.Array[Any] | zarr.AsyncArray[Any] | AsyncArray) -> None:
        if isinstance(array, AsyncArray):
            array = array._zarr
        elif isinstance(array, zarr.Array):
            array = array._async_array  # zarr 3.1.0 has no public name for it
        if not isinstance(array, zarr.AsyncArray):
            raise TypeError(f"expected a zarr array, got {type(array).__name__}")
        self._zarr: zarr.AsyncArray[Any] = array

    @property
    def async_array(self) -> zarr.AsyncArray[Any]:
        """The zarr ``AsyncArray`` this wraps (``zarr.Array(arr.async_array)`` is its sync API)."""
        return self._zarr

    # zarr's AsyncArray has these; written out so that the type checker knows them.
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._zarr.shape)

    @property
    def ndim(self) -> int:
        return int(self._zarr.ndim)

    @property
    def store(self) -> Store:
        store: Store = self._zarr.store
        return store

    # ---------------------------------------------------------------- every selection kind

    async def _get(
        self,
        indexer: Any,
        out: Any = None,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> Any:
        array = self._zarr
        proto = prototype or default_buffer_prototype()
        read = fast_read(array, indexer, out, fields, proto)
        if read is not None:
            return await read()
        return await run_zarr(
            lambda: array._get_selection(indexer, prototype=proto, out=out, fields=fields),
            self._floor,
        )

    async def _set(
        self,
        indexer: Any,
        value: Any,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> None:
        array = self._zarr
        if fields is None and not is_scalar(value, array.dtype):
            value = _fitted(value, tuple(indexer.shape))
        proto = prototype or default_buffer_prototype()
        await run_zarr(
            lambda: array._set_selection(indexer, value, prototype=proto, fields=fields),
            self._floor,
        )

    async def getitem(self, selection: Any, *, prototype: BufferPrototype | None = None) -> Any:
        """``arr[selection]`` awaited: basic, orthogonal, coordinate or mask, as zarr's
        ``Array.__getitem__`` tells them apart."""
        fields, pure = pop_fields(selection)
        if is_pure_fancy_indexing(pure, self.ndim):
            return await self.vindex.getitem(selection, prototype=prototype)
        if is_pure_orthogonal_indexing(pure, self.ndim):
            return await self.get_orthogonal_selection(pure, fields=fields, prototype=prototype)
        return await self.get_basic_selection(pure, fields=fields, prototype=prototype)

    async def setitem(
        self, selection: Any, value: Any, *, prototype: BufferPrototype | None = None
    ) -> None:
        """``arr[selection] = value`` awaited (a zarr array as ``value`` is read first)."""
        if isinstance(value, AsyncArray | zarr.Array | zarr.AsyncArray):
            value = await AsyncArray(value).getitem(...)
        fields, pure = pop_fields(selection)
        if is_pure_fancy_indexing(pure, self.ndim):
            await self.vindex.setitem(selection, value, prototype=prototype)
        elif is_pure_orthogonal_indexing(pure, self.ndim):
            await self.set_orthogonal_selection(pure, value, fields=fields, prototype=prototype)
        else:
            await self.set_basic_selection(pure, value, fields=fields, prototype=prototype)

    async def get_basic_selection(
        self,
        selection: Any = Ellipsis,
        *,
        out: Any = None,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> Any:
        indexer = BasicIndexer(selection, self.shape, chunk_grid(self._zarr))
        return await self._get(indexer, out, fields, prototype)

    async def set_basic_selection(
        self,
        selection: Any,
        value: Any,
        *,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> None:
        indexer = BasicIndexer(selection, self.shape, chunk_grid(self._zarr))
        await self._set(indexer, value, fields, prototype)

    async def get_orthogonal_selection(
        self,
        selection: Any,
        *,
        out: Any = None,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> Any:
        indexer = OrthogonalIndexer(selection, self.shape, chunk_grid(self._zarr))
        return await self._get(indexer, out, fields, prototype)

    async def set_orthogonal_selection(
        self,
        selection: Any,
        value: Any,
        *,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> None:
        indexer = OrthogonalIndexer(selection, self.shape, chunk_grid(self._zarr))
        await self._set(indexer, value, fields, prototype)

    async def get_mask_selection(
        self,
        mask: Any,
        *,
        out: Any = None,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> Any:
        indexer = MaskIndexer(mask, self.shape, chunk_grid(self._zarr))
        return await self._get(indexer, out, fields, prototype)

    async def set_mask_selection(
        self,
        mask: Any,
        value: Any,
        *,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> None:
        indexer = MaskIndexer(mask, self.shape, chunk_grid(self._zarr))
        await self._set(indexer, value, fields, prototype)

    async def get_coordinate_selection(
        self,
        selection: Any,
        *,
        out: Any = None,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> Any:
        indexer = CoordinateIndexer(selection, self.shape, chunk_grid(self._zarr))
        result = await self._get(indexer, out, fields, prototype)
        if hasattr(result, "shape"):
            # The points come back flat; give them the selection's shape, as zarr's Array does.
            result = np.asarray(result).reshape(indexer.sel_shape)
        return result

    async def set_coordinate_selection(
        self,
        selection: Any,
        value: Any,
        *,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> None:
        indexer = CoordinateIndexer(selection, self.shape, chunk_grid(self._zarr))
        # As zarr's Array: the values go in flat, and their number must match the points'.
        if not is_scalar(value, self._zarr.dtype):
            value = np.asarray(value)
            if value.ndim > 1:
                value = value.reshape(-1)
            if value.shape != indexer.shape:
                raise ValueError(
                    f"Attempting to set a selection of {indexer.sel_shape[0]} "
                    f"elements with an array of {value.shape[0]} elements."
                )
        await self._set(indexer, value, fields, prototype)

    async def get_block_selection(
        self,
        selection: Any,
        *,
        out: Any = None,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> Any:
        indexer = BlockIndexer(selection, self.shape, chunk_grid(self._zarr))
        return await self._get(indexer, out, fields, prototype)

    async def set_block_selection(
        self,
        selection: Any,
        value: Any,
        *,
        fields: Any = None,
        prototype: BufferPrototype | None = None,
    ) -> None:
        indexer = BlockIndexer(selection, self.shape, chunk_grid(self._zarr))
        await self._set(indexer, value, fields, prototype)

    @property
    def oindex(self) -> OIndex:
        """Orthogonal selections: ``await arr.oindex.getitem(sel)``, ``.setitem(sel, value)``."""
        return OIndex(self)

    @property
    def vindex(self) -> VIndex:
        """Coordinate and mask selections: ``await arr.vindex.getitem(sel)``, ``.setitem(…)``."""
        return VIndex(self)

    @property
    def blocks(self) -> BlockIndex:
        """Block selections: ``await arr.blocks.getitem(sel)``, ``.setitem(sel, value)``."""
        return BlockIndex(self)

    # ---------------------------------------------------------------- streaming

    def iter_blocks(
        self, selection: Any = Ellipsis, *, max_concurrency: int | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """The blocks of a region, decoded, as they complete, with bounded memory.

        ::

            async with arr.iter_blocks((slice(0, 1000), slice(None))) as blocks:
                async for index, data in blocks:
                    total += data.sum()

        ``selection`` is a region: slices of step 1 (and ``...``). A block is one stored chunk
        (one shard, if the array is sharded) cut to the region; ``index`` is its place in the
        chunk grid, as for ``arr.blocks``. At most ``max_concurrency`` (default: the store's)
        blocks are being fetched or held at once, the one the loop holds included; leaving the
        block early cancels the fetches still running; an error is raised as itself.
        """
        return stream_blocks(self, selection, max_concurrency)


class _Selector:
    def __init__(self, array: AsyncArray) -> None:
        self.array = array


class OIndex(_Selector):
    async def getitem(self, selection: Any, *, prototype: BufferPrototype | None = None) -> Any:
        fields, pure = pop_fields(selection)
        pure = replace_lists(ensure_tuple(pure))
        return await self.array.get_orthogonal_selection(pure, fields=fields, prototype=prototype)

    async def setitem(
        self, selection: Any, value: Any, *, prototype: BufferPrototype | None = None
    ) -> None:
        fields, pure = pop_fields(selection)
        pure = replace_lists(ensure_tuple(pure))
        await self.array.set_orthogonal_selection(pure, value, fields=fields, prototype=prototype)


class VIndex(_Selector):
    def _kind(self, selection: Any) -> tuple[str, Any, Any]:
        fields, pure = pop_fields(selection)
        pure = replace_lists(ensure_tuple(pure))
        if is_coordinate_selection(pure, self.array.shape):
            return "coordinate", pure, fields
        if is_mask_selection(pure, self.array.shape):
            return "mask", pure, fields
        raise VindexInvalidSelectionError(
            "unsupported selection type for vectorized indexing; only coordinate selection "
            "(tuple of integer arrays) and mask selection (single Boolean array) are "
            f"supported; got {pure!r}"
        )

    async def getitem(self, selection: Any, *, prototype: BufferPrototype | None = None) -> Any:
        kind, pure, fields = self._kind(selection)
        if kind == "coordinate":
            return await self.array.get_coordinate_selection(
                pure, fields=fields, prototype=prototype
            )
        return await self.array.get_mask_selection(pure, fields=fields, prototype=prototype)

    async def setitem(
        self, selection: Any, value: Any, *, prototype: BufferPrototype | None = None
    ) -> None:
        kind, pure, fields = self._kind(selection)
        if kind == "coordinate":
            await self.array.set_coordinate_selection(
                pure, value, fields=fields, prototype=prototype
            )
        else:
            await self.array.set_mask_selection(pure, value, fields=fields, prototype=prototype)


class BlockIndex(_Selector):
    async def getitem(self, selection: Any, *, prototype: BufferPrototype | None = None) -> Any:
        return await self.array.get_block_selection(selection, prototype=prototype)

    async def setitem(
        self, selection: Any, value: Any, *, prototype: BufferPrototype | None = None
    ) -> None:
        await self.array.set_block_selection(selection, value, prototype=prototype)


class AsyncGroup(_Node):
    """zarr's ``AsyncGroup``, usable from asyncio and trio.

    ``AsyncGroup(group)`` wraps a ``zarr.Group``, a ``zarr.AsyncGroup`` or one of ours. Every
    attribute and coroutine method of zarr's ``AsyncGroup`` is here (``getitem``,
    ``create_array``, ``create_group``, ``require_group``, ``update_attributes``, ``tree``, …),
    each of its async generators (``members``, ``keys``, ``arrays``, …) is a `NodeIterator`, and
    the arrays and groups they give are ours.
    """

    def __init__(self, group: zarr.Group | zarr.AsyncGroup | AsyncGroup) -> None:
        if isinstance(group, AsyncGroup):
            group = group._zarr
        elif isinstance(group, zarr.Group):
            group = group._async_group
        if not isinstance(group, zarr.AsyncGroup):
            raise TypeError(f"expected a zarr group, got {type(group).__name__}")
        self._zarr: zarr.AsyncGroup = group

    @property
    def async_group(self) -> zarr.AsyncGroup:
        """The zarr ``AsyncGroup`` this wraps (``zarr.Group(g.async_group)`` is its sync API)."""
        return self._zarr

    @property
    def store(self) -> Store:
        store: Store = self._zarr.store
        return store
