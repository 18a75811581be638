"""A loopback HTTP server that throttles like S3, for the throttling benchmarks. It runs in a
process of its own, so that its CPU time (and its GIL) is not the client's.

    python benchmarks/throttle_http.py --delay 0.02 --rate 300
    python benchmarks/throttle_http.py --delay 0.1 --concurrency 48
    python benchmarks/throttle_http.py --delay 0.02 --window 300 [--window-kind fixed]
    python benchmarks/throttle_http.py --delay 0.2

Every GET or HEAD of any path is answered with ``size`` bytes after ``delay`` seconds, unless a
limit refuses it at once with S3's ``503 SlowDown``: ``--rate`` admits that many requests a
second (a token bucket with ``--burst``), ``--concurrency`` that many in flight, ``--window``
that many in any one second (a sliding window, as API gateways count; ``--window-kind fixed``:
in each second of the clock, the count reset on the second). ``GET
/__stats__`` gives the server's own counts as JSON (and the times of its answers), ``POST
/__reset__`` zeroes them. Prints ``http://127.0.0.1:PORT`` on its first line, serves until its
standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import sys
import time

from aiohttp import web

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class Counts:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.admitted = 0
        self.throttled = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.next_slot = 0.0
        self.window: collections.deque[float] = collections.deque()  # admitted, last second
        self.answers: list[tuple[float, bool]] = []  # (time, admitted)


async def serve(args: argparse.Namespace) -> None:
    body = b"x" * args.size
    counts = Counts()
    interval = 1.0 / args.rate if args.rate else 0.0

    def admit(now: float) -> bool:
        if args.concurrency and counts.in_flight > args.concurrency:
            return False
        if args.rate:
            # A token bucket (GCRA): admitted if its slot is within the burst.
            slot = max(counts.next_slot, now)
            if slot - now > (args.burst - 1) * interval:
                return False
            counts.next_slot = slot + interval
        if args.window:
            admitted = counts.window
            if args.window_kind == "fixed":
                while admitted and math.floor(admitted[0]) != math.floor(now):
                    admitted.popleft()
            else:
                while admitted and admitted[0] <= now - 1.0:
                    admitted.popleft()
            if len(admitted) >= args.window:
                return False
            admitted.append(now)
        return True

    async def answer(request: web.Request) -> web.Response:
        now = time.monotonic()
        counts.requests += 1
        counts.in_flight += 1
        counts.most_in_flight = max(counts.most_in_flight, counts.in_flight)
        try:
            if not admit(now):
                counts.throttled += 1
                counts.answers.append((now, False))
                return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
            await asyncio.sleep(args.delay)
            counts.admitted += 1
            counts.answers.append((time.monotonic(), True))
            return web.Response(body=body, headers={"Accept-Ranges": "bytes"})
        finally:
            counts.in_flight -= 1

    async def stats(request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(
                {
                    "requests": counts.requests,
                    "admitted": counts.admitted,
                    "throttled": counts.throttled,
                    "most_in_flight": counts.most_in_flight,
                    "answers": counts.answers if "answers" in request.query else [],
                }
            ),
            content_type="application/json",
        )

    async def reset(request: web.Request) -> web.Response:
        counts.reset()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("GET", "/__stats__", stats)
    app.router.add_route("POST", "/__reset__", reset)
    app.router.add_route("GET", "/{path:.*}", answer)  # aiohttp answers HEAD for GET routes
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = runner.addresses[0][1]
    print(f"http://127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s admitted (0: any)")
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=0, help="in flight (0: any)")
    parser.add_argument("--window", type=int, default=0, help="in any 1 s (0: any)")
    parser.add_argument("--window-kind", choices=["sliding", "fixed"], default="sliding")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
