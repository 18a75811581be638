"""xarray and dask on every store: ``to_zarr``/``open_zarr`` with dask arrays in and out,
``region=`` and ``append_dim=``; and a ``dask.distributed`` cluster of worker processes
(2 workers, 1 thread each) reading and writing through LocalStore, ObjectStore and FsspecStore
on moto's S3 server, with the refusals of the stores that cannot be shared between processes
and the concurrency bound per worker process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array
import numpy as np
import pytest
import xarray as xr
import zarr

from support.servers import HTTPServer, S3Server
from zarr_anyio import (
    AnyioStore,
    FsspecStore,
    LocalStore,
    MemoryStore,
    ObjectStore,
    ZipStore,
)

KINDS = ["memory", "local", "zip", "fsspec-s3", "obstore-s3"]
ZARR = {"zarr_format": 3, "consolidated": False}


def dataset(start: int = 0, length: int = 12) -> xr.Dataset:
    time = np.arange(start, start + length)
    values = np.arange(start * 4, (start + length) * 4, dtype="float64").reshape(length, 4)
    return xr.Dataset(
        {"t": (("time", "x"), values)},
        coords={"time": time, "x": np.arange(4)},
        attrs={"title": "test"},
    )


@pytest.fixture
def make_store(tmp_path: Path, s3_server: S3Server) -> Callable[[str], AnyioStore]:
    def make(kind: str) -> AnyioStore:
        if kind == "memory":
            return MemoryStore()
        if kind == "local":
            return LocalStore(tmp_path / "data.zarr")
        if kind == "zip":
            return ZipStore(tmp_path / "data.zip", mode="w")
        bucket = s3_server.new_bucket()
        if kind == "fsspec-s3":
            return FsspecStore.from_url(
                f"s3://{bucket}/data.zarr",
                storage_options={
                    "key": "testing",
                    "secret": "testing",
                    "client_kwargs": {
                        "endpoint_url": s3_server.endpoint,
                        "region_name": "us-east-1",
                    },
                },
            )
        return ObjectStore(s3_server.obstore(bucket, prefix="data.zarr"))

    return make


def opened(store: AnyioStore) -> xr.Dataset:
    dataset: xr.Dataset = xr.open_zarr(store, **ZARR)  # type: ignore[arg-type]
    return dataset


# ---------------------------------------------------------------------- xarray, dask threads


@pytest.mark.parametrize("kind", KINDS)
def test_to_zarr_and_open_zarr_with_dask_arrays(
    make_store: Callable[[str], AnyioStore], kind: str
) -> None:
    store = make_store(kind)
    original = dataset().chunk({"time": 5})  # dask arrays in: written chunk by chunk
    original.to_zarr(store, mode="w", **ZARR)  # type: ignore[call-overload]
    back = opened(store)
    assert isinstance(back["t"].data, dask.array.Array)  # dask arrays out
    xr.testing.assert_identical(back.compute(), dataset())
    assert back.attrs["title"] == "test"
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_region_writes(make_store: Callable[[str], AnyioStore], kind: str) -> None:
    store = make_store(kind)
    full = dataset()
    # The template: metadata and coordinates now, the data by region after.
    full.chunk({"time": 4}).to_zarr(store, mode="w", compute=False, **ZARR)  # type: ignore[call-overload]
    for start in (0, 4, 8):
        part = full.isel(time=slice(start, start + 4)).drop_vars(["x"])
        part.to_zarr(store, region={"time": slice(start, start + 4)}, **ZARR)  # type: ignore[call-overload]
    xr.testing.assert_identical(opened(store).compute(), full)
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_append_dim(make_store: Callable[[str], AnyioStore], kind: str) -> None:
    store = make_store(kind)
    dataset(0, 6).chunk({"time": 3}).to_zarr(store, mode="w", **ZARR)  # type: ignore[call-overload]
    dataset(6, 6).chunk({"time": 3}).to_zarr(store, append_dim="time", **ZARR)  # type: ignore[call-overload]
    xr.testing.assert_identical(opened(store).compute(), dataset(0, 12))
    store.close()


# ---------------------------------------------------------------------- dask.distributed


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Two worker processes with one thread each; only the tests that ask for it use it."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(  # type: ignore[no-untyped-call]
            cluster, set_as_default=False, timeout="60s"
        ) as client,
    ):
        yield client


def on_cluster(client: Any, work: Callable[[], Any]) -> tuple[Any, set[str]]:
    """Run ``work`` with dask computing on the cluster; what it gave, and the workers that ran
    its tasks."""
    from distributed import get_task_stream

    with dask.config.set(scheduler=client), get_task_stream(client) as stream:
        result = work()
    return result, {task["worker"] for task in stream.data}


@pytest.mark.parametrize("kind", ["local", "fsspec-s3", "obstore-s3"])
def test_worker_processes_write_and_read(
    client: Any, make_store: Callable[[str], AnyioStore], kind: str
) -> None:
    store = make_store(kind)
    original = dataset(0, 24).chunk({"time": 3})
    _, writers = on_cluster(client, lambda: original.to_zarr(store, mode="w", **ZARR))  # type: ignore[call-overload]
    assert writers  # the chunks were written by worker processes
    back, readers = on_cluster(client, lambda: opened(store).compute())
    assert readers
    xr.testing.assert_identical(back, dataset(0, 24))
    # Region writes from the workers too.
    update = dataset(0, 24).isel(time=slice(6, 12)).drop_vars("x") * 2
    on_cluster(
        client,
        lambda: update.chunk({"time": 3}).to_zarr(store, region={"time": slice(6, 12)}, **ZARR),  # type: ignore[call-overload]
    )
    back, _ = on_cluster(client, lambda: opened(store).compute())
    np.testing.assert_array_equal(back["t"][6:12].values, update["t"].values)


def test_a_writable_zip_store_is_refused_by_worker_processes(client: Any, tmp_path: Path) -> None:
    store = ZipStore(tmp_path / "data.zip", mode="w")
    original = dataset(0, 12).chunk({"time": 3})
    with pytest.raises(RuntimeError, match=r"A zip file takes one writer.*with_read_only\(\)"):
        on_cluster(client, lambda: original.to_zarr(store, mode="w", **ZARR))  # type: ignore[call-overload]
    # What the message says: write from this process, close, and read in the workers.
    with dask.config.set(scheduler="threads"):
        original.to_zarr(store, mode="w", **ZARR)  # type: ignore[call-overload]
    store.close()
    back, readers = on_cluster(client, lambda: opened(store).compute())
    assert readers
    xr.testing.assert_identical(back, dataset(0, 12))


def test_a_memory_store_refuses_writes_from_worker_processes(client: Any) -> None:
    store = MemoryStore()
    original = dataset(0, 12).chunk({"time": 3})
    with pytest.raises(RuntimeError, match="would never reach that store"):
        on_cluster(client, lambda: original.to_zarr(store, mode="w", **ZARR))  # type: ignore[call-overload]
    # Written in this process, it is read by the workers (each gets a snapshot).
    with dask.config.set(scheduler="threads"):
        original.to_zarr(store, mode="w", **ZARR)  # type: ignore[call-overload]
    back, readers = on_cluster(client, lambda: opened(store).compute())
    assert readers
    xr.testing.assert_identical(back, dataset(0, 12))


def test_the_bound_is_per_store_per_worker_process(client: Any, http_server: HTTPServer) -> None:
    """Each worker process holds one copy of the store's limiter: with 2 workers and
    ``max_concurrency=2``, at most 4 requests are in flight at the server."""
    from obstore.store import HTTPStore

    source = MemoryStore()
    with dask.config.set(scheduler="threads"):
        dataset(0, 64).chunk({"time": 2}).to_zarr(source, mode="w", **ZARR)  # type: ignore[call-overload]
    for key, value in source._store_dict.items():
        http_server.objects[f"data.zarr/{key}"] = value.to_bytes()
    http_server.faults.delay = 0.02  # each request takes a while: they overlap

    def most_in_flight(bound: int) -> int:
        http_server.most_in_flight = 0
        store = ObjectStore(
            HTTPStore.from_url(f"{http_server.url}/data.zarr", client_options={"allow_http": True}),
            read_only=True,
            max_concurrency=bound,
            adaptive=False,
        )
        # HTTP cannot list, so the array is opened by its path (no xarray, which lists).
        zarray = zarr.open_array(store=store, path="t", mode="r")
        # 8 zarr chunks a task
        array = dask.array.from_zarr(zarray, chunks=(16, 4))  # type: ignore[no-untyped-call]
        back, readers = on_cluster(client, lambda: array.compute())
        assert len(readers) == 2
        np.testing.assert_array_equal(back, dataset(0, 64)["t"].values)
        return http_server.most_in_flight

    assert most_in_flight(2) <= 2 * 2
    # The server sees more than that without the bound: the count above could have failed.
    assert most_in_flight(32) > 2 * 2
