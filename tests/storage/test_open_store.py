"""open_store: zarr's implicit store creation and zarr's modes, for every kind of store.

The table tests open the same thing with ``zarr.storage.make_store_path`` and with
``open_store`` and compare what each gives: the error, or whether the store is read-only and
which keys it holds after opening. Where zarr has no implicit store (zip files), the expected
outcome is written out, following the same rules.
"""

from __future__ import annotations

import gc
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage._common import make_store_path

from support.servers import HTTPServer, S3Server
from zarr_anyio import (
    AnyioStore,
    FsspecStore,
    LocalStore,
    MemoryStore,
    ObjectStore,
    ZipStore,
    open_store,
    open_store_async,
)

MODES: list[str | None] = [None, "r", "r+", "a", "w", "w-"]
DATA = {"zarr.json": b'{"zarr_format": 3, "node_type": "group"}', "c/0": b"chunk"}

Outcome = tuple[bool, list[str]] | str


def buf(data: bytes) -> cpu.Buffer:
    return cpu.Buffer.from_bytes(data)


async def _keys(store: Store) -> list[str]:
    return sorted([key async for key in store.list()])


def zarrs(opening: Callable[[], Store], mode: str | None) -> Outcome:
    """What zarr's ``make_store_path`` gave, by zarr 3.1's rule for "w": it empties the store.
    (zarr 3.4 leaves the keys to the node that ``open_group``/``create_array`` then writes;
    open_store writes no node, so it keeps 3.1's rule, the one the modes' docs state.)"""
    result = outcome(opening)
    if mode == "w" and not isinstance(result, str):
        return result[0], []
    return result


def outcome(opening: Callable[[], Store]) -> Outcome:
    """What opening gave: the error's class, or (read-only?, the keys it holds)."""
    try:
        store = opening()
    except Exception as error:
        return type(error).__name__
    return store.read_only, sync(_keys(store))


def s3_options(server: S3Server) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": server.endpoint, "region_name": "us-east-1"},
    }


def fill_folder(folder: Path) -> None:
    for key, value in DATA.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(value)


# ---------------------------------------------------------------------- the table, against zarr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state", ["missing", "empty", "data"])
def test_a_folder_opens_as_zarr_opens_it(tmp_path: Path, mode: str | None, state: str) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder in (ours, theirs):
        if state != "missing":
            folder.mkdir()
        if state == "data":
            fill_folder(folder)
    # zarr 3.1.0 opened a missing folder read-only as an empty store; since 3.1.1 "r" and "r+"
    # need the folder, as here.
    must_exist = state == "missing" and mode in ("r", "r+")
    # Read-only first (it changes nothing), from a file:// URL and from a Path.
    expected = outcome(lambda: sync(make_store_path(theirs, mode="r")).store)
    if state == "missing":
        expected = "FileNotFoundError"
    assert outcome(lambda: open_store(f"file://{ours}", mode="r")) == expected
    expected = zarrs(lambda: sync(make_store_path(str(theirs), mode=mode)).store, mode)  # type: ignore[arg-type]
    got = outcome(lambda: open_store(str(ours), mode=mode))  # type: ignore[arg-type]
    assert got == ("FileNotFoundError" if must_exist else expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state", ["empty", "data"])
def test_a_dict_opens_as_zarr_opens_it(mode: str | None, state: str) -> None:
    def data() -> dict[str, Any]:
        return {k: buf(v) for k, v in DATA.items()} if state == "data" else {}

    expected = zarrs(lambda: sync(make_store_path(data(), mode=mode)).store, mode)  # type: ignore[arg-type]
    assert outcome(lambda: open_store(data(), mode=mode)) == expected  # type: ignore[arg-type]
    if state == "empty":  # None is a new, empty MemoryStore, as with zarr
        expected = zarrs(lambda: sync(make_store_path(None, mode=mode)).store, mode)  # type: ignore[arg-type]
        assert outcome(lambda: open_store(None, mode=mode)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_store_passed_in_opens_as_zarr_opens_it(
    tmp_path: Path, mode: str | None, read_only: bool, kind: str
) -> None:
    def stores() -> tuple[Store, Store]:
        if kind == "local":
            ours, theirs = tmp_path / "ours", tmp_path / "theirs"
            for folder in (ours, theirs):
                folder.mkdir(exist_ok=True)
                fill_folder(folder)
            return LocalStore(ours, read_only=read_only), zarr.storage.LocalStore(
                theirs, read_only=read_only
            )
        data = {k: buf(v) for k, v in DATA.items()}
        return MemoryStore(dict(data), read_only=read_only), zarr.storage.MemoryStore(
            dict(data), read_only=read_only
        )

    ours, theirs = stores()
    expected = zarrs(lambda: sync(make_store_path(theirs, mode=mode)).store, mode)  # type: ignore[arg-type]
    assert outcome(lambda: open_store(ours, mode=mode)) == expected  # type: ignore[arg-type]
    # A zarr.storage store of the same data: converted, with the same outcome.
    _, again = stores()
    assert outcome(lambda: open_store(again, mode=mode)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state", ["missing", "data"])
def test_an_s3_url_opens_as_zarr_opens_it(
    s3_server: S3Server, mode: str | None, state: str
) -> None:
    options = s3_options(s3_server)
    urls = []
    for _ in range(2):
        bucket = s3_server.new_bucket()
        if state == "data":
            fs = s3_server.setup_fs()
            for key, value in DATA.items():
                fs.pipe_file(f"{bucket}/root/{key}", value)
        urls.append(f"s3://{bucket}/root")
    expected = zarrs(
        lambda: sync(make_store_path(urls[0], mode=mode, storage_options=options)).store,  # type: ignore[arg-type]
        mode,
    )
    got = outcome(lambda: open_store(urls[1], mode=mode, storage_options=options))  # type: ignore[arg-type]
    assert got == expected


ZIP_TABLE: dict[tuple[str, str | None], Outcome] = {
    # (state of the file, mode): what opening gives
    **{("missing", mode): (False, []) for mode in (None, "a", "w", "w-")},
    ("missing", "r"): "FileNotFoundError",
    ("missing", "r+"): "FileNotFoundError",
    **{("data", mode): (False, sorted(DATA)) for mode in (None, "r+", "a")},
    ("data", "r"): (True, sorted(DATA)),
    ("data", "w"): (False, []),
    ("data", "w-"): "FileExistsError",
    **{("empty", mode): (False, []) for mode in (None, "r+", "a", "w", "w-")},
    ("empty", "r"): (True, []),
}


@pytest.mark.parametrize(("state", "mode"), list(ZIP_TABLE))
def test_a_zip_file_opens_by_the_same_rules(tmp_path: Path, state: str, mode: str | None) -> None:
    path = tmp_path / "data.zip"
    if state != "missing":
        with zipfile.ZipFile(path, "w") as archive:
            for key, value in DATA.items() if state == "data" else []:
                archive.writestr(key, value)
    before = path.read_bytes() if path.exists() else None
    got = outcome(lambda: open_store(path, mode=mode))  # type: ignore[arg-type]
    assert got == ZIP_TABLE[state, mode]
    gc.collect()  # close what a failed or unused opening left
    if isinstance(got, str) or mode == "r":
        # A refusal or a reader leaves the file as it was (or absent).
        assert (path.read_bytes() if path.exists() else None) == before


# ---------------------------------------------------------------------- what the issue tripped on


def test_a_dict_opened_without_a_mode_is_writable() -> None:
    group = zarr.create_group(store=open_store({}))
    group.create_array("a", shape=(2,), dtype="int8")[:] = [1, 2]
    array = group["a"]
    assert isinstance(array, zarr.Array)
    assert np.asarray(array[:]).tolist() == [1, 2]


def test_w_clears_a_folder_and_w_dash_refuses_one_with_data(tmp_path: Path) -> None:
    folder = tmp_path / "data.zarr"
    zarr.create_array(store=LocalStore(folder), shape=(4,), dtype="int8")[:] = 1
    with pytest.raises(FileExistsError, match=r"already holds data.*'w'.*'a'"):
        open_store(folder, mode="w-")
    assert (folder / "zarr.json").exists()  # refused, and nothing was touched
    store = open_store(folder, mode="w")
    assert sync(_keys(store)) == []
    assert list(folder.iterdir()) == []


def test_mode_r_on_a_writable_store_gives_a_read_only_copy(tmp_path: Path) -> None:
    writable = LocalStore(tmp_path)
    reader = open_store(writable, mode="r")
    assert reader.read_only
    assert not writable.read_only
    assert reader == writable  # the same folder
    with pytest.raises(ValueError, match="read-only"):
        sync(reader.set("k", buf(b"v")))
    with pytest.raises(ValueError, match="Store is read-only but mode is 'a'"):
        open_store(reader, mode="a")


def test_store_keywords_reach_the_store_made(tmp_path: Path) -> None:
    assert open_store(tmp_path, max_concurrency=3).max_concurrency == 3
    with pytest.raises(TypeError, match="apply only to a store that open_store makes"):
        open_store(LocalStore(tmp_path), max_concurrency=3)
    with pytest.raises(TypeError, match="storage_options"):
        open_store(tmp_path, storage_options={"anon": True})
    with pytest.raises(TypeError, match="storage_options"):
        open_store({}, storage_options={"anon": True})


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_read_only_is_taken_as_mode_r_for_every_kind_of_store(
    tmp_path: Path, http_server: HTTPServer, backend: Any
) -> None:
    # Before: read_only=True reached each constructor beside the mode's own read_only
    # ("got multiple values for keyword argument 'read_only'").
    writable = LocalStore(tmp_path / "local")
    zarr.create_array(writable, shape=(2,), dtype="i1")
    given: list[Any] = [
        tmp_path / "local",
        str(tmp_path / "local"),
        {},
        writable,
        f"{http_server.url}/data",
    ]
    for store_like in given:
        assert open_store(store_like, read_only=True, backend=backend).read_only, store_like
        assert not open_store(store_like, read_only=False, backend=backend).read_only
    with pytest.raises(ValueError, match=r"read_only=True contradicts mode='w'"):
        open_store(tmp_path / "local", mode="w", read_only=True)
    with pytest.raises(ValueError, match=r"read_only=False contradicts mode='r'"):
        open_store(tmp_path / "local", mode="r", read_only=False)
    assert (tmp_path / "local" / "zarr.json").exists()  # nothing was cleared


# ---------------------------------------------------------------------- str() opens the store again


def test_str_of_local_memory_and_zip_stores_opens_them_again(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "folder")
    sync(local.set("k", buf(b"local")))
    again = open_store(str(local))
    assert isinstance(again, LocalStore)
    assert again == local

    data: dict[str, Any] = {}
    memory = MemoryStore(data)
    sync(memory.set("k", buf(b"memory")))
    again = open_store(str(memory), mode="r")
    assert isinstance(again, MemoryStore)
    assert again._store_dict is data
    assert again.read_only

    path = tmp_path / "a.zip"
    zipped = ZipStore(path, mode="w")
    sync(zipped.set("k", buf(b"zip")))
    # Open for writing in this process: the same store, or a copy sharing its archive.
    assert open_store(str(zipped)) is zipped
    with pytest.raises(FileExistsError):
        open_store(str(zipped), mode="w-")
    assert zipped._open_for_writing()  # the refusal left the caller's store open
    reader = open_store(str(zipped), mode="r")
    assert isinstance(reader, ZipStore)
    assert reader.read_only
    value = sync(reader.get("k", default_buffer_prototype()))
    assert value is not None
    assert value.to_bytes() == b"zip"
    zipped.close()
    closed = open_store(str(zipped), mode="r")
    assert closed is not zipped
    assert closed == zipped
    value = sync(closed.get("k", default_buffer_prototype()))
    assert value is not None
    assert value.to_bytes() == b"zip"


def test_str_of_a_memory_store_that_is_gone_is_a_clear_error() -> None:
    name = str(MemoryStore())
    gc.collect()
    with pytest.raises(FileNotFoundError, match="names no MemoryStore alive in this process"):
        open_store(name)
    named = open_store("memory://scratch", mode="w")
    sync(named.set("k", buf(b"v")))
    assert open_store("memory://scratch", mode="r")._store_dict is named._store_dict  # type: ignore[attr-defined]
    with pytest.raises(FileNotFoundError, match="no MemoryStore of that name"):
        open_store("memory://nobody-made-this", mode="r")


def test_str_of_remote_stores_opens_them_again(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    options = s3_options(s3_server)
    fsspec_store = open_store(f"s3://{bucket}/root", mode="w", storage_options=options)
    assert isinstance(fsspec_store, FsspecStore)
    assert str(fsspec_store) == f"s3://{bucket}/root"
    sync(fsspec_store.set("k", buf(b"fsspec")))
    # Alive: str() alone reaches it, with its endpoint and credentials.
    again = open_store(str(fsspec_store), mode="r")
    assert isinstance(again, FsspecStore)
    assert again.fs is fsspec_store.fs
    assert again.read_only
    # Gone: the URL and the options do.
    url = str(fsspec_store)
    del fsspec_store, again
    gc.collect()
    rebuilt = open_store(url, mode="r", storage_options=options)
    value = sync(rebuilt.get("k", default_buffer_prototype()))
    assert value is not None
    assert value.to_bytes() == b"fsspec"

    object_store = ObjectStore(s3_server.obstore(bucket, prefix="root"))
    described = str(object_store)
    assert described.startswith("object_store://S3Store(")
    again = open_store(described, mode="r")
    assert isinstance(again, ObjectStore)
    assert again.store is object_store.store
    del object_store, again
    gc.collect()
    rebuilt = open_store(
        described,
        mode="r",
        storage_options={
            "endpoint": s3_server.endpoint,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "region": "us-east-1",
            "client_options": {"allow_http": True},
        },
    )
    assert isinstance(rebuilt, ObjectStore)
    value = sync(rebuilt.get("k", default_buffer_prototype()))
    assert value is not None
    assert value.to_bytes() == b"fsspec"


def test_str_of_obstore_memory_and_local_stores(tmp_path: Path) -> None:
    from obstore.store import LocalStore as ObstoreLocal
    from obstore.store import MemoryStore as ObstoreMemory

    memory = ObjectStore(ObstoreMemory())
    assert open_store(str(memory)).store is memory.store  # type: ignore[attr-defined]
    name = str(memory)
    del memory
    gc.collect()
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        open_store(name)
    (tmp_path / "k").write_bytes(b"on disk")
    local = str(ObjectStore(ObstoreLocal(str(tmp_path))))
    gc.collect()
    rebuilt = open_store(local, mode="r")
    value = sync(rebuilt.get("k", default_buffer_prototype()))
    assert value is not None
    assert value.to_bytes() == b"on disk"


# ---------------------------------------------------------------------- bad URLs, clear messages


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:/bucket/x", r"did you mean 's3://bucket/x'"),
        ("gs:bucket", r"did you mean 'gs://bucket'"),
        ("nosuch://x/y", r"scheme 'nosuch'"),
        ("object_store://nothing", "cannot be rebuilt from that name"),
    ],
)
def test_malformed_urls_are_clear_errors(tmp_path: Path, url: str, message: str) -> None:
    os.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        open_store(url)
    assert list(tmp_path.iterdir()) == []  # and no folder of that name


def test_obstore_backend_takes_only_its_schemes() -> None:
    with pytest.raises(ValueError, match="backend='obstore'"):
        open_store("ftp://example.invalid/x", backend="obstore")


def test_a_path_with_a_colon_that_exists_is_a_folder(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    (tmp_path / "ab:c").mkdir()
    assert isinstance(open_store("ab:c", mode="r"), LocalStore)


def test_a_file_where_a_folder_is_expected_says_so(tmp_path: Path) -> None:
    (tmp_path / "afile.txt").write_text("not a folder")
    for mode in ("r", "r+", "a", None):
        with pytest.raises(NotADirectoryError, match=r"afile\.txt is a file, not a folder"):
            open_store(tmp_path / "afile.txt", mode=mode)
    with zipfile.ZipFile(tmp_path / "archive.zarr", "w"):
        pass  # a zip file without the .zip suffix: the message points to ZipStore
    with pytest.raises(NotADirectoryError, match="use ZipStore"):
        open_store(tmp_path / "archive.zarr", mode="r")
    # A folder named like a zip file is a folder.
    (tmp_path / "folder.zip").mkdir()
    assert isinstance(open_store(tmp_path / "folder.zip", mode="r"), LocalStore)


def test_a_missing_zip_in_mode_r_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing.zip: no such zip file"):
        ZipStore(tmp_path / "missing.zip", mode="r")
    with pytest.raises(FileNotFoundError, match=r"missing.zip: no such zip file"):
        open_store(tmp_path / "missing.zip", mode="r")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a zip file"):
        ZipStore(tmp_path / "folder", mode="r")
    with pytest.raises(IsADirectoryError, match="is a folder, not a zip file"):
        sync(ZipStore(tmp_path / "folder", mode="a")._ensure_open())


# ---------------------------------------------------------------------- zarr's stores, converted


def test_zarr_storage_stores_are_converted_over_the_same_data(
    tmp_path: Path, s3_server: S3Server
) -> None:
    theirs = zarr.storage.MemoryStore()
    ours = open_store(theirs)
    assert isinstance(ours, MemoryStore)
    sync(ours.set("k", buf(b"v")))
    assert "k" in theirs._store_dict  # the same dict: writes are seen by both

    converted = open_store(zarr.storage.LocalStore(tmp_path, read_only=True))
    assert isinstance(converted, LocalStore)
    assert converted.read_only

    zipped = zarr.storage.ZipStore(tmp_path / "z.zip", mode="w")
    zarr.create_array(store=zipped, shape=(2,), dtype="int8")[:] = [3, 4]
    with pytest.raises(ValueError, match=r"is open for writing.*Close it first"):
        open_store(zipped)
    zipped.close()
    reopened = open_store(zipped, mode="r")
    assert isinstance(reopened, ZipStore)
    np.testing.assert_array_equal(zarr.open_array(store=reopened, mode="r")[:], [3, 4])

    bucket = s3_server.new_bucket()
    fsspec_store = zarr.storage.FsspecStore.from_url(
        f"s3://{bucket}/r", storage_options=s3_options(s3_server)
    )
    converted_fsspec = open_store(fsspec_store)
    assert isinstance(converted_fsspec, FsspecStore)
    assert converted_fsspec.fs is fsspec_store.fs

    obstore_store = zarr.storage.ObjectStore(s3_server.obstore(bucket))
    converted_obstore = open_store(obstore_store, mode="r")
    assert isinstance(converted_obstore, ObjectStore)
    assert converted_obstore.read_only

    with pytest.raises(TypeError, match=r"not one of zarr\.storage.s"):
        open_store(zarr.storage.LoggingStore(zarr.storage.MemoryStore()))


# ---------------------------------------------------------------------- the async twin, and URLs


@pytest.mark.anyio
async def test_open_store_async_from_asyncio_and_trio(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    store = await open_store_async(folder, mode="w-")
    await store.set("k", buf(b"v"))
    with pytest.raises(FileExistsError):
        await open_store_async(folder, mode="w-")
    reader = await open_store_async(folder, mode="r")
    assert reader.read_only
    assert await _keys(reader) == ["k"]
    await anyio.lowlevel.checkpoint()


def test_s3_urls_with_both_backends(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    fsspec_store = open_store(
        f"s3://{bucket}/data", mode="w", storage_options=s3_options(s3_server)
    )
    assert isinstance(fsspec_store, FsspecStore)
    zarr.create_array(store=fsspec_store, shape=(3,), dtype="int16")[:] = [1, 2, 3]

    obstore_store = open_store(
        f"s3://{bucket}/data",
        mode="r",
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


@pytest.mark.anyio
async def test_http_urls(http_server: HTTPServer) -> None:
    http_server.objects["data/c/0"] = b"hello"
    for backend in ("fsspec", "obstore"):
        store: AnyioStore = await open_store_async(
            f"{http_server.url}/data",
            mode="r",
            backend=backend,
            storage_options={"client_options": {"allow_http": True}}
            if backend == "obstore"
            else None,
        )
        value = await store.get("c/0", default_buffer_prototype())
        assert value is not None
        assert value.to_bytes() == b"hello"


def test_x_is_w_dash_and_an_fsmap_is_an_fsspec_store(tmp_path: Path) -> None:
    import fsspec

    folder = tmp_path / "data"
    open_store(folder, mode="x")
    (folder / "k").write_bytes(b"v")
    with pytest.raises(FileExistsError):
        open_store(folder, mode="x")
    mapper = fsspec.filesystem("memory").get_mapper(f"/{tmp_path.name}")
    mapped = open_store(mapper, mode="a")
    assert isinstance(mapped, FsspecStore)
    sync(mapped.set("k", buf(b"v")))
    assert mapper["k"] == b"v"


def test_w_empties_a_store_passed_in(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    sync(store.set("a/b", buf(b"v")))
    assert open_store(store, mode="w") is store
    assert sync(_keys(store)) == []
