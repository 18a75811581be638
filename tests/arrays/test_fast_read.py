"""`zarr_anyio.api`'s reads of a region of slices that skip zarr's per-chunk Python
(`zarr_anyio.arrays._fast_read`): the same result as zarr's own path, array for array, under
asyncio and trio, and taken exactly where it applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
import zarr.codecs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zarr_anyio
import zarr_anyio.api as za
from support.arrays import OURS, ZARRS, arrays_and_data, opened, pipeline
from zarr_anyio.arrays._pipeline import AnyioCodecPipeline

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class _Taken:
    count = 0


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> _Taken:
    """How many reads went the fast way (each is one `_read_keys` of the pipeline, or one
    `_read_remote_keys` for a store that is no BlockingStore)."""
    seen = _Taken()
    for name in ("_read_keys", "_read_remote_keys"):
        real = getattr(AnyioCodecPipeline, name)

        async def counted(self: AnyioCodecPipeline, *args: Any, real: Any = real) -> None:
            seen.count += 1
            await real(self, *args)

        monkeypatch.setattr(AnyioCodecPipeline, name, counted)
    return seen


@st.composite
def slices(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A region of slices: any start, stop and positive step, out of bounds too."""
    return tuple(
        slice(
            draw(st.none() | st.integers(-n - 2, n + 2)),
            draw(st.none() | st.integers(-n - 2, n + 2)),
            draw(st.none() | st.integers(1, n + 1)),
        )
        for n in shape
    )


def _read(store: Any, path: str, selection: Any, backend: str) -> Any:
    async def read() -> Any:
        with zarr.config.set({"codec_pipeline.path": OURS}):
            arr = await za.open_array(store=store, path=path, mode="r")
        return await arr.getitem(selection)

    return anyio.run(read, backend=backend)


@SETTINGS
@given(data=st.data(), backend=st.sampled_from(["asyncio", "trio"]))
def test_slices_read_as_zarr_reads_them(
    data: st.DataObject, backend: str, tmp_path: Path, taken: _Taken
) -> None:
    array, expected, store = data.draw(arrays_and_data(tmp_path))
    selection = data.draw(slices(array.shape))
    theirs: Any = opened(store, ZARRS)[selection]
    taken.count = 0
    got = _read(store, array.path, selection, backend)
    np.testing.assert_array_equal(got, expected[selection])
    np.testing.assert_array_equal(got, theirs)
    assert got.dtype == theirs.dtype
    assert got.flags.f_contiguous == theirs.flags.f_contiguous


def _reads_each_fast_with_missing_chunks(
    store: Any, path: str, zarr_format: int, backend: str, taken: _Taken
) -> None:
    """An array at ``path`` with its last chunks missing reads as zarr's does, each region of
    slices the fast way."""
    values = np.arange(30 * 20, dtype="i4").reshape(30, 20)
    with pipeline(ZARRS):
        array = zarr.create_array(
            store,
            name=path,
            shape=(30, 20),
            chunks=(7, 6),
            dtype="i4",
            fill_value=-3,
            zarr_format=zarr_format,  # type: ignore[arg-type]
        )
        array[:14] = values[:14]  # the chunks of rows 14 on are missing
    expected = values.copy()
    expected[14:] = -3
    selections: list[Any] = [(slice(None),), (slice(3, 25, 2), slice(None, None, 3)), Ellipsis]
    for selection in selections:
        taken.count = 0
        got = _read(store, path, selection, backend)
        np.testing.assert_array_equal(got, expected[selection])
        assert taken.count == 1


@pytest.mark.parametrize("kind", ["local", "zip"])
@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_it_is_taken_for_a_blocking_store_and_fills_missing_chunks(
    tmp_path: Path, kind: str, zarr_format: int, backend: str, taken: _Taken
) -> None:
    store: Any = (
        zarr_anyio.LocalStore(tmp_path / "a")
        if kind == "local"
        else zarr_anyio.ZipStore(tmp_path / "a.zip", mode="a")
    )
    _reads_each_fast_with_missing_chunks(store, "in/a/group", zarr_format, backend, taken)
    if kind == "zip":
        store.close()


@pytest.mark.parametrize(
    "selection",
    [
        (3, slice(None)),  # an integer: an axis dropped
        ([1, 4], slice(None)),  # a list: orthogonal, advanced
        (slice(5, 5),),  # nothing
    ],
    ids=["integer", "list", "empty"],
)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_other_selections_go_zarrs_way(
    tmp_path: Path, selection: Any, backend: str, taken: _Taken
) -> None:
    store = zarr_anyio.LocalStore(tmp_path / "a")
    values = np.arange(30 * 20, dtype="f8").reshape(30, 20)
    with pipeline(ZARRS):
        zarr.create_array(store, shape=(30, 20), chunks=(7, 6), dtype="f8")[:] = values
    got = _read(store, "", selection, backend)
    np.testing.assert_array_equal(
        got, values[selection] if selection[0] != [1, 4] else values[[1, 4]]
    )
    assert taken.count == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sharded_arrays_and_zarrs_stores_go_zarrs_way(
    tmp_path: Path, backend: str, taken: _Taken
) -> None:
    values = np.arange(32 * 32, dtype="u2").reshape(32, 32)
    for store, shards in [
        (zarr.storage.MemoryStore(), None),
        (zarr_anyio.LocalStore(tmp_path / "sharded"), (16, 16)),
    ]:
        with pipeline(ZARRS):
            zarr.create_array(store, shape=(32, 32), chunks=(8, 8), shards=shards, dtype="u2")[
                :
            ] = values
        np.testing.assert_array_equal(_read(store, "", slice(None), backend), values)
    assert taken.count == 0


def _other_stores(tmp_path: Path, limiter: Any = None) -> dict[str, Any]:
    """zarr_anyio stores that are no BlockingStore: in memory, fsspec's (memory, a sync file
    system), obstore's (its async API: awaited on the bridge's loop under trio)."""
    from obstore.store import MemoryStore as ObstoreMemory

    bound: dict[str, Any] = {} if limiter is None else {"limiter": limiter}
    return {
        "memory": zarr_anyio.MemoryStore(**bound),
        "fsspec": zarr_anyio.FsspecStore.from_url(
            f"memory://{tmp_path.name}/fast", adaptive=False, **bound
        ),
        "obstore": zarr_anyio.ObjectStore(ObstoreMemory(), adaptive=False, **bound),
    }


@pytest.mark.parametrize("kind", ["memory", "fsspec", "obstore"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_it_is_taken_for_other_zarr_anyio_stores_and_fills_missing_chunks(
    tmp_path: Path, kind: str, backend: str, taken: _Taken
) -> None:
    # Their chunks are fetched by the pipeline's tasks, on the loop the store's requests are
    # made on: under trio, the bridge's asyncio loop (obstore's futures are asyncio's).
    _reads_each_fast_with_missing_chunks(_other_stores(tmp_path)[kind], "", 3, backend, taken)


@pytest.mark.parametrize("dtype", ["f8", "i4", "f4"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_chunks_of_the_other_byte_order_are_decoded_not_read_straight_in(
    tmp_path: Path, dtype: str, backend: str
) -> None:
    # A float64 once went straight in: NumPy's ``dtype("f8") == None`` is true.
    store = zarr_anyio.LocalStore(tmp_path / "a")
    values = np.arange(24, dtype=dtype).reshape(4, 6)
    with pipeline(ZARRS):
        zarr.create_array(
            store,
            shape=(4, 6),
            chunks=(2, 6),
            dtype=dtype,
            serializer=zarr.codecs.BytesCodec(endian="big"),
        )[:] = values
    np.testing.assert_array_equal(_read(store, "", slice(None), backend), values)
    np.testing.assert_array_equal(opened(store, OURS)[:], values)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_one_loop_limiter_is_taken_on_the_loop_zarrs_path_runs_on(
    tmp_path: Path, backend: str, taken: _Taken
) -> None:
    # Under trio, zarr's path (the metadata read of ``open_array`` among it) runs on the
    # bridge's asyncio loop, which an anyio.CapacityLimiter then belongs to: the fast path,
    # reading on trio's loop, once took it there too and raised a RuntimeError.
    values = np.arange(40 * 30, dtype="f4").reshape(40, 30)
    with pipeline(ZARRS):
        zarr.create_array(
            zarr_anyio.LocalStore(tmp_path / "a"), shape=(40, 30), chunks=(8, 7), dtype="f4"
        )[:] = values
    limiter = anyio.CapacityLimiter(2)
    store = zarr_anyio.LocalStore(tmp_path / "a", limiter=limiter)

    async def read() -> list[Any]:
        with zarr.config.set({"codec_pipeline.path": OURS}):
            arr = await za.open_array(store=store, mode="r")
        return [await arr.getitem((slice(3, 37), slice(None))), await arr.getitem(5)]

    region, row = anyio.run(read, backend=backend)
    np.testing.assert_array_equal(region, values[3:37])
    np.testing.assert_array_equal(row, values[5])
    assert taken.count == (1 if backend == "asyncio" else 0)
    assert limiter.borrowed_tokens == 0


@pytest.mark.parametrize("kind", ["memory", "fsspec", "obstore"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_one_loop_limiter_of_another_store_is_taken_where_zarrs_path_takes_it(
    tmp_path: Path, kind: str, backend: str, taken: _Taken
) -> None:
    # The fast path of a store that is no BlockingStore reads on the caller's loop under
    # asyncio and on the bridge's under trio, where zarr's path takes the limiter too.
    limiter = anyio.CapacityLimiter(2)
    store = _other_stores(tmp_path, limiter)[kind]
    values = np.arange(40 * 30, dtype="f4").reshape(40, 30)
    with pipeline(ZARRS):
        zarr.create_array(store, shape=(40, 30), chunks=(8, 7), dtype="f4")[:] = values

    async def read() -> Any:
        with zarr.config.set({"codec_pipeline.path": OURS}):
            arr = await za.open_array(store=store, mode="r")
        return await arr.getitem((slice(3, 37), slice(None)))

    taken.count = 0
    np.testing.assert_array_equal(anyio.run(read, backend=backend), values[3:37])
    assert taken.count == 1
    assert limiter.borrowed_tokens == 0
