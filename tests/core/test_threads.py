"""Worker threads (`zarr_anyio._core.threads`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from zarr_anyio._core import threads


class _Value:
    """What a call returns: something a weak reference can watch."""


class _LingeringPool(ThreadPoolExecutor):
    """A pool whose workers keep every future they were given, as a worker thread does with its
    work item until it next runs (which, on a busy machine, may be long after its caller got
    the result)."""

    def __init__(self) -> None:
        super().__init__(2)
        self.kept: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.kept.append(future)
        return future


@pytest.mark.anyio
async def test_a_result_the_caller_let_go_of_is_not_kept_by_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A copy reads a part into a slot of the read pool, writes it, and reads the next part into
    # the same slot only if nothing refers to the first any more: a worker still holding the
    # read's result made the copy map a second slot (CI, under load).
    pool = _LingeringPool()
    monkeypatch.setattr(threads, "_executor", pool)
    try:
        value = await threads.run_in_worker(lambda _: _Value())
        assert isinstance(value, _Value)
        watched = weakref.ref(value)
        del value
        assert watched() is None
        assert pool.kept  # the pool was the one used
    finally:
        pool.shutdown()


@pytest.mark.anyio
async def test_an_error_in_the_call_comes_back_as_itself() -> None:
    def fail(_: threads.CheckCancelled) -> None:
        raise KeyError("k")

    with pytest.raises(KeyError, match="k"):
        await threads.run_in_worker(fail)
