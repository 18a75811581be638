"""What the codec pipeline's writes do per chunk without zarr's merge: a chunk the caller's array
covers whole is encoded (or, raw, written) from the caller's memory.

Where a write's time went (``arr[:] = data`` into an empty folder, zarr 3.1.6, 2 shared cores):

* zarr's ``write_empty_chunks=False`` test, ``NDBuffer.all_equal``, compares the whole chunk
  with the fill value through temporary arrays before any byte is written: ≈1.4 ms for a 1 MiB
  float32 chunk, more than its write. Zarr 3.4 stops at the first slice that differs; `all_equal`
  does the same on every zarr version, with zarr's own comparison on each slice, so the answer is
  zarr's (its -0.0 and NaN rules included).
* A chunk in the middle of a 2-D array is a strided view; zarr's ``bytes`` codec flattens it into
  fresh memory (≈230 µs a MiB, its page faults included), and all of it holding the GIL.
  `contiguous` copies it into a reused buffer instead (≈120 µs), and a chunk that is contiguous
  in the caller's array (1-D, or a band of whole rows) is not copied at all.
* A raw chunk (only a native-endian ``bytes`` codec) needs no encoding: its bytes are the
  caller's, taken in the write hop itself, one chunk at a time, so a reused buffer is rewritten
  only once the file holding its last chunk is written (`BlockingStore._set_many_blocking`
  promises that order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import NDBuffer
from zarr.core.indexing import SelectorTuple

from zarr_anyio.storage import _buffers

__all__ = ["POOLED", "all_equal", "all_slices", "contiguous", "is_whole", "whole_chunk"]

# The first slice `all_equal` compares holds about this many elements (a chunk that differs from
# its fill value nearly always does so there); each next slice is twice as long.
FIRST_SLICE = 256
# A non-contiguous chunk of at least this many bytes is copied into a reused buffer (its memory
# is mapped already); a smaller one into fresh memory, which costs no page faults at that size.
POOLED = 128 << 10


def all_equal(chunk: NDBuffer, fill: Any) -> bool:
    """``chunk.all_equal(fill)``, slice by slice of the leading axis, slices doubling: a chunk
    that differs is found after its first slice, one that does not costs one scan."""
    data = chunk.as_ndarray_like()
    if data.ndim == 0 or data.size == 0 or np.ndim(fill) > 0:
        return chunk.all_equal(fill)
    if data.dtype.kind in "biuf" and isinstance(fill, (bool, int, float, np.number, np.bool_)):
        # A first element that is a number other than the fill value (neither NaN, so no rule
        # of zarr's on NaN or on -0.0 can make them equal): ~2 µs, where one call of zarr's
        # comparison costs 30-90 µs whatever the slice's size.
        first = np.asarray(data)[(0,) * data.ndim]  # a NumPy array: the same, not a copy
        if first != fill and first == first and fill == fill:
            return False
    leading = data.shape[0]
    step = max(1, FIRST_SLICE // max(1, data.size // leading))
    start = 0
    while start < leading:
        stop = min(start + step, leading)
        if not chunk[start:stop].all_equal(fill):
            return False
        start = stop
        step *= 2
    return True


def all_slices(selection: object) -> bool:
    return isinstance(selection, tuple) and all(type(s) is slice for s in selection)


def is_whole(selection: SelectorTuple, shape: tuple[int, ...]) -> bool:
    """Whether a chunk selection takes every element of the chunk, in order."""
    if not isinstance(selection, tuple) or len(selection) != len(shape):
        return False
    for s, n in zip(selection, shape, strict=True):
        if type(s) is not slice or s.start not in (0, None) or s.step not in (1, None):
            return False
        if s.stop != n:
            return False
    return True


def whole_chunk(
    value: np.ndarray[Any, Any],
    spec: ArraySpec,
    chunk_selection: SelectorTuple,
    out_selection: SelectorTuple,
    complete: bool,
    drop_axes: tuple[int, ...],
) -> np.ndarray[Any, Any] | None:
    """The part of the caller's ``value`` that is the whole chunk, as it is (a view), if it is
    one: what zarr's merge would give, without it. ``None`` where the chunk needs merging (a
    partial chunk, an edge chunk, dropped axes, a scalar, a value of another dtype)."""
    if not complete or drop_axes or value.ndim != len(spec.shape) or spec.order != "C":
        return None
    if not is_whole(chunk_selection, spec.shape):
        return None
    if not all_slices(out_selection):
        return None
    if value.dtype != spec.dtype.to_native_dtype():
        return None
    view = value[out_selection]
    return view if view.shape == spec.shape else None


def contiguous(view: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``view`` itself if C-contiguous, else a C-contiguous copy (in a reused buffer if large).
    The copy's buffer is free for reuse once nothing refers to what this returns."""
    if view.flags.c_contiguous:
        return view
    if view.nbytes < POOLED:
        return np.ascontiguousarray(view)
    staged = np.frombuffer(_buffers.take(view.nbytes), dtype=view.dtype, count=view.size)
    staged = staged.reshape(view.shape)
    np.copyto(staged, view)
    return staged
