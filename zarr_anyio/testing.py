"""A test harness for zarr_anyio stores, your own included (needs pytest, anyio and trio).

`AnyioStoreTests` is zarr-python's own store contract, ``zarr.testing.store.StoreTests``, plus
what zarr_anyio promises beyond it — every operation holds a token of the store's limiter, bulk
calls keep to the limit, a cancelled call leaves nothing running and no value torn, bad keys
are refused naming the key and write nothing — and it runs every async test under asyncio and
under trio. Subclass it in a test module, as zarr's storage guide tells authors of stores to do
with ``StoreTests``::

    import pytest
    from zarr.core.buffer import Buffer, cpu
    from zarr_anyio.testing import AnyioStoreTests

    class TestMyStore(AnyioStoreTests[MyStore]):
        store_cls = MyStore

        @pytest.fixture
        def store_kwargs(self, tmp_path):
            return {"root": str(tmp_path)}

        async def set(self, store, key, value):  # write around the store
            ...

        async def get(self, store, key):  # read around the store
            ...

The store is made with ``store_cls(**store_kwargs)`` (the harness's own tests add
``limiter=``), and opened the way zarr's synchronous API opens it, on zarr's event-loop thread;
the async tests then use it from asyncio or trio, another loop, as users do. A store that does
no I/O (an in-memory one) sets ``waits_for_tokens = False``: it is then checked never to wait.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import anyio.lowlevel
import pytest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.testing.store import StoreTests

from ._core.extras import require
from ._core.limit import Limiter
from .storage import AnyioStore

__all__ = ["BAD_KEYS", "AnyioStoreTests"]

S = TypeVar("S", bound=AnyioStore)

BAD_KEYS = [
    "",
    "/absolute",
    "a//b",
    "trailing/",
    "../escape",
    "a/../../escape",
    "./a",
    "back\\slash",
    "nul\x00byte",
    "lone\ud800surrogate",
    "s" * 256,
    "k/" * 520,
]
"""Keys every zarr_anyio store refuses with a ``ValueError`` that names them."""

# A test waits this long at most for what it expects to happen (a call to queue for a token).
_PATIENCE = 10.0


def _buffer(data: bytes) -> Buffer:
    return cpu.Buffer.from_bytes(data)


async def _wait_until(condition: Callable[[], bool], what: str) -> None:
    # A limiter's statistics are read, not awaited: poll them.
    with anyio.fail_after(_PATIENCE):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)
    assert condition(), what


async def _collect(iterator: AsyncIterator[str]) -> list[str]:
    return [item async for item in iterator]


class AnyioStoreTests(StoreTests[S, cpu.Buffer], Generic[S]):
    """zarr's ``StoreTests`` and zarr_anyio's own, under asyncio and trio, for ``store_cls``."""

    buffer_cls = cpu.Buffer
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    waits_for_tokens: ClassVar[bool] = True
    """Whether every operation holds a token of the store's limiter (``False`` for a store
    that does no I/O)."""

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        if request.param == "trio":
            # anyio's own message names anyio[trio]; the harness's home is our trio extra.
            require("trio", ("trio",), "zarr_anyio.testing under trio")
        return str(request.param)

    @pytest.fixture
    def store(self, open_kwargs: dict[str, Any]) -> S:
        # zarr's fixture is async, which anyio's plugin runs on the test's own loop; a store is
        # opened by zarr's sync API on zarr's loop thread, and then used from another loop.
        store: S = sync(self.store_cls.open(**open_kwargs))
        return store

    @pytest.fixture
    def store_not_open(self, store_kwargs: dict[str, Any]) -> S:
        return self.store_cls(**store_kwargs)

    def make_store(self, store_kwargs: dict[str, Any], limiter: Limiter) -> S:
        """The store under test, drawing on ``limiter`` (override if yours is made otherwise)."""
        return self.store_cls(**{**store_kwargs, "limiter": limiter})

    # ------------------------------------------------------------------ zarr's abstract tests

    def test_store_repr(self, store: S) -> None:
        assert type(store).__name__ in repr(store)
        assert str(store)

    def test_store_supports_writes(self, store: S) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: S) -> None:
        assert store.supports_listing

    # ------------------------------------------------------------------ the limit

    async def test_every_operation_waits_for_a_token(self, store_kwargs: dict[str, Any]) -> None:
        """With every token of the store's limiter held elsewhere, each operation waits for
        one (or, for a store that does no I/O, never waits)."""
        limiter = Limiter(2)
        store = self.make_store(store_kwargs, limiter)
        await store.set("held/0", _buffer(b"value"))
        prototype = default_buffer_prototype()
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            "get": lambda: store.get("held/0", prototype),
            "exists": lambda: store.exists("held/0"),
            "getsize": lambda: store.getsize("held/0"),
            "set": lambda: store.set("held/1", _buffer(b"new")),
            "set_many": lambda: store.set_many([("held/2", _buffer(b"new"))]),
            "delete": lambda: store.delete("held/3"),
            "list_prefix": lambda: _collect(store.list_prefix("held/")),
            "list_dir": lambda: _collect(store.list_dir("held")),
            "get_partial_values": lambda: store.get_partial_values(prototype, [("held/0", None)]),
        }
        try:
            for name, operation in operations.items():
                await limiter.acquire()
                await limiter.acquire()
                try:
                    async with anyio.create_task_group() as tg:
                        done = anyio.Event()

                        async def run(
                            operation: Callable[[], Awaitable[object]], done: anyio.Event = done
                        ) -> None:
                            await operation()
                            done.set()

                        tg.start_soon(run, operation)
                        if self.waits_for_tokens:
                            await _wait_until(
                                lambda: limiter.statistics().tasks_waiting > 0,
                                f"{name}() did not wait for a token",
                            )
                            assert not done.is_set(), f"{name}() ran without a token"
                            tg.cancel_scope.cancel()
                        else:
                            with anyio.fail_after(_PATIENCE):
                                await done.wait()
                finally:
                    limiter.release()
                    limiter.release()
                # With the tokens back, the same operation completes.
                with anyio.fail_after(_PATIENCE):
                    await operation()
        finally:
            await store.aclose()

    async def test_bulk_calls_keep_to_the_limit(self, store_kwargs: dict[str, Any]) -> None:
        """A bulk call of many keys has at most ``max_concurrency`` operations holding or
        waiting for tokens at once: a pool of workers, not a task per key."""
        limiter = Limiter(3)
        store = self.make_store(store_kwargs, limiter)
        peak = 0
        finished = anyio.Event()

        async def watch() -> None:
            nonlocal peak
            while not finished.is_set():
                stats = limiter.statistics()
                peak = max(peak, stats.borrowed_tokens + stats.tasks_waiting)
                await anyio.sleep(0.0005)

        items = [(f"bulk/{i}", _buffer(b"%d" % i)) for i in range(60)]
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await store.set_many(items)
                values = await store.get_partial_values(
                    default_buffer_prototype(), [(key, None) for key, _ in items]
                )
                finished.set()
            assert [v.to_bytes() if v else None for v in values] == [
                value.to_bytes() for _, value in items
            ]
            assert peak <= limiter.total_tokens
            assert limiter.statistics().borrowed_tokens == 0
        finally:
            await store.aclose()

    # ------------------------------------------------------------------ cancellation

    async def test_cancelled_bulk_calls_leave_nothing_running(
        self, store_kwargs: dict[str, Any]
    ) -> None:
        """Cancelled bulk writes and reads: when the cancelled call returns, every token is
        back and nothing waits for one; each key holds its old value or its new one, whole;
        and the store still works."""
        limiter = Limiter(4)
        store = self.make_store(store_kwargs, limiter)
        old = {f"c/{i}": b"old %d " % i * 50 for i in range(40)}
        new = {key: b"new %s " % key.encode() * 2000 for key in old}
        try:
            await store.set_many([(key, _buffer(value)) for key, value in old.items()])
            # Cancelled at several points of the call: as it starts and later on.
            for call, delay in itertools.product(
                ("set_many", "get_partial_values"), (0, 0.002, 0.01, 0.03)
            ):
                finished = anyio.Event()
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:

                        async def bulk(call: str = call, finished: anyio.Event = finished) -> None:
                            if call == "set_many":
                                await store.set_many(
                                    [(key, _buffer(value)) for key, value in new.items()]
                                )
                            else:
                                await store.get_partial_values(
                                    default_buffer_prototype(), [(key, None) for key in old]
                                )
                            finished.set()

                        tg.start_soon(bulk)
                        # Cancel while operations are in flight (or at once, for a store
                        # that takes no tokens).
                        with anyio.fail_after(_PATIENCE):
                            while self.waits_for_tokens and not (
                                limiter.statistics().borrowed_tokens or finished.is_set()
                            ):
                                await anyio.lowlevel.checkpoint()
                        await anyio.sleep(delay)
                        scope.cancel()
                stats = limiter.statistics()
                assert stats.borrowed_tokens == 0, f"{call}(): tokens still held after it ended"
                assert stats.tasks_waiting == 0, f"{call}(): tasks still wait after it ended"
            listed = sorted(await _collect(store.list_prefix("c/")))
            assert listed == sorted(old)
            values = await store.get_partial_values(
                default_buffer_prototype(), [(key, None) for key in listed]
            )
            for key, value in zip(listed, values, strict=True):
                assert value is not None
                assert value.to_bytes() in (old[key], new[key]), f"{key} is torn"
        finally:
            await store.aclose()

    # ------------------------------------------------------------------ keys

    @pytest.mark.parametrize("key", BAD_KEYS, ids=lambda key: repr(key)[:24])
    async def test_bad_keys_are_refused_and_write_nothing(self, store: S, key: str) -> None:
        await store.set("good/0", _buffer(b"kept"))
        before = sorted(await _collect(store.list()))
        prototype = default_buffer_prototype()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get(key, prototype),
            lambda: store.exists(key),
            lambda: store.getsize(key),
            lambda: store.set(key, _buffer(b"x")),
            lambda: store.set_if_not_exists(key, _buffer(b"x")),
            lambda: store.delete(key),
            lambda: store.get_partial_values(prototype, [("good/0", None), (key, None)]),
            # One bad key among good ones: nothing of the call is written.
            lambda: store.set_many([("good/1", _buffer(b"x")), (key, _buffer(b"x"))]),
        ]
        # The error names the key (its first characters, for a long one).
        shown = re.escape(repr(key)[:21])
        for call in calls:
            with pytest.raises(ValueError, match=shown):
                await call()
        assert sorted(await _collect(store.list())) == before
