"""Positional reads of regular files: one loop that LocalStore and ZipStore both read through."""

from __future__ import annotations

from . import _oscalls

__all__ = ["read_exact"]


def read_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, fewer only if the file ends first.

    A regular file is read whole in one positional read (`._oscalls.pread`) unless it changed
    under us; the loop finishes the read then."""
    data = _oscalls.pread(fd, length, offset)
    while len(data) < length:
        more = _oscalls.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data
