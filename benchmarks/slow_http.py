"""A loopback HTTP server that answers every GET or HEAD after a fixed delay, for the
latency-bound benchmarks. It runs in a process of its own, so that its CPU time (and its GIL) is
not the client's: on a 2-core machine an in-process server caps the rate long before the client.

    python benchmarks/slow_http.py --delay 0.02 --size 4096
    python benchmarks/slow_http.py --delay 0.02 --root /tmp/array.zarr

prints ``http://127.0.0.1:PORT`` on its first line, then serves until its standard input closes:
every path with ``size`` bytes, or, with ``--root``, the files under that folder (404 for a path
that is not one), each read once and then answered from memory so that the server's disk is not
what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web


def file_answers(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by its path relative to it (with ``/``)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


async def serve(delay: float, size: int, root: Path | None) -> None:
    body = b"x" * size
    files = None if root is None else file_answers(root)

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        if files is None:
            return web.Response(body=body, headers={"Accept-Ranges": "bytes"})
        found = files.get(request.match_info["path"])
        if found is None:
            return web.Response(status=404)
        return web.Response(body=found, headers={"Accept-Ranges": "bytes"})

    app = web.Application()
    app.router.add_get("/{path:.*}", answer)  # and HEAD (zarrs' HTTP reader asks for sizes)
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
    parser.add_argument("--root", type=Path, default=None, help="serve this folder's files")
    args = parser.parse_args()
    asyncio.run(serve(args.delay, args.size, args.root))


if __name__ == "__main__":
    main()
