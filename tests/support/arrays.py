"""What the array API tests share: the backends they run under, stores that count their I/O, and
the reads that compare our codec pipeline with zarr's."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
import pytest
import zarr
import zarr.codecs
import zarr.storage
from hypothesis import strategies as st
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.testing.strategies import basic_indices, orthogonal_indices

from zarr_anyio import LocalStore, MemoryStore, ZipStore

if sys.platform != "win32":
    # Part of the test extra wherever uvloop exists: imported, not skipped, so CI cannot lose it.
    import uvloop

    UVLOOP: list[Any] = [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]
    UVLOOP_CLASS = uvloop.Loop
else:  # pragma: no cover
    UVLOOP = []
    UVLOOP_CLASS = None

BACKENDS = ["asyncio", "trio", *UVLOOP]

T = TypeVar("T")


def chunk_key(key: str) -> bool:
    """Whether ``key`` names a chunk (v3 ``c/…`` or v2 ``0.1``), not metadata."""
    name = key.rsplit("/", 1)[-1]
    return key.startswith("c/") or "/c/" in key or name.replace(".", "").isdigit()


class CountingStore(MemoryStore):
    """A MemoryStore whose chunk reads and writes take ``delay`` seconds, each holding a token.

    It counts the chunk operations running now (``now``), the most seen at once (``most``), how
    many started (``started``) and the threads they ran in. A cancelled operation takes
    ``stop_delay`` more seconds to stop (shielded), as a real request takes time to wind down, so a
    caller that does not wait for its work to end would see ``now > 0``.
    """

    def __init__(
        self,
        store_dict: dict[str, Buffer] | None = None,
        *,
        delay: float = 0.0,
        stop_delay: float = 0.02,
        fail_on: Iterable[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(store_dict, **kwargs)
        self.delay = delay
        self.stop_delay = stop_delay
        self.fail_on = set(fail_on)
        self.now = 0
        self.most = 0
        self.started = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def with_read_only(self, read_only: bool = False) -> CountingStore:
        copy = type(self)(self._store_dict, read_only=read_only, **self._store_kwargs())  # type: ignore[arg-type]
        copy.delay, copy.stop_delay, copy.fail_on = self.delay, self.stop_delay, self.fail_on
        return copy

    async def _io(self, key: str, action: Callable[[], Awaitable[T]], *, reading: bool) -> T:
        """``action()`` (the real read or write), counted, after ``delay``, holding a token."""
        if not chunk_key(key):
            return await action()
        async with self._limit.current():
            with self._lock:
                self.now += 1
                self.started += 1
                self.most = max(self.most, self.now)
                self.threads.add(threading.current_thread().name)
            try:
                if reading and key in self.fail_on:
                    raise OSError(f"injected failure reading {key}")
                if self.delay:
                    await anyio.sleep(self.delay)
                return await action()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(self.stop_delay)
                raise
            finally:
                with self._lock:
                    self.now -= 1

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        return await self._io(
            key, lambda: MemoryStore._backend_get(self, key, prototype, byte_range), reading=True
        )

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        await self._io(
            key,
            lambda: MemoryStore._backend_set(self, key, value, exclusive=exclusive),
            reading=False,
        )

    def chunk_keys(self) -> list[str]:
        return sorted(key for key in self._store_dict if chunk_key(key))


# ---------------------------------------------------------------- our pipeline against zarr's

OURS = "zarr_anyio.arrays.AnyioCodecPipeline"
ZARRS = "zarr.core.codec_pipeline.BatchedCodecPipeline"
STORE_KINDS = ["local", "memory", "zarr-memory", "zip"]


@contextmanager
def pipeline(path: str) -> Iterator[None]:
    """zarr's API, while it lasts, makes arrays with the codec pipeline ``path``."""
    with zarr.config.set({"codec_pipeline.path": path}):
        yield


def opened(store: Any, path: str) -> zarr.Array[Any]:
    """The array in ``store``, opened so that it reads through the pipeline ``path``."""
    with pipeline(path):
        array = zarr.open_array(store, mode="r+")
    assert type(array._async_array.codec_pipeline).__name__ == path.rsplit(".", 1)[1]
    return array


def new_store(kind: str, root: Path) -> Any:
    """An empty store of one of `STORE_KINDS` (files under ``root``)."""
    if kind == "local":
        return LocalStore(root / uuid.uuid4().hex)
    if kind == "memory":
        return MemoryStore()
    if kind == "zip":
        return ZipStore(root / f"{uuid.uuid4().hex}.zip", mode="w")
    return zarr.storage.MemoryStore()


# Masks of at most this many elements are drawn element by element (shrinkable); hypothesis
# refuses lists of more than about 8,000 (the sharded arrays drawn reach 41 x 41 x 41).
MASK_DRAWN = 4096


def compare_reads(
    data: st.DataObject,
    ours: zarr.Array[Any],
    theirs: zarr.Array[Any],
    expected: np.ndarray[Any, Any],
    times: int = 3,
) -> None:
    """Random selections of every kind read through ``ours`` and ``theirs``: both give what
    ``expected`` (the array as NumPy) does."""
    shape = ours.shape
    for _ in range(times):
        kind = data.draw(st.sampled_from(["basic", "orthogonal", "coordinate", "mask", "block"]))
        if kind == "basic":
            selection = data.draw(basic_indices(shape=shape))
            np.testing.assert_array_equal(ours[selection], theirs[selection])
            np.testing.assert_array_equal(ours[selection], expected[selection])
        elif kind == "orthogonal":
            zarr_sel, numpy_sel = data.draw(orthogonal_indices(shape=shape))
            np.testing.assert_array_equal(ours.oindex[zarr_sel], expected[numpy_sel])
        elif kind == "coordinate":
            # In any order, the same point more than once.
            count = data.draw(st.integers(1, 8))
            coords = tuple(
                np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=count, max_size=count)))
                for n in shape
            )
            np.testing.assert_array_equal(ours.vindex[coords], expected[coords])
        elif kind == "mask":
            if expected.size <= MASK_DRAWN:
                mask = np.array(
                    data.draw(
                        st.lists(st.booleans(), min_size=expected.size, max_size=expected.size)
                    )
                ).reshape(expected.shape)
            else:
                # Hypothesis draws no list this long: a mask of a drawn density and seed.
                density = data.draw(st.floats(0, 1))
                seed = data.draw(st.integers(0, 2**32 - 1))
                mask = np.random.default_rng(seed).random(expected.shape) < density
            np.testing.assert_array_equal(ours.vindex[mask], expected[mask])
        else:
            block = tuple(
                data.draw(st.integers(0, -(-n // c) - 1))
                for n, c in zip(shape, ours.shards or ours.chunks, strict=True)
            )
            np.testing.assert_array_equal(ours.blocks[block], theirs.blocks[block])


# ---------------------------------------------------------------- arrays of every kind

CODECS = [
    "raw",
    "zstd",
    "blosc",
    "gzip+crc32c",
    "transpose+zstd",
    "big-endian",
    "sharding",
    "sharding+zstd-inner",
    "v2-zlib",
    "v2-raw",
]


def create_kind(
    store: Any,
    kind: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    fill_value: int,
    write_empty: bool,
) -> zarr.Array[Any]:
    common: dict[str, Any] = {
        "shape": shape,
        "dtype": dtype,
        "fill_value": fill_value,
        "config": {"write_empty_chunks": write_empty},
    }
    if kind.startswith("v2"):
        compressor: Any = None
        if kind == "v2-zlib":
            import numcodecs

            compressor = numcodecs.Zlib(level=1)
        return zarr.create_array(
            store, chunks=chunks, zarr_format=2, compressors=compressor, **common
        )
    serializer: Any = "auto"
    filters: Any = None
    compressors: Any = None
    shards = None
    if kind == "zstd":
        compressors = zarr.codecs.ZstdCodec(level=1)
    elif kind == "blosc":
        compressors = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    elif kind == "gzip+crc32c":
        compressors = [zarr.codecs.GzipCodec(level=1), zarr.codecs.Crc32cCodec()]
    elif kind == "transpose+zstd":
        filters = [zarr.codecs.TransposeCodec(order=tuple(reversed(range(len(shape)))))]
        compressors = zarr.codecs.ZstdCodec(level=1)
    elif kind == "big-endian":
        serializer = zarr.codecs.BytesCodec(endian="big")
    elif kind.startswith("sharding"):
        # A shard of up to two chunks per dimension, the last shard partial.
        shards = tuple(c * 2 for c in chunks)
        if kind == "sharding+zstd-inner":
            compressors = zarr.codecs.ZstdCodec(level=1)
    return zarr.create_array(
        store,
        chunks=chunks,
        shards=shards,
        serializer=serializer,
        filters=filters,
        compressors=compressors,
        **common,
    )


@st.composite
def arrays_and_data(
    draw: st.DrawFn, tmp_root: Path, codecs: list[str] = CODECS
) -> tuple[zarr.Array[Any], np.ndarray, Any]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, n + 1)) for n in shape)
    kind = draw(st.sampled_from(codecs))
    dtype = draw(st.sampled_from(["i2", "f4", "u1", "f8"]))
    if kind == "big-endian" and dtype == "u1":
        dtype = "i4"
    fill_value = draw(st.integers(0, 5))
    write_empty = draw(st.booleans())
    store = new_store(draw(st.sampled_from(STORE_KINDS)), tmp_root)
    with pipeline(ZARRS):
        array = create_kind(store, kind, shape, chunks, dtype, fill_value, write_empty)
        data = np.full(shape, fill_value, dtype=dtype)
        # Some chunks written, some left missing, some holding only the fill value.
        region = draw(basic_indices(shape=shape, allow_ellipsis=False))
        values = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) % 7
        data[region] = values[region]
        array[region] = values[region]
    return array, data, store
