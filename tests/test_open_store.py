"""open_store: implicit store creation, as zarr does it from strings, paths and dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from servers import HTTPServer, S3Server
from zarr_anyio import (
    FsspecStore,
    LocalStore,
    MemoryStore,
    ObjectStore,
    ZipStore,
    open_store,
)

pytestmark = pytest.mark.anyio


def test_paths_dicts_and_memory(tmp_path: Path) -> None:
    local = open_store(tmp_path / "a.zarr", mode="w")
    assert isinstance(local, LocalStore)
    assert not local.read_only
    assert open_store(str(tmp_path / "a.zarr")).read_only  # mode "r" by default
    assert isinstance(open_store(f"file://{tmp_path}/b.zarr", mode="a"), LocalStore)
    zipped = open_store(tmp_path / "c.zip", mode="w")
    assert isinstance(zipped, ZipStore)
    zipped.close()
    data: dict[str, Any] = {}
    memory = open_store(data, mode="w")
    assert isinstance(memory, MemoryStore)
    zarr.create_array(store=memory, shape=(2,), dtype="int8")[:] = [1, 2]
    assert "c/0" in data
    assert isinstance(open_store("memory://scratch", mode="w"), MemoryStore)
    assert open_store(memory) is memory


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scheme"):
        open_store("ftp://example.invalid/data")
    with pytest.raises(ValueError, match="mode"):
        open_store(tmp_path, mode="rw")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot make a store"):
        open_store(42)  # type: ignore[arg-type]


def test_s3_urls_with_both_backends(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    fsspec_store = open_store(
        f"s3://{bucket}/data",
        mode="w",
        storage_options={
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
        },
    )
    assert isinstance(fsspec_store, FsspecStore)
    zarr.create_array(store=fsspec_store, shape=(3,), dtype="int16")[:] = [1, 2, 3]

    obstore_store = open_store(
        f"s3://{bucket}/data",
        backend="obstore",
        storage_options={
            "endpoint": s3_server.endpoint,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "region": "us-east-1",
            "client_options": {"allow_http": True},
        },
    )
    assert isinstance(obstore_store, ObjectStore)
    assert obstore_store.read_only
    np.testing.assert_array_equal(zarr.open_array(store=obstore_store, mode="r")[:], [1, 2, 3])


async def test_http_urls(http_server: HTTPServer) -> None:
    http_server.objects["data/c/0"] = b"hello"
    for backend in ("fsspec", "obstore"):
        store = open_store(
            f"{http_server.url}/data",
            backend=backend,  # type: ignore[arg-type]
            storage_options={"client_options": {"allow_http": True}}
            if backend == "obstore"
            else None,
        )
        value = await store.get("c/0", zarr.core.buffer.default_buffer_prototype())
        assert value is not None
        assert value.to_bytes() == b"hello"
