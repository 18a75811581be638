"""A loopback HTTP server that throttles like S3, for the throttling benchmarks. It runs in a
process of its own, so that its CPU time (and its GIL) is not the client's.

    python benchmarks/throttle_http.py --delay 0.02 --rate 300
    python benchmarks/throttle_http.py --delay 0.1 --concurrency 48
    python benchmarks/throttle_http.py --delay 0.02 --window 300 [--window-kind fixed]
    python benchmarks/throttle_http.py --delay 0.1 --concurrency 48 --queue
    python benchmarks/throttle_http.py --delay 0.02 --rate 300 --status 429 --retry-after 1
    python benchmarks/throttle_http.py --delay 0.02 --rate 300 --rate-changes 2:100,4:300
    python benchmarks/throttle_http.py --delay 0.2

Every GET or HEAD of any path is answered with ``size`` bytes after ``delay`` seconds, unless a
limit refuses it at once with S3's ``503 SlowDown`` (``--status 429``: 429 Too Many Requests;
``--retry-after S``: with that header): ``--rate`` admits that many requests a second (a token
bucket with ``--burst``; ``--rate-changes T:R,...``: R a second from T seconds after the first
request), ``--concurrency`` that many in flight (``--queue``: the rest wait for a place, nothing
is refused), ``--window`` that many in any one second (a sliding window, as API gateways count;
``--window-kind fixed``: in each second of the clock, the count reset on the second). The
limits are the tests' own (``tests/support/limits.py``). ``GET /__stats__`` gives the server's
own counts as JSON (and the times of its answers), ``POST /__reset__`` zeroes them. Prints
``http://127.0.0.1:PORT`` on its first line, serves until its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.limits import Admission, Limits

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
        self.admission = Admission()
        self.answers: list[tuple[float, bool]] = []  # (time, admitted)


def limits_of(args: argparse.Namespace) -> Limits:
    """What a server started with ``args`` (`parser`'s) admits."""
    return Limits(
        rate=args.rate or None,
        burst=args.burst,
        rate_changes=tuple(
            (float(after), float(rate))
            for after, _, rate in (change.partition(":") for change in args.rate_changes)
        ),
        concurrency=args.concurrency or None,
        queue=args.queue,
        service=args.delay,
        window=args.window or None,
        window_kind=args.window_kind,
    )


async def serve(args: argparse.Namespace) -> None:
    body = b"x" * args.size
    counts = Counts()
    limits = limits_of(args)
    refusal_body, refusal_type = (
        (b"Too Many Requests", "text/plain")
        if args.status == 429
        else (SLOW_DOWN, "application/xml")
    )
    refusal_headers = {} if args.retry_after is None else {"Retry-After": str(args.retry_after)}

    async def answer(request: web.Request) -> web.Response:
        now = time.monotonic()
        counts.requests += 1
        counts.in_flight += 1
        counts.most_in_flight = max(counts.most_in_flight, counts.in_flight)
        admission = counts.admission
        admission.arrives(request.path, now)
        try:
            verdict = admission.judge(limits, now, counts.in_flight)
            if verdict.refused:
                counts.throttled += 1
                counts.answers.append((now, False))
                if args.retry_after is not None:
                    admission.told_retry_after(request.path, time.monotonic(), args.retry_after)
                return web.Response(
                    status=args.status,
                    body=refusal_body,
                    content_type=refusal_type,
                    headers=refusal_headers,
                )
            await asyncio.sleep(verdict.wait + args.delay)
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
                    "queued": counts.admission.queued,
                    "early": counts.admission.early,
                    "phases": counts.admission.phases,
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


def options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s admitted (0: any)")
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=0, help="in flight (0: any)")
    parser.add_argument("--window", type=int, default=0, help="in any 1 s (0: any)")
    parser.add_argument("--window-kind", choices=["sliding", "fixed"], default="sliding")
    parser.add_argument("--queue", action="store_true", help="queue beyond --concurrency")
    parser.add_argument("--status", type=int, choices=[503, 429], default=503)
    parser.add_argument("--retry-after", type=int, help="seconds, told to refused requests")
    parser.add_argument(
        "--rate-changes",
        type=lambda text: text.split(","),
        default=[],
        help="T:R,... (R requests/s from T s after the first request)",
    )
    return parser


def main() -> None:
    asyncio.run(serve(options_parser().parse_args()))


if __name__ == "__main__":
    main()
