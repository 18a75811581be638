"""Array reads and writes cancelled at a random moment, through `zarr_anyio.api` and through our
codec pipeline driven directly, on a LocalStore, a ZipStore and a remote store on loopback.

Hypothesis picks the moment: a delay, or a number of chunk reads or writes the store has
finished. After the cancel, whatever the moment: no chunk read, write, decode or encode is
running, and none starts later (counted at the store, at the server and in a counting codec);
the store's tokens are all back; no temporary file is left; every chunk holds its old value or
its new one, whole; and the store reads and writes as before.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import anyio
import numpy as np
import pytest
import zarr
import zarr.storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.abc.codec import BytesBytesCodec
from zarr.abc.store import ByteRequest
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.indexing import BasicIndexer
from zarr.registry import register_codec

import zarr_anyio
import zarr_anyio.api as za
from support.remote import http_store
from support.servers import HTTPServer
from zarr_anyio.arrays import AnyioCodecPipeline

pytestmark = pytest.mark.anyio

OURS = "zarr_anyio.arrays.AnyioCodecPipeline"
LENGTH, CHUNK = 3000, 10
WINDOW = 4  # a remote store's requests in flight
OLD, NEW = 1, 2

# Few examples a run: each builds an array and cancels once; over many runs hypothesis tries
# many moments.
FEW = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Running:
    """Counts the calls running now and those started, from any thread."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now = 0
        self.started = 0

    @contextmanager
    def call(self) -> Iterator[None]:
        with self.lock:
            self.now += 1
            self.started += 1
        try:
            # Some time in each call, so that a cancel often lands while one runs.
            time.sleep(self.seconds)
            yield
        finally:
            with self.lock:
                self.now -= 1


CODEC_WORK = Running(0.001)


@dataclass(frozen=True)
class CountingCodec(BytesBytesCodec):
    """Bytes through unchanged, each decode and encode counted in `CODEC_WORK`: the pipeline's
    decode threads made visible."""

    is_fixed_size = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": "zarr_anyio_test_counting"}

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        with CODEC_WORK.call():
            return chunk_bytes

    def _encode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
        with CODEC_WORK.call():
            return chunk_bytes

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        return input_byte_length


register_codec("zarr_anyio_test_counting", CountingCodec)


class Counted:
    """A BlockingStore whose chunk reads and writes are counted in ``io`` (mixed in first)."""

    io: Running

    def _read_blocking(self, key: str, byte_range: ByteRequest | None) -> Any:
        with self.io.call():
            return super()._read_blocking(key, byte_range)  # type: ignore[misc]

    def _read_many_blocking(self, requests: Iterable[Any]) -> Generator[Any, None, None]:
        reads = super()._read_many_blocking(requests)  # type: ignore[misc]
        try:
            while True:
                with self.io.call():
                    got = next(reads, _END)
                if got is _END:
                    return
                yield got
        finally:
            reads.close()

    def _set_blocking(self, key: str, value: memoryview, check_cancelled: Any) -> None:
        with self.io.call():
            super()._set_blocking(key, value, check_cancelled)  # type: ignore[misc]

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        with self.io.lock:
            self.io.now += 1
            self.io.started += 1
        try:
            await super()._backend_set(key, value, exclusive=exclusive)  # type: ignore[misc]
        finally:
            with self.io.lock:
                self.io.now -= 1


_END = object()


class CountedLocal(Counted, zarr_anyio.LocalStore):
    io = Running(0.0002)


class CountedZip(Counted, zarr_anyio.ZipStore):
    io = Running(0.0002)


@dataclass
class Case:
    """An array of ``LENGTH`` elements in ``CHUNK``-element chunks, all ``OLD``, and how to see
    the I/O on it: ``started()`` / ``running()`` chunk operations, and the files it leaves."""

    store: Any
    started: Callable[[], int]
    running: Callable[[], int]
    folder: Path | None
    # A server counts a request when it reads it: requests sent before the cancel (at most one
    # per token) may still be on their way, and counted after it.
    in_transit: int = 0
    settled: Callable[[], bool] = lambda: True


def _create(store: Any, compressed: bool) -> None:
    """The array, written with zarr's own pipeline and sync API (in a worker thread: zarr's
    sync API must not run on the test's loop)."""
    array = zarr.create_array(
        store,
        shape=(LENGTH,),
        chunks=(CHUNK,),
        dtype="u2",
        fill_value=0,
        compressors=[CountingCodec()] if compressed else None,
    )
    array[:] = OLD


async def local_case(kind: str, folder: Path, compressed: bool) -> Case:
    if kind == "local":
        store: Any = CountedLocal(folder / "a.zarr")
    else:
        store = CountedZip(folder / "a.zip", mode="w")
    await anyio.to_thread.run_sync(_create, store, compressed)
    io = type(store).io
    return Case(store, lambda: io.started, lambda: io.now, folder)


async def remote_case(
    kind: str, server: HTTPServer, compressed: bool, *, writable: bool = False
) -> Case:
    memory = zarr.storage.MemoryStore()
    await anyio.to_thread.run_sync(_create, memory, compressed)
    server.objects.update({key: value.to_bytes() for key, value in memory._store_dict.items()})
    server.faults.delay = 0.001  # each request a little while in flight
    store = http_store(kind, server, max_concurrency=WINDOW, adaptive=False)
    if writable:  # obstore's HTTPStore writes with PUT, which the server takes whole
        store = store.with_read_only(False)
    # Requests counted at the server; the ones in flight, at the client (the server's own
    # threads finish answering a request whose client hung up: that is not ours to stop).
    limiter = store.limiter
    return Case(
        store,
        lambda: server.requests,
        lambda: limiter.statistics().borrowed_tokens,
        None,
        in_transit=WINDOW,
        settled=lambda: server.in_flight == 0,
    )


def _batch(array: Any, store: Any, selection: Any) -> list[Any]:
    """What zarr hands a pipeline for ``array[selection]`` (a 1-D array, regular chunks)."""
    metadata = array.metadata
    grid = getattr(array, "_chunk_grid", None) or metadata.chunk_grid
    spec = ArraySpec(
        shape=(CHUNK,),
        dtype=metadata.data_type,
        fill_value=metadata.fill_value,
        config=ArrayConfig.from_dict({}),
        prototype=default_buffer_prototype(),
    )
    return [
        (array.store_path / metadata.encode_chunk_key(coords), spec, chunk_sel, out_sel, whole)
        for coords, chunk_sel, out_sel, whole in BasicIndexer(selection, metadata.shape, grid)
    ]


async def _reader(store: Any, surface: str) -> Callable[[], Any]:
    """A whole-array read through ``surface``."""
    with zarr.config.set({"codec_pipeline.path": OURS}):
        array = await za.open_array(store=store, mode="r")
    if surface == "api":
        return lambda: array.getitem(slice(None))
    inner = array._zarr
    pipeline = inner.codec_pipeline
    assert isinstance(pipeline, AnyioCodecPipeline)
    out = default_buffer_prototype().nd_buffer.create(
        shape=(LENGTH,), dtype=np.dtype("u2"), fill_value=0
    )
    batch = _batch(inner, store, slice(None))
    return lambda: pipeline.read(batch, out)


async def _writer(store: Any, surface: str, start: int, stop: int) -> Callable[[], Any]:
    """A write of ``NEW`` to ``[start:stop]`` through ``surface``."""
    with zarr.config.set({"codec_pipeline.path": OURS}):
        array = await za.open_array(store=store, mode="r+")
    values = np.full(stop - start, NEW, dtype="u2")
    if surface == "api":
        return lambda: array.setitem(slice(start, stop), values)
    inner = array._zarr
    pipeline = inner.codec_pipeline
    assert isinstance(pipeline, AnyioCodecPipeline)
    value = default_buffer_prototype().nd_buffer.from_numpy_array(values)
    batch = _batch(inner, store, slice(start, stop))
    return lambda: pipeline.write(batch, value)


# Once something has started (a cancel before that is no test of what runs after it).
MOMENTS = st.one_of(
    st.tuples(st.just("delay"), st.floats(0.001, 0.03)),
    st.tuples(st.just("ops"), st.integers(1, LENGTH // CHUNK // 2)),
)


async def cancel_at(moment: tuple[str, float], case: Case, call: Callable[[], Any]) -> None:
    """Run ``call()`` and cancel it at ``moment``: after a delay, or once the store has seen
    that many chunk operations start (or at once if it ends first: then nothing is cancelled)."""
    kind, amount = moment
    before = case.started()
    ended = anyio.Event()

    async def run() -> None:
        await call()
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        if kind == "delay":
            with anyio.move_on_after(amount):
                await ended.wait()
        else:
            while case.started() - before < amount and not ended.is_set():
                await anyio.sleep(0.0005)
        tg.cancel_scope.cancel()


async def assert_quiet_after(case: Case) -> None:
    """Nothing runs now, and nothing starts after: no chunk I/O, no decode or encode."""
    assert case.running() == 0
    assert CODEC_WORK.now == 0
    io, codec = case.started(), CODEC_WORK.started
    # The requests on their way arrive (a fetch left running would go on sending more).
    seen = -1
    while case.started() != seen or not case.settled():
        seen = case.started()
        await anyio.sleep(0.01)
    assert case.started() <= io + case.in_transit
    await anyio.sleep(0.1)  # what a leftover thread or task would do, it would do by now
    # Still no more than were on their way: a fetch left running sends one request after another
    # (a millisecond each here). Not "none once the count stood still": on a loaded machine,
    # requests sent before the cancel reached the server's count after it had stood still for
    # 10 ms (CI: 3 more in the next 20 ms).
    assert case.started() <= io + case.in_transit
    assert CODEC_WORK.started == codec
    assert case.running() == 0
    limiter = case.store.limiter
    assert limiter.statistics().borrowed_tokens == 0


def assert_no_temporary_files(case: Case) -> None:
    if case.folder is None:
        return
    names = {p.relative_to(case.folder).as_posix() for p in case.folder.rglob("*") if p.is_file()}
    if (case.folder / "a.zip").exists():
        assert names == {"a.zip"}
        return
    chunks = {f"a.zarr/c/{i}" for i in range(LENGTH // CHUNK)}
    assert names <= {"a.zarr/zarr.json", *chunks}, sorted(names - chunks)[:5]


async def read_back(store: Any) -> np.ndarray[Any, Any]:
    with zarr.config.set({"codec_pipeline.path": OURS}):
        array = await za.open_array(store=store, mode="r")
    return np.asarray(await array.getitem(slice(None)))


def assert_whole_chunks(got: np.ndarray[Any, Any], start: int, stop: int) -> None:
    """Each chunk holds its old values, or the new ones where the write covered it: never a mix
    within a chunk; outside ``[start:stop]`` everything is old."""
    expected_new = np.full(LENGTH, OLD, dtype="u2")
    expected_new[start:stop] = NEW
    for first in range(0, LENGTH, CHUNK):
        chunk = got[first : first + CHUNK]
        old = np.full(CHUNK, OLD, dtype="u2")
        new = expected_new[first : first + CHUNK]
        assert np.array_equal(chunk, old) or np.array_equal(chunk, new), (first, chunk)


@contextmanager
def scratch() -> Iterator[Path]:
    # Each hypothesis example gets a folder of its own (tmp_path is one per test).
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


SURFACES = st.sampled_from(["api", "pipeline"])
REGIONS = st.tuples(st.integers(0, LENGTH - 1), st.integers(1, LENGTH)).filter(
    lambda r: r[0] < r[1]
)


async def read_cancelled(case: Case, moment: tuple[str, float], surface: str) -> None:
    """A whole read cancelled at ``moment``: quiet after, nothing left, the store as it was."""
    await cancel_at(moment, case, await _reader(case.store, surface))
    await assert_quiet_after(case)
    assert_no_temporary_files(case)
    np.testing.assert_array_equal(await read_back(case.store), OLD)
    case.store.close()


async def write_cancelled(
    case: Case, moment: tuple[str, float], surface: str, start: int, stop: int
) -> None:
    """A write of ``[start:stop]`` cancelled at ``moment``: quiet after, nothing left, whole
    chunks; then the same write, to its end, gives the new values."""
    await cancel_at(moment, case, await _writer(case.store, surface, start, stop))
    await assert_quiet_after(case)
    assert_no_temporary_files(case)
    assert_whole_chunks(await read_back(case.store), start, stop)
    await (await _writer(case.store, surface, start, stop))()
    expected = np.full(LENGTH, OLD, dtype="u2")
    expected[start:stop] = NEW
    np.testing.assert_array_equal(await read_back(case.store), expected)
    case.store.close()


@pytest.mark.parametrize("kind", ["local", "zip"])
@FEW
@given(moment=MOMENTS, surface=SURFACES, compressed=st.booleans())
async def test_a_read_cancelled_at_any_moment(
    kind: str, moment: tuple[str, float], surface: str, compressed: bool
) -> None:
    with scratch() as folder:
        await read_cancelled(await local_case(kind, folder, compressed), moment, surface)


@pytest.mark.parametrize("kind", ["fsspec", "obstore"])
@FEW
@given(moment=MOMENTS, surface=SURFACES, compressed=st.booleans())
async def test_a_remote_read_cancelled_at_any_moment(
    http_server: HTTPServer, kind: str, moment: tuple[str, float], surface: str, compressed: bool
) -> None:
    http_server.reset()
    await read_cancelled(await remote_case(kind, http_server, compressed), moment, surface)


@pytest.mark.parametrize("kind", ["local", "zip"])
@FEW
@given(moment=MOMENTS, surface=SURFACES, compressed=st.booleans(), region=REGIONS)
async def test_a_write_cancelled_at_any_moment(
    kind: str,
    moment: tuple[str, float],
    surface: str,
    compressed: bool,
    region: tuple[int, int],
) -> None:
    with scratch() as folder:
        case = await local_case(kind, folder, compressed)
        await write_cancelled(case, moment, surface, *region)


@FEW
@given(moment=MOMENTS, surface=SURFACES, compressed=st.booleans(), region=REGIONS)
async def test_a_remote_write_cancelled_at_any_moment(
    http_server: HTTPServer,
    moment: tuple[str, float],
    surface: str,
    compressed: bool,
    region: tuple[int, int],
) -> None:
    http_server.reset()
    case = await remote_case("obstore", http_server, compressed, writable=True)
    await write_cancelled(case, moment, surface, *region)
