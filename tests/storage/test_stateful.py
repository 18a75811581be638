"""zarr's own hypothesis state machines (``zarr.testing.stateful``) on every store.

The store machine drives the Store API against a dict model with random sequences of set, get,
get_partial_values, delete, clear, exists and listing; the hierarchy machine builds and tears
down groups and arrays with zarr's sync API (on zarr's own loop thread) against a MemoryStore
model. The store machine runs twice: through zarr's loop (asyncio) and from a trio loop in a
blocking portal, so both backends see the same random histories. Example counts are kept small
enough for CI, which runs the suite three times; hypothesis' database replays any failure found.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.from_thread
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test
from zarr.abc.store import Store
from zarr.testing.stateful import (
    MAX_BINARY_SIZE,
    SyncStoreWrapper,
    ZarrHierarchyStateMachine,
    ZarrStoreStateMachine,
)
from zarr.testing.strategies import keys as zarr_keys

from support.servers import S3Server
from zarr_anyio import AnyioStore, FsspecStore, LocalStore, MemoryStore, ObjectStore, ZipStore

T = TypeVar("T")

STORE_KINDS = [
    "memory",
    "local",
    "zip",
    "fsspec-memory",
    "obstore-memory",
    "fsspec-s3",
    "obstore-s3",
]
# Remote stores on moto's S3 server make ~10 requests a step: fewer examples there.
REMOTE_KINDS = {"fsspec-s3", "obstore-s3"}
# Stores whose keys are paths in a tree of folders, where "a" and "a/b" cannot both be keys.
TREE_KINDS = {"local", "fsspec-memory"}


@contextmanager
def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AnyioStore]:
    if kind == "memory":
        yield MemoryStore()
    elif kind == "local":
        yield LocalStore(tmp_path / "store")
    elif kind == "zip":
        store = ZipStore(tmp_path / "store.zip", mode="w")
        try:
            yield store
        finally:
            store.close()
    elif kind == "fsspec-memory":
        import fsspec

        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        yield FsspecStore(fs, path=f"/{tmp_path.name}")
    elif kind == "obstore-memory":
        from obstore.store import MemoryStore as ObstoreMemory

        yield ObjectStore(ObstoreMemory())
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        if kind == "fsspec-s3":
            yield FsspecStore(s3.s3fs(asynchronous=True), path=f"{bucket}/root")
        else:
            yield ObjectStore(s3.obstore(bucket))


# Histories a run, for the stores in memory or on disk (an eighth of them, at least 3, for the
# remote ones): with derandomize, the same ones every run. Fewer than the 40 and 20 of old, for
# CI's time (the machines ran 106 s a suite); the properties are all there.
STORE_EXAMPLES = 24
HIERARCHY_EXAMPLES = 12


def _settings(kind: str, examples: int) -> settings:
    return settings(
        max_examples=max(3, examples // 8) if kind in REMOTE_KINDS else examples,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # The same histories on every run, so CI is not flaky; change the seed to explore more.
        derandomize=True,
        print_blob=True,
    )


class TreeStoreStateMachine(ZarrStoreStateMachine):
    """zarr's store machine for stores that keep keys as files in folders: a key cannot also be
    a folder of other keys (``"a"`` and ``"a/b"``), as zarr's own LocalStore cannot hold them
    either (zarr skips its LocalStore in this machine for it). zarr never writes such keys."""

    @rule(key=zarr_keys(), data=st.binary(min_size=0, max_size=MAX_BINARY_SIZE))
    def set(self, key: str, data: bytes) -> None:
        assume(
            not any(
                other.startswith(f"{key}/") or key.startswith(f"{other}/") for other in self.model
            )
        )
        super().set(key, data)


def store_machine(kind: str, store: Store) -> ZarrStoreStateMachine:
    return (TreeStoreStateMachine if kind in TREE_KINDS else ZarrStoreStateMachine)(store)


class TrioStoreWrapper(SyncStoreWrapper):
    """zarr's synchronous store wrapper, but every call runs on a trio loop (a blocking portal)
    instead of zarr's asyncio loop thread."""

    def __init__(self, store: Store, portal: anyio.from_thread.BlockingPortal) -> None:
        super().__init__(store)
        self.portal = portal

    def _sync(self, coroutine: Coroutine[Any, Any, T]) -> T:
        async def run() -> T:
            return await coroutine

        return self.portal.call(run)

    def _sync_iter(self, async_iterator: AsyncIterator[T]) -> builtins.list[T]:
        async def collect() -> builtins.list[T]:
            return [item async for item in async_iterator]

        return self.portal.call(collect)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_store_state_machine(
    kind: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with make_store(kind, tmp_path, request) as store:
        if backend == "asyncio":
            run_state_machine_as_test(
                lambda: store_machine(kind, store),  # type: ignore[arg-type]
                settings=_settings(kind, STORE_EXAMPLES),
            )
            return
        with anyio.from_thread.start_blocking_portal(backend="trio") as portal:

            def machine_on_trio() -> ZarrStoreStateMachine:
                machine = store_machine(kind, store)
                machine.store = TrioStoreWrapper(store, portal)
                return machine

            run_state_machine_as_test(
                machine_on_trio,  # type: ignore[arg-type]
                settings=_settings(kind, STORE_EXAMPLES),
            )


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_hierarchy_state_machine(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with make_store(kind, tmp_path, request) as store:
        run_state_machine_as_test(
            lambda: ZarrHierarchyStateMachine(store),  # type: ignore[arg-type]
            settings=_settings(kind, HIERARCHY_EXAMPLES),
        )
