"""zstd frames decompressed into memory the caller names, by libzstd called through ctypes, with
one decompression context per thread kept from frame to frame.

The inner chunks of a sharded zstd array are many small frames (64 of 16 KiB to a 1 MiB shard in
the benchmark). numcodecs' ``Zstd.decode`` (what zarr's ``ZstdCodec`` runs) makes a context for
each (``ZSTD_decompress``) inside Python that checks and wraps its argument: ≈17 µs a 16 KiB
chunk, and two threads decoding took as long as one. python-zstandard's reused context takes ≈9
µs, but two threads took as long as one there too. A ctypes call lets go of the GIL for as long
as libzstd works, so two threads decode two frames at once (4,096 such frames: 26 ms on two
threads, against 45 ms for python-zstandard and 78 ms for numcodecs), and each frame goes
straight where the caller wants it (a row of a shard's grid of chunks), without a bytes object
between.

libzstd is the one numcodecs' own ``zstd`` extension is built with: it exports zstd's functions
(on Linux, where its symbols are visible). Where it does not, on a 32-bit system, and in the
portable mode, `decompress_into` is ``None`` and callers use the codec's own decode. A chunk
that does not decompress to exactly the size asked (damage, a frame of another size) returns
``False`` (frames in a row are decompressed one after another, as zstd defines them): the caller
gives it to the codec's own decode, so what such a chunk decodes to, or the error it raises,
stays numcodecs' (zarr's).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from zarr_anyio.storage._oscalls import PORTABLE

__all__ = ["declared_size", "decompress_into"]


def _libzstd() -> Any | None:
    if PORTABLE or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        import numcodecs.zstd

        library = ctypes.CDLL(numcodecs.zstd.__file__)
        create, free = library.ZSTD_createDCtx, library.ZSTD_freeDCtx
        decompress = library.ZSTD_decompressDCtx
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    create.argtypes, create.restype = [], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], ctypes.c_size_t
    decompress.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    decompress.restype = ctypes.c_size_t
    return library


class _Context:
    """A thread's decompression context, freed with the thread's locals when it ends."""

    def __init__(self, library: Any) -> None:
        self.library = library
        self.pointer: int | None = library.ZSTD_createDCtx()
        if not self.pointer:
            raise MemoryError("libzstd could not make a decompression context")

    def __del__(self) -> None:
        if self.pointer:
            self.library.ZSTD_freeDCtx(self.pointer)
            self.pointer = None


_threads = threading.local()


def _decompress_into(library: Any) -> Callable[[int, int, int, int], bool]:
    run = library.ZSTD_decompressDCtx

    def decompress_into(target: int, size: int, source: int, length: int) -> bool:
        """The frame of ``length`` bytes at address ``source`` into the ``size`` bytes at
        address ``target``; whether it filled them exactly. Both must stay alive and unmoved
        for the call."""
        context: _Context | None = getattr(_threads, "zstd", None)
        if context is None:
            context = _threads.zstd = _Context(library)
        # An error is a code within 120 of the largest size_t, never a size asked for: no
        # second call (and second wait for the GIL) to ask `ZSTD_isError`.
        return bool(run(context.pointer, target, size, source, length) == size)

    return decompress_into


_library = _libzstd()
decompress_into: Callable[[int, int, int, int], bool] | None = (
    None if _library is None else _decompress_into(_library)
)
"""``decompress_into(target, size, source, length)``, or ``None`` where libzstd is not to be
had this way."""


_MAGIC = b"\x28\xb5\x2f\xfd"
# The width of Frame_Content_Size for each value of its flag (the top two bits of the frame
# header's descriptor); the flag's 0 means 1 byte in a single-segment frame, else none.
_SIZE_WIDTHS = (0, 2, 4, 8)
_HEADER_BYTES = 14  # magic, descriptor, window, content size: dictionaries are refused


# Blocks of a frame (RFC 8878, 3.1.1.2): a 3-byte header, its lowest bit "last block", then
# two bits of type (raw, RLE, compressed, reserved), then the size. An RLE block holds 1 byte.
_BLOCK_HEADER = 3
_MOST_BLOCKS = 64  # walked in step for every frame at once; more, and frame by frame it is
_BLOCK_BYTES = np.arange(_BLOCK_HEADER)


def _declared(header: bytes) -> tuple[int, int, bool] | None:
    """The content size a zstd frame's header declares (RFC 8878, 3.1.1.1), the header's
    length, and whether a checksum ends the frame; ``None`` if it is no frame, names no size
    or a dictionary."""
    if len(header) < 6 or header[:4] != _MAGIC:
        return None
    descriptor = header[4]
    if descriptor & 0b1011:  # the reserved bit, or a dictionary
        return None
    single_segment = (descriptor >> 5) & 1
    width = _SIZE_WIDTHS[descriptor >> 6] or single_segment
    at = 6 - single_segment  # after the window descriptor, which a single segment has not
    if not width or len(header) < at + width:
        return None
    value = int.from_bytes(header[at : at + width], "little")
    return value + (256 if width == 2 else 0), at + width, bool(descriptor & 0b100)


def _frames_end_where_they_should(
    data: np.ndarray[Any, np.dtype[np.uint8]],
    starts: np.ndarray[Any, np.dtype[np.int64]],
    ends: np.ndarray[Any, np.dtype[np.int64]],
    checksum: bool,
) -> bool:
    """Whether the frame whose blocks start at each of ``starts`` ends exactly at its entry
    of ``ends``, by its blocks' headers, walked for every frame at once: libzstd
    decompressing frames one after another starts each where the last ended, which must be
    where the index says each chunk starts."""
    at, ends = starts, ends - (4 if checksum else 0)
    for _ in range(_MOST_BLOCKS):
        if (at + _BLOCK_HEADER > ends).any():
            return False
        header = data[at[:, None] + _BLOCK_BYTES].astype(np.int64)
        value = header[:, 0] | header[:, 1] << 8 | header[:, 2] << 16
        kind = (value >> 1) & 3
        if (kind == 3).any():
            return False
        at = at + _BLOCK_HEADER + np.where(kind == 1, 1, value >> 3)
        last = (value & 1).astype(np.bool_)
        if last.all():  # a chunk of up to 128 KiB is one block: once round
            return bool((at == ends).all())
        # Frames of several blocks: the ones that go on, a block further.
        if ((at == ends) != last).any():
            return False
        at, ends = at[~last], ends[~last]
    return False


def declared_size(
    data: np.ndarray[Any, np.dtype[np.uint8]],
    starts: np.ndarray[Any, np.dtype[np.int64]],
    lengths: np.ndarray[Any, np.dtype[np.int64]],
) -> int | None:
    """The content size that each of the zstd frames at ``starts`` in ``data``, ``lengths``
    bytes long, declares alike, their headers byte for byte; ``None`` if one is no frame,
    names no size, is not one frame exactly as long as its length, or any two headers differ.

    libzstd holds a frame that declares its size to exactly that size (an error otherwise),
    so such frames, back to back, can be decompressed in one call and still each give one
    chunk. The frames of a shard's chunks, all of one size, have headers alike: one is read,
    and the others compared with it, and every frame's blocks walked, in a few numpy calls
    (each frame's header read on its own took ≈50 µs a shard of 64, more than the one call
    saves)."""
    if not len(starts):
        return None
    first = int(starts[0])
    declared = _declared(bytes(data[first : first + _HEADER_BYTES]))
    if declared is None:
        return None
    size, length, checksum = declared
    if int(lengths.min()) < length:
        return None
    headers = data[starts[:, None] + np.arange(length)]
    if not (headers == headers[0]).all():
        return None
    if not _frames_end_where_they_should(data, starts + length, starts + lengths, checksum):
        return None
    return size
