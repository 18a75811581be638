"""A codec chain run as plain blocking calls, for `._pipeline`'s worker threads.

zarr's pipeline runs every codec as a coroutine per chunk on the event loop (≈60 µs of Python a
chunk), and codecs that do real work hop to a thread of their own from there. Our pipeline
decodes in its own worker threads, several chunks per hop, so it needs each codec as a blocking
call. zarr ≥ 3.1.1 gives most codecs one (``_decode_sync`` / ``_encode_sync``); a codec without
one (zarr 3.1.0's, a third party's) runs its own coroutine to completion on an event loop private
to the worker thread: its own decode, in the same threads, never on the caller's loop.

The stages see the same chunk specs as in zarr's `BatchedCodecPipeline`: an array-to-array codec
the spec before it, the array-to-bytes codec the spec after every array-to-array codec, each
bytes-to-bytes codec the spec after the codecs before it. They are resolved once per distinct
spec (a regular grid has one), not once per chunk.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numcodecs.abc
import numpy as np
from zarr.abc.codec import ArrayArrayCodec, ArrayBytesCodec, BytesBytesCodec, Codec
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.bytes import BytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer

from ._memo import Memo

__all__ = ["SyncChain"]

_local = threading.local()
T = TypeVar("T")


def _run_here(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a codec's coroutine to its end in this (worker) thread.

    A coroutine that never suspends ends at its first step, with no loop at all; one that does
    (zarr 3.1.0's compressors hop to a thread of their own) gets this thread's private loop,
    made once and kept as long as the thread.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    except RuntimeError as error:
        # It asked for the running loop (``asyncio.to_thread``) before doing anything.
        if "no running event loop" not in str(error):
            raise
        raise _NeedsLoop from None
    # It suspended on an awaitable we cannot resume without its loop: start it again on one.
    coroutine.close()
    raise _NeedsLoop


class _NeedsLoop(Exception):
    pass


class _InThisThread(ThreadPoolExecutor):
    """The private loop's executor: a codec's ``asyncio.to_thread`` call runs right here.

    The codec already runs in a worker thread, so a hop to another thread buys nothing; and a
    worker thread's loop waiting on a thread pool of its own was seen to wait for ever (zarr
    3.1's v2 compressors, in a loaded test run: the loop idle in ``select``, no thread running
    the call). asyncio takes only a ``ThreadPoolExecutor``; this one starts no thread."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            future.set_exception(error)
        else:
            future.set_result(result)
        return future


def _blocking(
    codec: Codec, method: str
) -> Callable[[Any, ArraySpec], Any]:  # the codec's one-chunk call, blocking
    sync = getattr(codec, f"_{method}_sync", None)
    if sync is not None:
        return sync  # type: ignore[no-any-return]
    single = getattr(codec, f"_{method}_single")

    def call(data: Any, spec: ArraySpec) -> Any:
        try:
            return _run_here(single(data, spec))
        except _NeedsLoop:
            pass
        loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
        if loop is None:
            loop = _local.loop = asyncio.new_event_loop()
            loop.set_default_executor(_InThisThread())
        return loop.run_until_complete(single(data, spec))

    return call


def _same(data: Buffer) -> Buffer:
    return data


class _Stages:
    """The specs each codec of the chain sees for one chunk spec."""

    __slots__ = ("aa", "ab", "bb")

    def __init__(self, chain: SyncChain, spec: ArraySpec) -> None:
        self.aa: list[ArraySpec] = []
        for aa_codec in chain.aa:
            self.aa.append(spec)
            spec = aa_codec.resolve_metadata(spec)
        self.ab = spec
        spec = chain.ab.resolve_metadata(spec)
        self.bb: list[ArraySpec] = []
        for bb_codec in chain.bb:
            self.bb.append(spec)
            spec = bb_codec.resolve_metadata(spec)


class SyncChain:
    """One chunk through the codecs, as blocking calls; thread-safe."""

    def __init__(
        self,
        aa: tuple[ArrayArrayCodec, ...],
        ab: ArrayBytesCodec,
        bb: tuple[BytesBytesCodec, ...],
    ) -> None:
        self.aa, self.ab, self.bb = aa, ab, bb
        self._decoders = (
            [_blocking(c, "decode") for c in aa],
            _blocking(ab, "decode"),
            [_blocking(c, "decode") for c in bb],
        )
        self._encoders = (
            [_blocking(c, "encode") for c in aa],
            _blocking(ab, "encode"),
            [_blocking(c, "encode") for c in bb],
        )
        self._stages: Memo[ArraySpec, _Stages] = Memo(64)

    def stages(self, spec: ArraySpec) -> _Stages:
        return self._stages.get(spec, lambda: _Stages(self, spec))

    def decode_bytes(self, data: Buffer, spec: ArraySpec) -> Buffer:
        """Only the bytes-to-bytes codecs' decode (decompression, checksums)."""
        stages = self.stages(spec)
        value: Any = data
        for decode, bb_spec in zip(reversed(self._decoders[2]), reversed(stages.bb), strict=True):
            value = decode(value, bb_spec)
        assert isinstance(value, Buffer)
        return value

    def bytes_decoder(self, spec: ArraySpec) -> Callable[[Buffer], Buffer]:
        """`decode_bytes` for chunks of ``spec``, its stages resolved now: a caller decoding
        many chunks of one spec hashes the spec (a dataclass, ≈2 µs) once, not once a chunk."""
        steps = list(zip(reversed(self._decoders[2]), reversed(self.stages(spec).bb), strict=True))
        if not steps:
            return _same
        if len(steps) == 1:
            decode, bb_spec = steps[0]
            return lambda data: decode(data, bb_spec)

        def run(data: Buffer) -> Buffer:
            value: Any = data
            for decode, bb_spec in steps:
                value = decode(value, bb_spec)
            return value  # type: ignore[no-any-return]

        return run

    def decode(self, data: Buffer, spec: ArraySpec) -> NDBuffer:
        stages = self.stages(spec)
        aa, ab, _ = self._decoders
        value: Any = self.decode_bytes(data, spec)
        value = ab(value, stages.ab)
        for decode, aa_spec in zip(reversed(aa), reversed(stages.aa), strict=True):
            value = decode(value, aa_spec)
        assert isinstance(value, NDBuffer)
        return value

    def encode(self, array: NDBuffer, spec: ArraySpec) -> Buffer | None:
        stages = self.stages(spec)
        aa, ab, bb = self._encoders
        value: Any = array
        for encode, aa_spec in zip(aa, stages.aa, strict=True):
            value = encode(value, aa_spec)
            if value is None:
                return None
        value = ab(value, stages.ab)
        for encode, bb_spec in zip(bb, stages.bb, strict=True):
            if value is None:
                return None
            value = encode(value, bb_spec)
        assert value is None or isinstance(value, Buffer)
        return value

    def decompressor(self) -> Callable[..., Any] | None:
        """The numcodecs decode (``decode(data, out=None)``) behind the chain's one
        bytes-to-bytes codec, if it is zarr's zstd or blosc: zarr's own decode only wraps it in
        Buffers (from bytes, as an array, from bytes again), ≈3 µs of Python a chunk held under
        the GIL beside numcodecs' ≈25 µs of a 16 KiB zstd chunk; and ``out`` lets a caller
        decode into memory it reuses."""
        if len(self.bb) != 1 or type(self.bb[0]) not in _NUMCODECS:
            return None
        inner = getattr(self.bb[0], _NUMCODECS[type(self.bb[0])], None)
        decode = getattr(inner, "decode", None)
        return decode if isinstance(inner, numcodecs.abc.Codec) and callable(decode) else None

    def raw_dtype(self, spec: ArraySpec) -> np.dtype[Any] | None:
        """The dtype whose C-ordered bytes a stored chunk is, if the chain is only a
        native-endian ``bytes`` codec (the bytes can then be read straight into the result);
        else ``None``."""
        return None if self.bb else self.bytes_dtype(spec)

    def bytes_dtype(self, spec: ArraySpec) -> np.dtype[Any] | None:
        """The dtype whose C-ordered bytes a chunk is once its bytes-to-bytes codecs are
        undone (`decode_bytes`), if its array-to-bytes codec is a native-endian ``bytes`` codec
        and no array-to-array codec comes before it; else ``None``. Such a chunk is those bytes
        seen as an array, without the ``bytes`` codec's per-chunk work."""
        if self.aa or type(self.ab) is not BytesCodec:
            return None
        dtype = np.dtype(spec.dtype.to_native_dtype())
        if dtype.hasobject or dtype.names is not None or not dtype.isnative:
            return None
        # An Endian enum up to zarr 3.3, its value (a string) from zarr 3.4.
        endian = getattr(self.ab.endian, "value", self.ab.endian)
        if endian is not None and dtype.itemsize > 1 and endian != sys.byteorder:
            return None
        return dtype


# zarr's codecs that are a numcodecs codec (their attribute holding it) and nothing more.
_NUMCODECS: dict[type, str] = {ZstdCodec: "_zstd_codec", BloscCodec: "_blosc_codec"}
