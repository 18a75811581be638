"""A loopback HTTP server that answers every GET or HEAD after a fixed delay, for the
latency-bound benchmarks. It runs in a process of its own, so that its CPU time (and its GIL) is
not the client's: on a 2-core machine an in-process server caps the rate long before the client.

    python benchmarks/slow_http.py --delay 0.02 --size 4096
    python benchmarks/slow_http.py --delay 0.02 --root /tmp/array.zarr

prints ``http://127.0.0.1:PORT`` on its first line, then serves until its standard input closes:
every path with ``size`` bytes, or, with ``--root``, the files under that folder (404 for a path
that is not one), each read once and then answered from memory so that the server's disk is not
what is measured. A single byte range (``Range: bytes=a-b``, ``a-``, ``-n``) is answered 206, one
past the end 416; several ranges, the whole object.

It stands in for a server on another machine, so it costs the client's machine as little as it
can: HTTP/1.1 with keep-alive on a bare ``asyncio.Protocol`` (uvloop's loop where installed),
every answer's head made once, each answer written by a timer (``loop.call_at``) ``delay``
seconds after its request arrived, in the order the requests came on its connection. Measured
against aiohttp's web server, which it replaced, serving 2,000 chunks of 64 KiB at 64 in flight:
≈100-120 µs of CPU a request there, ≈30-40 here (≈10 of it the kernel's); a request alone on a
new connection takes 21.1-21.3 ms where aiohttp's took 21.5 (docs/pipeline.md, "Remote").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import cast
from urllib.parse import unquote

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 << 10  # a request head longer than this is refused (400)


def file_answers(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by its path relative to it (with ``/``)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def head(status: str, headers: dict[str, str | int]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Answers:
    """Each object's whole answer (head and body in one buffer, made once), and ranges of it."""

    def __init__(self, objects: dict[str, bytes] | None, size: int) -> None:
        self._every: tuple[bytes, int] | None = None
        self._objects: dict[str, tuple[bytes, int]] = {}
        if objects is None:
            self._every = self._whole(b"x" * size)
        else:
            self._objects = {path: self._whole(body) for path, body in objects.items()}
        self.not_found = head("404 Not Found", {"Content-Length": 0})
        self.bad_request = head("400 Bad Request", {"Content-Length": 0, "Connection": "close"})
        self.not_allowed = head(
            "405 Method Not Allowed",
            {"Content-Length": 0, "Allow": "GET, HEAD", "Connection": "close"},
        )

    @staticmethod
    def _whole(body: bytes) -> tuple[bytes, int]:
        start = head(
            "200 OK",
            {
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
                "Content-Length": len(body),
            },
        )
        return start + body, len(start)

    def find(self, path: str) -> tuple[bytes, int] | None:
        """The whole answer for ``path`` and where its body starts in it, if there is one."""
        return self._every if self._every is not None else self._objects.get(path)

    def answer(self, path: str, method: bytes, ranges: bytes | None) -> list[bytes | memoryview]:
        found = self.find(path)
        if found is None:
            return [self.not_found]
        whole, body_at = found
        size = len(whole) - body_at
        if ranges is not None:
            span = byte_range(ranges, size)
            if span is not None:
                start, stop = span
                if start >= stop:
                    return [
                        head(
                            "416 Range Not Satisfiable",
                            {"Content-Range": f"bytes */{size}", "Content-Length": 0},
                        )
                    ]
                part = head(
                    "206 Partial Content",
                    {
                        "Content-Type": "application/octet-stream",
                        "Accept-Ranges": "bytes",
                        "Content-Range": f"bytes {start}-{stop - 1}/{size}",
                        "Content-Length": stop - start,
                    },
                )
                if method == b"HEAD":
                    return [part]
                return [part, memoryview(whole)[body_at + start : body_at + stop]]
        if method == b"HEAD":
            return [memoryview(whole)[:body_at]]
        return [whole]


def byte_range(value: bytes, size: int) -> tuple[int, int] | None:
    """``[start, stop)`` of one ``bytes=`` range of an object of ``size`` bytes (``start >=
    stop``: not satisfiable); ``None`` for what is not one range (answered whole)."""
    unit, _, spec = value.strip().partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    try:
        if not dash:
            return None
        if not first:  # the last n bytes
            suffix = int(last)
            return (max(0, size - suffix), size) if suffix > 0 else (size, size)
        start = int(first)
        stop = size if not last else min(size, int(last) + 1)
    except ValueError:
        return None
    if last and int(last) < start:
        return None  # invalid: ignored, as RFC 9110 says
    return start, stop


class Connection(asyncio.Protocol):
    """One client's connection: requests parsed as they come, each answered ``delay`` seconds
    after it arrived, answers in the order of their requests."""

    def __init__(self, answers: Answers, delay: float) -> None:
        self.answers = answers
        self.delay = delay
        self.received = b""
        # Answers not yet written, in request order: [ready, parts, close after].
        self.queue: deque[list[object]] = deque()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclass of asyncio's, but they are one to use.
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        received = self.received + data if self.received else data
        arrived = self.loop.time()
        while True:
            end = received.find(HEAD_END)
            if end < 0:
                if len(received) > MAX_HEAD:
                    self.refuse(self.answers.bad_request)
                    return
                break
            request, received = received[:end], received[end + 4 :]
            if not self.take(request, arrived):
                return
        self.received = received

    def take(self, request: bytes, arrived: float) -> bool:
        """Queue the answer to one request head; ``False`` if the connection is to end."""
        lines = request.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.refuse(self.answers.bad_request)
            return False
        method, target, version = parts
        ranges = None
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"range":
                ranges = value
            elif name == b"connection":
                token = value.strip().lower()
                close = token == b"close" or (close and token != b"keep-alive")
            elif name in (b"content-length", b"transfer-encoding") and value.strip() != b"0":
                # A body: no GET or HEAD of ours has one; refused, and the connection ends.
                self.refuse(self.answers.not_allowed)
                return False
        if method not in (b"GET", b"HEAD"):
            self.refuse(self.answers.not_allowed)
            return False
        path = unquote(target.split(b"?", 1)[0].decode("latin-1")).lstrip("/")
        entry: list[object] = [False, self.answers.answer(path, method, ranges), close]
        self.queue.append(entry)
        self.loop.call_at(arrived + self.delay, self.ready, entry)
        if close:
            self.closing = True
            return False
        return True

    def ready(self, entry: list[object]) -> None:
        entry[0] = True
        self.flush()

    def flush(self) -> None:
        queue, transport = self.queue, self.transport
        while queue and queue[0][0]:
            _, parts, close = queue.popleft()
            if transport is None:
                return
            assert isinstance(parts, list)
            for part in parts:
                transport.write(part)
            if close:
                transport.close()
                self.transport = None
                return

    def refuse(self, answer: bytes) -> None:
        """Answer ``answer`` after the requests before it, then close the connection."""
        self.closing = True
        self.queue.append([True, [answer], True])
        self.flush()


async def serve(delay: float, size: int, root: Path | None) -> None:
    answers = Answers(None if root is None else file_answers(root), size)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(answers, delay), "127.0.0.1", 0, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}", flush=True)
    # Serve until the parent closes our standard input (or goes away).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def runner() -> Callable[..., None]:
    """uvloop's ``run`` where installed (cheaper sockets and timers), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    run: Callable[..., None] = uvloop.run
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--root", type=Path, default=None, help="serve this folder's files")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="uvloop if installed"
    )
    args = parser.parse_args()
    run = runner() if args.loop == "uvloop" else asyncio.run
    run(serve(args.delay, args.size, args.root))


if __name__ == "__main__":
    main()
