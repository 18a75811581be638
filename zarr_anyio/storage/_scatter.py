"""A file read straight into a strided place in memory: one ``preadv`` whose buffers are the
rows of a NumPy view, so a raw chunk lands in its place in the result with no buffer between.

A 2-D chunk's place in a 2-D result is not contiguous (a row of the chunk, then the rest of the
result's row), so reading it whole takes a buffer and a copy out of it. The kernel can put the
bytes where they belong itself: ``preadv`` takes a list of (address, length) buffers, one per
contiguous run of the view. Python's ``os.preadv`` wants a buffer object per run (≈0.2 µs each
to slice: 512 rows of a 1 MiB chunk cost more than the copy saved), so the list is an array of
``struct iovec`` computed by NumPy from the view's strides and handed to libc through ctypes,
which lets go of the GIL for the call. Measured on a 1 MiB float32 chunk of 512 rows: 69 µs
against 112 µs for a read into a buffer and a copy.

Only where libc has ``preadv`` (Linux, macOS), on 64-bit systems, and not in the portable mode
(`._oscalls.PORTABLE`); elsewhere `read_scattered` is ``None`` and callers read and copy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ._oscalls import PORTABLE

__all__ = ["MIN_RUN", "fill_from", "read_scattered", "runs_of"]

# Runs shorter than this are read into a buffer and copied: the kernel's cost per buffer of a
# ``preadv`` (tens of nanoseconds) passes a copy's below a few hundred bytes.
MIN_RUN = 256
# POSIX lets a system take as few as 16 buffers a call; Linux and macOS take 1,024.
_IOV_MAX = 1024 if sys.platform in ("linux", "darwin") else 16


def _libc_preadv() -> Callable[..., int] | None:
    if PORTABLE or not hasattr(os, "preadv") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, AttributeError, TypeError):
        return None
    # off_t is 64 bits on every 64-bit system that has preadv.
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    function.restype = ctypes.c_ssize_t
    return function


_preadv = _libc_preadv()


def runs_of(view: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], int] | None:
    """The contiguous runs of ``view`` in C order, as an ``(n, 2)`` array of ``struct iovec``
    (address, length), and the length of each; ``None`` if they are shorter than `MIN_RUN`
    bytes. ``view`` must stay alive, and unmoved, as long as the array is used."""
    shape, strides = view.shape, view.strides
    run = view.itemsize
    inner = len(shape)
    # The trailing axes that are contiguous together make one run.
    while inner and (shape[inner - 1] == 1 or strides[inner - 1] == run):
        inner -= 1
        run *= shape[inner]
    if run < MIN_RUN:
        return None
    offsets = np.zeros(1, dtype=np.int64)
    for length, stride in zip(shape[:inner], strides[:inner], strict=True):
        steps = np.arange(length, dtype=np.int64) * stride
        offsets = (offsets[:, np.newaxis] + steps).reshape(-1)
    iovecs = np.empty((len(offsets), 2), dtype=np.uint64)
    iovecs[:, 0] = offsets + view.ctypes.data
    iovecs[:, 1] = run
    return iovecs, run


def _read_scattered(fd: int, view: np.ndarray[Any, Any], offset: int) -> int | None:
    """Fill ``view`` (writable, any strides) from the file at ``offset``, its runs in C order;
    how many bytes came: fewer than ``view.nbytes`` if the file ended first (a regular file's
    read stops short only there), and the caller reads it again as it is. ``None``: the runs are
    too short, read and copy instead."""
    assert _preadv is not None
    found = runs_of(view)
    if found is None:
        return None
    iovecs, run = found
    done = 0
    for start in range(0, len(iovecs), _IOV_MAX):
        group = iovecs[start : start + _IOV_MAX]
        count = _preadv(fd, group.ctypes.data, len(group), offset + done)
        while count < 0:
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))
            count = _preadv(fd, group.ctypes.data, len(group), offset + done)
        done += count
        if count < run * len(group):
            break
    return done


def fill_from(into: np.ndarray[Any, Any], data: bytes | memoryview) -> int | bytes | memoryview:
    """``data`` copied into ``into`` (any strides, C order) if it is exactly as long, and its
    length given; else ``data`` as it is (a value of another length: the caller decodes it)."""
    if len(data) != into.nbytes:
        return data
    into[...] = np.frombuffer(data, dtype=into.dtype).reshape(into.shape)
    return len(data)


read_scattered: Callable[[int, np.ndarray[Any, Any], int], int | None] | None = (
    _read_scattered if _preadv is not None else None
)
"""`_read_scattered` where libc gives ``preadv``; ``None`` elsewhere."""
