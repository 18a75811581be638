"""A loopback HTTP server that answers every GET or HEAD after a fixed delay, for the
latency-bound benchmark. It runs in a process of its own, so that its CPU time (and its GIL) is
not the client's: on a 2-core machine an in-process server caps the rate long before the client.

    python benchmarks/slow_http.py --delay 0.02 --size 4096

prints ``http://127.0.0.1:PORT`` on its first line, then serves every path with ``size`` bytes
until its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import web


async def serve(delay: float, size: int) -> None:
    body = b"x" * size

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(body=body, headers={"Accept-Ranges": "bytes"})

    app = web.Application()
    app.router.add_route("GET", "/{path:.*}", answer)  # aiohttp answers HEAD for GET routes
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    print(f"http://127.0.0.1:{port}", flush=True)
    # Serve until the parent closes our standard input (or goes away).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    asyncio.run(serve(args.delay, args.size))


if __name__ == "__main__":
    main()
