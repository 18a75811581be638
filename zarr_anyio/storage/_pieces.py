"""A response body that comes in pieces of any size, read a part at a time into reused memory.

A large value is copied a part at a time (`AnyioStore._backend_read_parts`). Its body comes
from the client in pieces of the client's own size (aiohttp: up to 64 KiB; obstore: what hyper
read, ~400 KiB), and each part was joined from them: a list of the pieces and their join
(s3fs: two copies of the part at once), or obstore's ``min_chunk_size``, which joins them in
Rust into a buffer of at least a part (two copies again, on the allocator of a tokio thread),
then cut to the part in Python (two more). glibc serves such buffers from the heap of the
thread that asks (one heap a thread) and keeps what is freed there, so every copy, on every
thread that made one, raised the peak: a copy of 64 values of 8 MiB under a budget of 16 MiB
peaked 73 MiB above the command's imports (obstore), 41 MiB (s3fs).

Here each piece is copied once, as it comes, into a buffer of the part's size from the pool of
mapped slots (`._buffers`): a slot is taken again once nothing refers to the part it held, so a
copy's parts cycle through the same few slots, as many as are alive at once, whatever the
number or size of the values and whichever thread read them. One piece at most is held between
two parts (the one a part boundary cut in two).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from . import _buffers

__all__ = ["Pieces"]

_EMPTY = memoryview(b"")


class Pieces:
    """A body read as parts, each in a slot of the pool: ``read(n)`` gives its next piece (at
    most ``n`` bytes, or any size if the client does not take a size; empty or ``None`` at
    its end). Used from the one event loop that the body belongs to."""

    def __init__(self, read: Callable[[int], Awaitable[Any]]) -> None:
        self._read = read
        self._rest = _EMPTY

    async def part(self, wanted: int) -> memoryview:
        """The next ``wanted`` bytes, fewer only at the body's end."""
        if not self._rest and not await self._next(wanted):
            return self._rest
        if len(self._rest) >= wanted:
            # Within one piece (a client that gave the part whole): a view of it, no copy.
            whole = self._rest[:wanted]
            self._left_after(wanted)
            return whole
        into = _buffers.take(wanted)
        got = 0
        while got < wanted and (self._rest or await self._next(wanted - got)):
            count = min(len(self._rest), wanted - got)
            into[got : got + count] = self._rest[:count]
            self._left_after(count)
            got += count
        return into if got == wanted else into[:got]

    def _left_after(self, used: int) -> None:
        # An empty view still holds its piece (a slot of the pool, when the pieces are parts
        # read into the pool): a piece used up is let go, so its slot serves the next part.
        self._rest = self._rest[used:] if used < len(self._rest) else _EMPTY

    async def _next(self, wanted: int) -> bool:
        """Read the next piece into ``_rest``; whether there was one."""
        piece = await self._read(wanted)
        self._rest = _EMPTY if piece is None else memoryview(piece).cast("B")
        return bool(self._rest)
