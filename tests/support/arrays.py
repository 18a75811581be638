"""What the array API tests share: the backends they run under and stores that count their I/O."""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
import pytest
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from zarr_anyio import MemoryStore

if sys.platform != "win32":
    # Part of the test extra wherever uvloop exists: imported, not skipped, so CI cannot lose it.
    import uvloop

    UVLOOP: list[Any] = [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]
    UVLOOP_CLASS = uvloop.Loop
else:  # pragma: no cover
    UVLOOP = []
    UVLOOP_CLASS = None

BACKENDS = ["asyncio", "trio", *UVLOOP]

T = TypeVar("T")


def chunk_key(key: str) -> bool:
    """Whether ``key`` names a chunk (v3 ``c/…`` or v2 ``0.1``), not metadata."""
    name = key.rsplit("/", 1)[-1]
    return key.startswith("c/") or "/c/" in key or name.replace(".", "").isdigit()


class CountingStore(MemoryStore):
    """A MemoryStore whose chunk reads and writes take ``delay`` seconds, each holding a token.

    It counts the chunk operations running now (``now``), the most seen at once (``most``), how
    many started (``started``) and the threads they ran in. A cancelled operation takes
    ``stop_delay`` more seconds to stop (shielded), as a real request takes time to wind down, so a
    caller that does not wait for its work to end would see ``now > 0``.
    """

    def __init__(
        self,
        store_dict: dict[str, Buffer] | None = None,
        *,
        delay: float = 0.0,
        stop_delay: float = 0.02,
        fail_on: Iterable[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(store_dict, **kwargs)
        self.delay = delay
        self.stop_delay = stop_delay
        self.fail_on = set(fail_on)
        self.now = 0
        self.most = 0
        self.started = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def with_read_only(self, read_only: bool = False) -> CountingStore:
        copy = type(self)(self._store_dict, read_only=read_only, **self._store_kwargs())  # type: ignore[arg-type]
        copy.delay, copy.stop_delay, copy.fail_on = self.delay, self.stop_delay, self.fail_on
        return copy

    async def _io(self, key: str, action: Callable[[], Awaitable[T]], *, reading: bool) -> T:
        """``action()`` (the real read or write), counted, after ``delay``, holding a token."""
        if not chunk_key(key):
            return await action()
        async with self._limit.current():
            with self._lock:
                self.now += 1
                self.started += 1
                self.most = max(self.most, self.now)
                self.threads.add(threading.current_thread().name)
            try:
                if reading and key in self.fail_on:
                    raise OSError(f"injected failure reading {key}")
                if self.delay:
                    await anyio.sleep(self.delay)
                return await action()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(self.stop_delay)
                raise
            finally:
                with self._lock:
                    self.now -= 1

    async def _backend_get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        return await self._io(
            key, lambda: MemoryStore._backend_get(self, key, prototype, byte_range), reading=True
        )

    async def _backend_set(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        await self._io(
            key,
            lambda: MemoryStore._backend_set(self, key, value, exclusive=exclusive),
            reading=False,
        )

    def chunk_keys(self) -> list[str]:
        return sorted(key for key in self._store_dict if chunk_key(key))
