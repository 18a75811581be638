"""``FsspecStore.from_upath``, as zarr's: a store at a universal_pathlib path, on S3 (moto's
server), in fsspec's memory and on the local disk."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from upath import UPath

from support.servers import S3Server
from zarr_anyio import FsspecStore


def _roundtrip(store: FsspecStore) -> None:
    array = zarr.create_array(store=store, shape=(20,), chunks=(5,), dtype="i2")
    array[:] = range(20)
    assert np.asarray(zarr.open_array(store=store, mode="r")[:]).tolist() == list(range(20))


def test_a_store_at_an_s3_upath_reads_and_writes(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    path = UPath(
        f"s3://{bucket}/upath.zarr/",
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
    )
    store = FsspecStore.from_upath(path, max_concurrency=4)
    assert store.fs is path.fs
    assert store.path == f"{bucket}/upath.zarr"
    assert store.max_concurrency == 4
    assert str(store) == f"s3://{bucket}/upath.zarr"
    _roundtrip(store)
    # The data is where the path says. (zarr's own from_upath fails on this very path: the
    # UPath's filesystem is a sync s3fs, whose session lives on fsspec's loop thread, which
    # zarr's store awaits from its own loop.)
    assert (path / "zarr.json").exists()
    assert sorted(child.name for child in (path / "c").iterdir()) == ["0", "1", "2", "3"]


def test_memory_upaths_and_read_only() -> None:
    path = UPath("memory://upath-test/a.zarr")
    _roundtrip(FsspecStore.from_upath(path))
    reader = FsspecStore.from_upath(path, read_only=True)
    assert reader.read_only
    assert np.asarray(zarr.open_array(store=reader, mode="r")[:]).tolist() == list(range(20))
    with pytest.raises(ValueError, match="read-only"):
        zarr.create_array(store=reader, shape=(2,), dtype="i1", overwrite=True)
