"""zarr-python's own store contract, ``zarr.testing.store.StoreTests``, and zarr_anyio's (the
limit held, cancellation, bad keys), for every store: through `zarr_anyio.testing`, the harness
authors of custom stores use too, under asyncio and trio."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype

from support.servers import S3Server
from zarr_anyio import FsspecStore, LocalStore, MemoryStore, ObjectStore, ZipStore
from zarr_anyio.testing import AnyioStoreTests


class TestMemoryStore(AnyioStoreTests[MemoryStore]):
    store_cls = MemoryStore
    # A dict lookup does no I/O: the harness checks that it never waits for a token.
    waits_for_tokens = False

    async def set(self, store: MemoryStore, key: str, value: Buffer) -> None:
        store._store_dict[key] = value

    async def get(self, store: MemoryStore, key: str) -> Buffer:
        return store._store_dict[key]

    @pytest.fixture
    def store_kwargs(self) -> dict[str, Any]:
        return {"store_dict": {}}

    def test_store_repr(self, store: MemoryStore) -> None:
        assert str(store) == f"memory://{id(store._store_dict)}"
        assert repr(store) == f"MemoryStore('memory://{id(store._store_dict)}')"

    def test_store_supports_writes(self, store: MemoryStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: MemoryStore) -> None:
        assert store.supports_listing


class TestLocalStore(AnyioStoreTests[LocalStore]):
    store_cls = LocalStore

    async def set(self, store: LocalStore, key: str, value: Buffer) -> None:
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value.to_bytes())

    async def get(self, store: LocalStore, key: str) -> Buffer:
        return default_buffer_prototype().buffer.from_bytes((store.root / key).read_bytes())

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> dict[str, Any]:
        return {"root": str(tmp_path)}

    def test_store_repr(self, store: LocalStore) -> None:
        assert str(store) == f"file://{store.root.as_posix()}"
        assert repr(store) == f"LocalStore('file://{store.root.as_posix()}')"

    def test_store_supports_writes(self, store: LocalStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: LocalStore) -> None:
        assert store.supports_listing

    def test_leaves_no_temporary_files(self, store: LocalStore) -> None:
        store.set_sync("a/b", cpu.Buffer.from_bytes(b"x"))
        assert os.listdir(store.root / "a") == ["b"]


class TestZipStore(AnyioStoreTests[ZipStore]):
    store_cls = ZipStore

    async def set(self, store: ZipStore, key: str, value: Buffer) -> None:
        # The store owns the open archive; its blocking internals are the only other way in.
        store._write_blocking(key, value.to_bytes(), exclusive=False)

    async def get(self, store: ZipStore, key: str) -> Buffer:
        data = store._read_blocking(key, None)
        assert data is not None
        return cpu.Buffer.from_bytes(data)

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> dict[str, Any]:
        return {"path": str(tmp_path / "store.zip"), "mode": "w", "read_only": False}

    def test_store_repr(self, store: ZipStore) -> None:
        assert str(store) == f"zip://{store.path}"
        assert repr(store) == f"ZipStore('zip://{store.path}')"

    def test_store_supports_writes(self, store: ZipStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ZipStore) -> None:
        assert store.supports_listing

    # As in zarr's own tests of its ZipStore: a read-only zip store reads an archive that
    # exists, so these two make one first instead of opening with mode="w".
    async def test_read_only_store_raises(self, store_kwargs: dict[str, Any]) -> None:
        (await self.store_cls.open(**store_kwargs)).close()
        store = await self.store_cls.open(**{**store_kwargs, "mode": "a", "read_only": True})
        assert store.read_only
        with pytest.raises(ValueError, match="read-only"):
            await store.set("foo", cpu.Buffer.from_bytes(b"bar"))
        with pytest.raises(ValueError, match="read-only"):
            await store.delete("foo")

    @pytest.mark.parametrize("read_only", [True, False])
    async def test_store_open_read_only(
        self, store_kwargs: dict[str, Any], read_only: bool
    ) -> None:
        if read_only:
            with zipfile.ZipFile(store_kwargs["path"], mode="w"):
                pass
        await super().test_store_open_read_only(store_kwargs, read_only)


class FsspecHarness(AnyioStoreTests[FsspecStore]):
    """Reads and writes for the harness go straight to the filesystem, not through the store."""

    async def set(self, store: FsspecStore, key: str, value: Buffer) -> None:
        fs = store.fs
        path = f"{store.path.rstrip('/')}/{key}"
        if getattr(fs, "asynchronous", False):
            await anyio.to_thread.run_sync(lambda: sync_fs(fs).pipe_file(path, value.to_bytes()))
        else:
            await anyio.to_thread.run_sync(lambda: fs.pipe_file(path, value.to_bytes()))

    async def get(self, store: FsspecStore, key: str) -> Buffer:
        fs = sync_fs(store.fs) if getattr(store.fs, "asynchronous", False) else store.fs
        path = f"{store.path.rstrip('/')}/{key}"
        return cpu.Buffer.from_bytes(await anyio.to_thread.run_sync(lambda: fs.cat_file(path)))

    def test_store_repr(self, store: FsspecStore) -> None:
        assert repr(store) == f"<FsspecStore({type(store.fs).__name__}, {store.path})>"

    def test_store_supports_writes(self, store: FsspecStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: FsspecStore) -> None:
        assert store.supports_listing


def sync_fs(fs: Any) -> Any:
    """A blocking twin of an async filesystem instance, for the harness's own reads/writes."""
    return type(fs)(*fs.storage_args, **{**fs.storage_options, "asynchronous": False})


class TestFsspecStoreS3(FsspecHarness):
    store_cls = FsspecStore

    @pytest.fixture
    def store_kwargs(self, s3_server: S3Server) -> dict[str, Any]:
        bucket = s3_server.new_bucket()
        return {"fs": s3_server.s3fs(asynchronous=False), "path": f"{bucket}/root"}


class TestFsspecStoreS3Async(FsspecHarness):
    """An ``asynchronous=True`` s3fs, as ``from_url`` makes: it runs on the bridge's loop."""

    store_cls = FsspecStore

    @pytest.fixture
    def store_kwargs(self, s3_server: S3Server) -> dict[str, Any]:
        bucket = s3_server.new_bucket()
        return {"fs": s3_server.s3fs(asynchronous=True), "path": f"{bucket}/root"}


class TestFsspecStoreMemory(FsspecHarness):
    """A sync filesystem: its calls run in worker threads."""

    store_cls = FsspecStore

    @pytest.fixture
    def store_kwargs(self) -> dict[str, Any]:
        import fsspec

        return {"fs": fsspec.filesystem("memory"), "path": f"/{uuid.uuid4().hex}"}


class ObstoreHarness(AnyioStoreTests[ObjectStore]):
    """Reads and writes for the harness go straight to obstore, not through the store."""

    async def set(self, store: ObjectStore, key: str, value: Buffer) -> None:
        import obstore

        await anyio.to_thread.run_sync(lambda: obstore.put(store.store, key, value.to_bytes()))

    async def get(self, store: ObjectStore, key: str) -> Buffer:
        import obstore

        data = await anyio.to_thread.run_sync(lambda: obstore.get(store.store, key).bytes())
        return cpu.Buffer.from_bytes(bytes(data))

    def test_store_repr(self, store: ObjectStore) -> None:
        assert str(store) == f"object_store://{store.store}"
        assert repr(store) == f"ObjectStore(object_store://{store.store})"

    def test_store_supports_writes(self, store: ObjectStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ObjectStore) -> None:
        assert store.supports_listing


class TestObjectStoreS3(ObstoreHarness):
    store_cls = ObjectStore

    @pytest.fixture
    def store_kwargs(self, s3_server: S3Server) -> dict[str, Any]:
        return {"store": s3_server.obstore(s3_server.new_bucket())}


class TestObjectStoreMemory(ObstoreHarness):
    store_cls = ObjectStore

    @pytest.fixture
    def store_kwargs(self) -> dict[str, Any]:
        from obstore.store import MemoryStore as ObstoreMemory

        return {"store": ObstoreMemory()}

    def test_store_eq(self, store: ObjectStore, store_kwargs: dict[str, Any]) -> None:
        from obstore.store import MemoryStore as ObstoreMemory

        # obstore's MemoryStore has no equality of its own: stores over one are equal, stores
        # over two are not (they hold different data), nor are a store and its read-only twin.
        assert store == self.store_cls(**store_kwargs)
        assert store != self.store_cls(store=ObstoreMemory())
        assert store != self.store_cls(**store_kwargs, read_only=True)

    async def test_serializable_store(self, store: ObjectStore) -> None:
        pytest.importorskip("obstore")
        # An obstore MemoryStore does not pickle (its data lives in Rust); S3 and local do.
        import pickle

        with pytest.raises(TypeError, match="cannot pickle 'MemoryStore'"):
            pickle.dumps(store)


class TestObjectStoreLocal(ObstoreHarness):
    store_cls = ObjectStore

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> dict[str, Any]:
        from obstore.store import LocalStore as ObstoreLocal

        return {"store": ObstoreLocal(str(tmp_path), mkdir=True)}
