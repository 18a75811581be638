"""The custom-store guide's example store (docs/custom-stores.md), run through the harness
exactly as the page shows it; and the harness itself, shown to fail for stores that break what
it checks."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

from support import TOP

PAGE = TOP / "docs" / "custom-stores.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _page_module(name: str) -> dict[str, Any]:
    """The python block of the page that starts with ``# <name>.py``, as the module ``name`` (a
    real one, in ``sys.modules``, so that the test file's imports find it and its store pickles
    as zarr's tests require)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    blocks = {block.splitlines()[0]: block for block in BLOCK.findall(PAGE.read_text())}
    exec(compile(blocks[f"# {name}.py"], f"{PAGE.name}: {name}.py", "exec"), module.__dict__)
    return module.__dict__


_page_module("sqlite_store")
TestSQLiteStore = _page_module("test_sqlite_store")["TestSQLiteStore"]


BROKEN_STORES = '''
import anyio
import pytest
from zarr.core.buffer import Buffer, cpu

from zarr_anyio import LocalStore, MemoryStore
from zarr_anyio.testing import AnyioStoreTests


class ReadsWithoutAToken(MemoryStore):
    """Said to do I/O (waits_for_tokens), but never takes a token."""


class LetsBadKeysThrough(MemoryStore):
    async def exists(self, key: str) -> bool:
        return key in self._store_dict


class KeepsATokenWhenCancelled(LocalStore):
    """Cancelled in a write, takes a token it never gives back. (It once took a second token
    after each write and slept 5 ms before giving it back, leaking it only if cancelled in
    those 5 ms; under CI's load its four writers, each holding a token and waiting for a
    second, all sat in `acquire` when the cancel came, and the harness rightly passed it.)"""

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        try:
            await super()._backend_set(key, value, exclusive=exclusive)
            await anyio.sleep(0.05)
        except anyio.get_cancelled_exc_class():
            self.limiter.total_tokens += 1  # so that one is free to take
            self.limiter.acquire_nowait()
            raise


class InMemory(AnyioStoreTests):
    async def set(self, store, key, value):
        store._store_dict[key] = value

    async def get(self, store, key):
        return store._store_dict[key]

    @pytest.fixture
    def store_kwargs(self):
        return {"store_dict": {}}


class TestReadsWithoutAToken(InMemory):
    store_cls = ReadsWithoutAToken


class TestLetsBadKeysThrough(InMemory):
    store_cls = LetsBadKeysThrough
    waits_for_tokens = False


class TestKeepsATokenWhenCancelled(AnyioStoreTests):
    store_cls = KeepsATokenWhenCancelled

    async def set(self, store, key, value):
        (store.root / key).parent.mkdir(parents=True, exist_ok=True)
        (store.root / key).write_bytes(value.to_bytes())

    async def get(self, store, key):
        return cpu.Buffer.from_bytes((store.root / key).read_bytes())

    @pytest.fixture
    def store_kwargs(self, tmp_path):
        return {"root": tmp_path}
'''


def test_the_harness_fails_stores_that_break_its_promises(tmp_path: Path) -> None:
    (tmp_path / "test_broken.py").write_text(textwrap.dedent(BROKEN_STORES))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "waits_for_a_token or bad_keys or cancelled_bulk or bulk_calls",
            "test_broken.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    failed = set(re.findall(r"^FAILED test_broken.py::(\w+)::(\w+)", result.stdout, re.M))
    assert ("TestReadsWithoutAToken", "test_every_operation_waits_for_a_token") in failed
    assert ("TestLetsBadKeysThrough", "test_bad_keys_are_refused_and_write_nothing") in failed
    assert (
        "TestKeepsATokenWhenCancelled",
        "test_cancelled_bulk_calls_leave_nothing_running",
    ) in failed
    # And nothing else: each broken store fails only what it breaks.
    assert len(failed) == 3, result.stdout[-3000:]
