"""Buffers for large reads, in memory that is already mapped.

Reading a 1 MiB chunk from the page cache is a copy (~130 µs here); reading it into fresh memory
adds a page fault for each of its 256 pages (~350 µs more here: ``os.pread`` into a new ``bytes``
took ~490 µs per MiB, the same read into a reused buffer ~140 µs). Whether a fresh allocation of
1 MiB faults depends on the allocator's history (glibc serves it from ``mmap`` or from a heap it
may have trimmed), so the cost of the same read swung with what the process had done before:
it was the largest part of the run-to-run swing of large reads. Zarr's own store pays it on
every chunk.

So large reads go into slots of a pool: anonymous private mappings (never shared across a
``fork``) that stay mapped, handed out as a ``memoryview`` that zarr wraps without copying. A slot
is free again once nothing refers to it: every object that exposes a slot's memory (memoryview,
numpy array) holds a reference to the mapping, so its reference count says whether anyone still
can see the bytes. No slot is ever handed out twice while in use; when none is free and the pool
is full (`POOL_BYTES`), the read gets ordinary fresh memory. Slots unused for `IDLE_SECONDS` are
unmapped at the next take.

Where ``mmap`` has no ``MAP_ANONYMOUS`` (Windows), ``mmap(-1, size)`` gives the same anonymous
memory (Windows has no ``fork`` to share it across).
"""

from __future__ import annotations

import mmap
import sys
import threading
import time

import numpy as np

from zarr_anyio._core.fork import at_fork_in_child

__all__ = ["IDLE_SECONDS", "POOL_BYTES", "take"]

# At most this much memory is kept mapped for reads.
POOL_BYTES = 64 << 20
IDLE_SECONDS = 30.0


class _Slot:
    __slots__ = ("last_used", "mapping")

    def __init__(self, size: int) -> None:
        self.mapping = _anonymous(size)
        self.last_used = time.monotonic()


def _anonymous(size: int) -> mmap.mmap:
    if _PRIVATE is None:
        return mmap.mmap(-1, size)
    return mmap.mmap(-1, size, flags=_PRIVATE)


_PRIVATE: int | None = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")
    else None
)


def _references(slot: _Slot) -> int:
    return sys.getrefcount(slot.mapping)


# What `_references` gives for a slot nobody else refers to (the slot's own reference and the
# one passed to getrefcount), measured rather than assumed.
_FREE = _references(_Slot(mmap.PAGESIZE))


def _size_class(size: int) -> int:
    """``size`` rounded up to one of 16 steps per doubling (at most ~6% more), whole pages."""
    step = max(mmap.PAGESIZE, 1 << max(0, size.bit_length() - 5))
    return -(-size // step) * step


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[int, list[_Slot]] = {}
        self._bytes = 0
        self._next_sweep = 0.0

    def take(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes, from a free slot if one fits."""
        size_class = _size_class(size)
        now = time.monotonic()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            slots = self._slots.setdefault(size_class, [])
            for slot in slots:
                if _references(slot) == _FREE:
                    break
            else:
                if self._bytes + size_class > POOL_BYTES:
                    return np.empty(size, np.uint8).data  # fresh memory, not kept
                slot = _Slot(size_class)
                slots.append(slot)
                self._bytes += size_class
            slot.last_used = now
            # Made under the lock: from here the view's reference marks the slot as in use.
            return memoryview(slot.mapping)[:size]

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + IDLE_SECONDS / 2
        for size_class, slots in list(self._slots.items()):
            for slot in list(slots):
                if now - slot.last_used > IDLE_SECONDS and _references(slot) == _FREE:
                    slots.remove(slot)
                    slot.mapping.close()
                    self._bytes -= size_class
            if not slots:
                del self._slots[size_class]

    def mapped_bytes(self) -> int:
        return self._bytes

    def after_fork(self) -> None:
        # A thread of the parent may have held the lock as it forked; the child has no such
        # thread. (The slots are private mappings: the child's reads never touch the parent's.)
        self._lock = threading.Lock()


_pool = _Pool()
take = _pool.take
at_fork_in_child(_pool.after_fork)
