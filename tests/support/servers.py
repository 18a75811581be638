"""Real protocol peers on 127.0.0.1 for the remote-store tests: moto's S3 server, and a small
HTTP server with Range support that can count requests in flight and inject faults."""

from __future__ import annotations

import http.client
import logging
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests

from .limits import Admission, Limits

# The sync s3fs filesystems `s3fs_at` made, kept until the process exits (see there).
_SYNC_FILESYSTEMS: list[Any] = []


def s3fs_at(endpoint: str, *, client_retries: bool = False, **options: Any) -> Any:
    """An s3fs filesystem speaking to the S3 server (or proxy, or fake) at ``endpoint``, with
    its own retries and botocore's off (the store retries), unless ``client_retries``."""
    import s3fs

    if not client_retries:
        # With its mode named, botocore leaves the dict (and so the filesystem's token) as is.
        options.setdefault(
            "config_kwargs", {"retries": {"total_max_attempts": 1, "mode": "standard"}}
        )
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
        **options,
    )
    if not client_retries:
        fs.retries = 1
    if not options.get("asynchronous", False):
        # s3fs closes a sync filesystem's client when it is collected, on the event loop
        # running in the collecting thread if there is one: a test's loop, not fsspec's, where
        # the client lives (in CI: "got Future attached to a different loop", raised into a
        # copy test). Kept until the process exits, they are closed on fsspec's own loop.
        _SYNC_FILESYSTEMS.append(fs)
    return fs


class S3Server:
    """moto's S3 server in a thread, on a free loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> None:
        self._server.start()
        assert self._server._server is not None
        self.endpoint = f"http://127.0.0.1:{self._server._server.server_port}"

    def stop(self) -> None:
        self._server.stop()

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:16]}"
        response = requests.put(f"{self.endpoint}/{name}", timeout=10)
        response.raise_for_status()
        return name

    def s3fs(self, **options: Any) -> Any:
        return s3fs_at(self.endpoint, **options)

    def setup_fs(self) -> Any:
        """A sync s3fs filesystem for a test's own setup and checks, not under test: with the
        clients' retries on, since one connect timeout to moto under CI's load failed a test in
        its setup."""
        return s3fs_at(self.endpoint, client_retries=True, skip_instance_cache=True)

    def obstore(self, bucket: str, **options: Any) -> Any:
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id="testing",
            secret_access_key="testing",
            region="us-east-1",
            client_options={"allow_http": True},
            **{"retry_config": {"max_retries": 0}, **options},  # the store retries
        )


class S3ServerProcess(S3Server):
    """moto's S3 server in a process of its own, so that its CPU time (and GIL) is not the
    client's: for benchmarks. Started and stopped like `S3Server`."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(self.endpoint, timeout=1)
            except requests.ConnectionError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto's server did not start on {self.endpoint}") from None
                time.sleep(0.1)
            else:
                return

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


@dataclass
class Faults:
    """What share of requests the HTTP server spoils, and how; and the limits it enforces.

    The limits (`limits.Limits`) answer like S3 when a client goes too fast: 503 with an S3
    ``SlowDown`` body (or 429, `limit_status`), at once; or, with `queue`, make it wait.
    """

    slow_down: float = 0.0  # share answered 503 SlowDown
    server_error: float = 0.0  # share answered 500
    drop: float = 0.0  # share whose connection is closed without an answer
    too_many: float = 0.0  # share answered 429 (with `retry_after`, if set)
    truncate: float = 0.0  # share of reads whose body stops half-way short of Content-Length
    delay: float = 0.0  # seconds to wait before answering every admitted request
    rate_limit: float | None = None  # requests a second admitted; beyond: 503 SlowDown
    rate_burst: int = 1  # how many requests may come at once within the rate
    concurrency_limit: int | None = None  # requests in flight admitted; beyond: 503 SlowDown
    queue: bool = False  # beyond `concurrency_limit`, wait for a place: nothing refused
    rate_changes: tuple[tuple[float, float], ...] = ()  # (s after the first request, new rate)
    # At most `window_limit` requests admitted in any one second ("sliding", as API gateways
    # count) or in each second of the clock ("fixed": the count resets on the second); beyond:
    # 503 SlowDown at once. Refused requests are not counted against the limit.
    window_limit: int | None = None
    window_kind: str = "sliding"
    too_many_first: int = 0  # the first n requests are answered 429 (with `retry_after`)
    retry_after: str | None = None  # the Retry-After header of 429 and 503 answers
    limit_status: int = 503  # how the limits refuse: 503 SlowDown or 429 Too Many Requests
    hang_first: int = 0  # the first n requests hang until `release()` (or `hang_for` s)
    hang_from: int = 1  # ... counted from this request (2: the second to the n+1-th)
    hang_for: float = 60.0
    message: str = "Please reduce your request rate."  # the S3 error message of a 503
    ignore_range: bool = False  # answer a range request with 200 and the whole object
    range_shift: int = 0  # answer a range request with the bytes this far on (and say so)
    seed: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._random.seed(self.seed)

    def limits(self) -> Limits:
        return Limits(
            rate=self.rate_limit,
            burst=self.rate_burst,
            rate_changes=self.rate_changes,
            concurrency=self.concurrency_limit,
            queue=self.queue,
            service=self.delay,
            window=self.window_limit,
            window_kind=self.window_kind,
        )

    def pick(self) -> str | None:
        roll = self._random.random()
        for kind, share in (
            ("503", self.slow_down),
            ("500", self.server_error),
            ("drop", self.drop),
            ("429", self.too_many),
            ("truncate", self.truncate),
        ):
            if roll < share:
                return kind
            roll -= share
        return None


class HTTPServer:
    """Serves a dict of objects over HTTP/1.1 on loopback, with Range, HEAD, PUT and DELETE.

    A request path is percent-decoded into its key, as object stores do, and the raw paths
    received are kept in ``paths``. Counts requests and how many were in flight at once (a
    request leaves the count before the first byte of its answer is sent, so a client that
    sends the next one as soon as it has an answer is never counted twice), and can spoil a
    share of them or enforce limits (`Faults`); every count is the server's own (the
    limits' in ``admission``: phases of the rate, requests queued, retries sooner than a
    ``Retry-After`` in seconds asked).
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        # HTML index pages, by folder path (no slash at either end): what an autoindex serves.
        self.pages: dict[str, str] = {}
        self.faults = Faults()
        self.requests = 0
        self.spoiled: dict[str, int] = {"503": 0, "500": 0, "drop": 0, "429": 0, "truncate": 0}
        self.throttled = 0  # 503s of the rate and concurrency limits
        self.in_flight = 0
        self.most_in_flight = 0
        self.times: list[float] = []
        self.paths: list[str] = []
        self.answers: list[int] = []
        self.hung = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.admission = Admission()
        self.cancelled_mid_request = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out without a 40 ms stall
            _left = True  # whether the request being answered has left the count in flight

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _enter(self) -> tuple[str | None, bool, float]:
                """Count the request; give its fault, whether it hangs, how long it queues."""
                with server._lock:
                    now = time.monotonic()
                    server.requests += 1
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                    server.times.append(now)
                    server.paths.append(self.path)
                    faults = server.faults
                    first = faults.hang_from
                    hang = first <= server.requests < first + faults.hang_first
                    server.admission.arrives(self.path, now)
                    fault = "429" if server.requests <= faults.too_many_first else faults.pick()
                    wait = 0.0
                    if fault is None:
                        verdict = server.admission.judge(faults.limits(), now, server.in_flight)
                        fault = "limit" if verdict.refused else None
                        wait = verdict.wait
                    if fault == "limit":
                        server.throttled += 1
                    elif fault:
                        server.spoiled[fault] += 1
                    if hang:
                        server.hung += 1
                return fault, hang, wait

            def _leave(self) -> None:
                with server._lock:
                    if not self._left:
                        self._left = True
                        server.in_flight -= 1

            def _answer(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                self._leave()
                with server._lock:
                    server.answers.append(status)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _key(self) -> str:
                raw = urllib.parse.urlsplit(self.path).path
                return urllib.parse.unquote(raw.lstrip("/"))

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                self._left = False
                fault, hang, queued = self._enter()
                try:
                    self._respond(method, body, fault, hang, queued)
                finally:
                    # A request that fails half-way (a client gone, a bad Range) leaves the
                    # count too: a count left high refuses the next test's requests.
                    self._leave()

            def _respond(
                self, method: str, body: bytes, fault: str | None, hang: bool, queued: float
            ) -> None:
                faults = server.faults
                if hang:
                    server._release.wait(faults.hang_for)
                if queued:
                    time.sleep(queued)
                if fault == "drop":
                    self._leave()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                retry_after = {"Retry-After": faults.retry_after} if faults.retry_after else {}
                if fault in ("503", "429", "limit") and (faults.retry_after or "").isdigit():
                    with server._lock:
                        server.admission.told_retry_after(
                            self.path, time.monotonic(), float(faults.retry_after or 0)
                        )
                if fault == "limit" and faults.limit_status == 429:
                    fault = "429"
                if fault in ("503", "limit"):
                    error = (
                        f"<Error><Code>SlowDown</Code><Message>{faults.message}</Message></Error>"
                    ).encode()
                    self._answer(503, error, retry_after)
                    return
                if fault == "429":
                    self._answer(429, b"too many requests", retry_after)
                    return
                if faults.delay:
                    time.sleep(faults.delay)
                if fault == "500":
                    self._answer(500, b"oops")
                    return
                key = self._key()
                if method == "PUT":
                    server.objects[key] = body
                    self._answer(200)
                    return
                if method == "DELETE":
                    server.objects.pop(key, None)
                    self._answer(204)
                    return
                data = server.objects.get(key)
                page = server.pages.get(key.strip("/"))
                if data is None and page is not None and method in ("GET", "HEAD"):
                    self._answer(200, page.encode(), {"Content-Type": "text/html"})
                    return
                if data is None:
                    self._answer(404, b"not found")
                    return
                if fault == "truncate" and method == "GET" and len(data) > 1:
                    # Announce the whole body, send half, hang up.
                    self._leave()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._serve(data)

            def _serve(self, data: bytes) -> None:
                wanted = self.headers.get("Range")
                if not wanted or server.faults.ignore_range:
                    self._answer(200, data, {"Accept-Ranges": "bytes"})
                    return
                spec = wanted.removeprefix("bytes=")
                first, _, last = spec.partition("-")
                size = len(data)
                if first == "":
                    start, end = max(0, size - int(last)), size
                else:
                    start = int(first)
                    end = min(size, int(last) + 1) if last else size
                if start >= size and size > 0:
                    self._answer(416, b"", {"Content-Range": f"bytes */{size}"})
                    return
                shift = server.faults.range_shift
                if shift:
                    start, end = min(start + shift, size - 1), min(end + shift, size)
                self._answer(
                    206,
                    data[start:end],
                    {
                        "Content-Range": f"bytes {start}-{max(start, end - 1)}/{size}",
                        "Accept-Ranges": "bytes",
                    },
                )

            def do_GET(self) -> None:
                self._handle("GET")

            def do_HEAD(self) -> None:
                self._handle("HEAD")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the default 5 drops connections under a burst
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that hangs up before the whole answer is sent (a cancelled read,
                # a range cut from a whole object) is no error of the server's.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        """Let every hanging request go on."""
        self._release.set()

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        self.release()
        # The requests an earlier test left (released from a hang, or still in their delay)
        # finish first: counted in flight, they would refuse this test's under a concurrency
        # limit.
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.in_flight:
            raise AssertionError(f"{self.in_flight} requests of an earlier test still in flight")
        with self._lock:
            self.objects.clear()
            self.pages.clear()
            self.faults = Faults()
            self.requests = 0
            self.spoiled = {"503": 0, "500": 0, "drop": 0, "429": 0, "truncate": 0}
            self.throttled = 0
            self.most_in_flight = 0
            self.hung = 0
            self.times.clear()
            self.paths.clear()
            self.answers.clear()
            self.admission = Admission()
            self._release = threading.Event()


class CountingProxy:
    """A plain HTTP proxy on loopback in front of another server (moto's S3), that logs every
    request it forwards as ``(method, path)``: requests counted at the server, whichever client
    made them and in whichever process. Point the client's endpoint at ``url``."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.log: list[tuple[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.delay = 0.0  # seconds each request waits before it is passed on
        # (path ending, bytes, action): the first GET of a path with that ending gets only that
        # many bytes of its body, ``action()`` runs, then the connection is cut.
        self.cut_get: tuple[str, int, Any] | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(parts)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:
                    # The client went away mid-body (a killed copy): S3 would never take the
                    # request, so it is not passed on cut short either.
                    raise ConnectionError(f"{len(body)} of {length} bytes of a request's body")
                return body

            def _forward(self) -> None:
                try:
                    body = self._body()
                except (ConnectionError, ValueError):  # ValueError: a chunked body cut short
                    self.close_connection = True
                    return
                with proxy._lock:
                    proxy.log.append((self.command, self.path))
                    proxy.in_flight += 1
                    proxy.most_in_flight = max(proxy.most_in_flight, proxy.in_flight)
                try:
                    if proxy.delay:
                        time.sleep(proxy.delay)
                    self._pass_on(body)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _pass_on(self, body: bytes) -> None:
                headers = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in ("transfer-encoding", "content-length", "connection")
                }
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(
                    target.hostname or "127.0.0.1", target.port, timeout=30
                )
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                # A HEAD answer has no body but tells the length of the object.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                cut, proxy.cut_get = proxy.cut_get, None
                if cut is not None and not (
                    self.command == "GET" and self.path.split("?")[0].endswith(cut[0])
                ):
                    proxy.cut_get, cut = cut, None
                if cut is not None:
                    self.wfile.write(data[: cut[1]])
                    self.wfile.flush()
                    cut[2]()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str) -> int:
        with self._lock:
            return sum(1 for logged, _ in self.log if logged == method)

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until no request is being passed on (a killed client's last ones included)."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} requests still in flight")
            time.sleep(0.01)
        time.sleep(0.05)  # a request whose body was still arriving
