"""The web-app guide's two apps (docs/web-apps.md), as the page shows them, each on a real server
on 127.0.0.1 (uvicorn for FastAPI on asyncio, hypercorn for quart-trio on trio): 200 requests at
once all answered right, the one store they share never past its bound, and closed at shutdown."""

from __future__ import annotations

import functools
import queue
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import uvicorn

from support import TOP
from support.servers import Faults, HTTPServer
from zarr_anyio import AnyioStore

PAGE = TOP / "docs" / "web-apps.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
REQUESTS = 200
BOUND = 8  # the apps' max_concurrency


def _blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text())


def _page_module(name: str) -> types.ModuleType:
    """The block that starts with ``# <name>.py``, as the module ``name``."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    (block,) = [block for block in _blocks() if block.startswith(f"# {name}.py\n")]
    exec(compile(block, f"{PAGE.name}: {name}.py", "exec"), module.__dict__)
    return module


@pytest.fixture
def arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_server: HTTPServer) -> HTTPServer:
    """The page's data, made by its own block, then served by the loopback HTTP server (which
    counts the requests in flight), slowly enough that 200 requests at once press on the bound;
    the apps open it by its URL."""
    monkeypatch.chdir(tmp_path)
    (data,) = [block for block in _blocks() if not block.startswith("# ")]
    exec(compile(data, f"{PAGE.name}: the data", "exec"), {"__name__": "__main__"})
    folder = tmp_path / "data" / "web.zarr"
    for file in folder.rglob("*"):
        if file.is_file():
            http_server.objects[file.relative_to(folder).as_posix()] = file.read_bytes()
    http_server.faults = Faults(delay=0.005)
    monkeypatch.setenv("ARRAYS", http_server.url)
    return http_server


@functools.cache
def _expected() -> dict[int, float]:
    return {day: day * 100 + 49.5 for day in range(REQUESTS)}


def _hammer(url: str, store: Callable[[], AnyioStore], server: HTTPServer) -> None:
    """Send every request at once: each answered right, the store's bound held at the server."""
    server.most_in_flight = 0
    answers: dict[int, float] = {}

    async def send_all() -> None:
        limits = httpx.Limits(max_connections=REQUESTS)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one(day: int) -> None:
                response = await client.get(f"/temperature/{day}")
                response.raise_for_status()
                answers[day] = response.json()["mean"]

            async with anyio.create_task_group() as tg:
                for day in range(REQUESTS):
                    tg.start_soon(one, day)

    anyio.run(send_all)
    assert answers == _expected()
    # 2,000 chunk reads for 200 requests at once, never more than the bound in flight.
    assert server.most_in_flight == BOUND
    assert store().limiter.statistics().borrowed_tokens == 0


@pytest.fixture
def fastapi_app(arrays: HTTPServer) -> Iterator[tuple[str, Any]]:
    module = _page_module("fastapi_app")
    config = uvicorn.Config(module.app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", module.app
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_fastapi_app_shares_one_bounded_store(
    fastapi_app: tuple[str, Any], arrays: HTTPServer
) -> None:
    url, app = fastapi_app
    _hammer(url, lambda: app.state.store, arrays)


def test_the_fastapi_app_closes_its_store_at_shutdown(arrays: HTTPServer) -> None:
    module = _page_module("fastapi_app")
    config = uvicorn.Config(module.app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    store = module.app.state.store
    assert store._is_open
    server.should_exit = True
    thread.join(30)
    assert not store._is_open


def test_the_quart_trio_app_shares_one_bounded_store_and_closes_it(arrays: HTTPServer) -> None:
    module = _page_module("quart_trio_app")
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.loglevel = "WARNING"
    bound: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    def serve() -> None:
        async def main() -> None:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                serving = functools.partial(
                    hypercorn.trio.serve, module.app, config, shutdown_trigger=stop.wait
                )
                urls = await nursery.start(serving)
                bound.put((urls[0], trio.lowlevel.current_trio_token(), stop))

        trio.run(main)

    thread = threading.Thread(target=serve)
    thread.start()
    url, token, stop = bound.get(timeout=30)
    try:
        _hammer(url, lambda: module.arrays["store"], arrays)
        store = module.arrays["store"]
        assert store._is_open
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(30)
    assert not store._is_open
