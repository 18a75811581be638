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
            mask = np.array(
                data.draw(st.lists(st.booleans(), min_size=expected.size, max_size=expected.size))
            ).reshape(expected.shape)
            np.testing.assert_array_equal(ours.vindex[mask], expected[mask])
        else:
            block = tuple(
                data.draw(st.integers(0, -(-n // c) - 1))
                for n, c in zip(shape, ours.shards or ours.chunks, strict=True)
            )
            np.testing.assert_array_equal(ours.blocks[block], theirs.blocks[block])
