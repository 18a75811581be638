"""A key fuzzer: random keys, including every way to spell a path escape, against the stores
that hold data on this machine (Memory, Local, Zip), from asyncio and from trio.

For every key, either the store refuses it with a ``ValueError`` naming it, before touching
anything, or it takes it and the key round-trips through set, get, exists, getsize, list and
delete. Either way nothing appears or changes outside the store's root.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.core.buffer import cpu, default_buffer_prototype

from zarr_anyio import AnyioStore, LocalStore, MemoryStore, ZipStore

PROTO = default_buffer_prototype()

# Segments an attacker would try, mixed into random text (surrogates and controls included).
_TRICKY = st.sampled_from(
    ["..", ".", "", "/", "\\", "\x00", "%2e%2e", "..\\..", "~", "\ud800", "é", "a" * 256]
)
_SEGMENT = st.one_of(
    _TRICKY,
    st.text(st.characters(codec=None, exclude_characters="/"), min_size=1, max_size=12),
    st.text("ab.", min_size=1, max_size=4),
)
KEYS = st.one_of(
    st.lists(_SEGMENT, min_size=1, max_size=5).map("/".join),
    st.text(st.characters(codec=None), max_size=30),
)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its content."""
    found: dict[str, bytes] = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath, name)
            found[str(path.relative_to(folder))] = path.read_bytes()
    return found


@contextmanager
def fresh_store(kind: str, base: Path) -> Iterator[AnyioStore]:
    folder = Path(tempfile.mkdtemp(dir=base))
    if kind == "memory":
        yield MemoryStore()
    elif kind == "local":
        yield LocalStore(folder / "root")
    else:
        store = ZipStore(folder / "root.zip", mode="w")
        try:
            yield store
        finally:
            store.close()


def check_key(store: AnyioStore, key: str, call: Callable[..., Any]) -> None:
    value = cpu.Buffer.from_bytes(b"payload:" + key.encode("utf-8", "surrogatepass"))
    refusal = None
    try:
        call(store.set, key, value)
    except ValueError as error:
        refusal = str(error)
    if refusal is not None:
        assert repr(key)[:40] in refusal
        for operation in (store.get, store.exists, store.getsize, store.delete):
            with pytest.raises(ValueError, match="key"):
                call(operation, key)
        return
    got = call(store.get, key, PROTO)
    assert got is not None
    assert got.to_bytes() == value.to_bytes()
    assert call(store.exists, key)
    assert call(store.getsize, key) == len(value.to_bytes())

    async def listed() -> list[str]:
        return [k async for k in store.list()]

    assert call(listed) == [key]
    call(store.delete, key)
    assert call(store.get, key, PROTO) is None
    assert call(listed) == []


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A sandbox whose files no store may touch: the stores' roots live one level inside it."""
    with tempfile.TemporaryDirectory() as top:
        sandbox = Path(top)
        (sandbox / "secret").write_bytes(b"do not touch")
        (sandbox / "stores").mkdir()
        yield sandbox


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["memory", "local", "zip"])
def test_random_keys_are_refused_or_round_trip_and_stay_inside(
    kind: str, backend: str, outside: Path
) -> None:
    before = {k: v for k, v in snapshot(outside).items() if not k.startswith("stores")}
    with anyio.from_thread.start_blocking_portal(backend=backend) as portal:

        def call(function: Callable[..., object], *args: object) -> object:
            async def run() -> object:
                return await function(*args)  # type: ignore[misc]

            return portal.call(run)

        @settings(
            max_examples=400,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(key=KEYS)
        def check(key: str) -> None:
            with fresh_store(kind, outside / "stores") as store:
                check_key(store, key, call)

        check()
    after = {k: v for k, v in snapshot(outside).items() if not k.startswith("stores")}
    assert after == before
