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

from zarr_anyio.storage._oscalls import PORTABLE

__all__ = ["decompress_into"]


def _libzstd() -> Any | None:
    if PORTABLE or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        import numcodecs.zstd

        library = ctypes.CDLL(numcodecs.zstd.__file__)
        create, free = library.ZSTD_createDCtx, library.ZSTD_freeDCtx
        decompress, is_error = library.ZSTD_decompressDCtx, library.ZSTD_isError
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
    is_error.argtypes, is_error.restype = [ctypes.c_size_t], ctypes.c_uint
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
    run, is_error = library.ZSTD_decompressDCtx, library.ZSTD_isError

    def decompress_into(target: int, size: int, source: int, length: int) -> bool:
        """The frame of ``length`` bytes at address ``source`` into the ``size`` bytes at
        address ``target``; whether it filled them exactly. Both must stay alive and unmoved
        for the call."""
        context: _Context | None = getattr(_threads, "zstd", None)
        if context is None:
            context = _threads.zstd = _Context(library)
        got = run(context.pointer, target, size, source, length)
        return not is_error(got) and got == size

    return decompress_into


_library = _libzstd()
decompress_into: Callable[[int, int, int, int], bool] | None = (
    None if _library is None else _decompress_into(_library)
)
"""``decompress_into(target, size, source, length)``, or ``None`` where libzstd is not to be
had this way."""
