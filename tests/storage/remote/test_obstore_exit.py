"""A program that used ObjectStore ends with its own exit code, never SIGABRT.

obstore (0.12) hands each result to the event loop from a Rust thread that lets go of the GIL
while it wakes the loop and then takes it back; when the program has ended by then, Python stops
that thread in a way Rust cannot unwind, and the process aborts after all its work succeeded
(measured: about one exit in three for plain obstore under load, one in ten through the store).
The store waits at exit for such threads to leave Python.
"""

from __future__ import annotations

import _thread
import subprocess
import sys
import threading
import time

import pytest

from support.servers import S3Server
from zarr_anyio.storage._obstore import _let_obstore_threads_leave_python

PROGRAM = """
import sys
import anyio
from zarr.core.buffer import cpu
import zarr_anyio
from obstore.store import S3Store

endpoint, bucket, backend, run = sys.argv[1:]


async def main() -> None:
    inner = S3Store(
        bucket, endpoint=endpoint, region="us-east-1", access_key_id="testing",
        secret_access_key="testing", client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    store = zarr_anyio.ObjectStore(inner)
    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(store.set, f"{run}/{i}", cpu.Buffer.from_bytes(b"x" * 1000))
    print("done", flush=True)


anyio.run(main, backend=backend)
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_programs_that_used_object_store_exit_with_their_own_code(
    s3_server: S3Server, backend: str
) -> None:
    bucket = s3_server.new_bucket()
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PROGRAM, s3_server.endpoint, bucket, backend, str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in range(6)
    ]
    results = [(run.communicate(timeout=120), run.returncode) for run in runs]
    for (out, err), code in results:
        assert (code, out) == (0, "done\n"), err[-2000:]


def test_the_exit_waits_for_a_thread_that_is_inside_python_and_no_longer() -> None:
    """What the store registers at exit: a thread that is not one of ``threading``'s (as a Rust
    thread is) and is running Python is waited for, until it leaves."""
    left = threading.Event()

    def foreign() -> None:
        time.sleep(0.3)
        left.set()

    _thread.start_new_thread(foreign, ())
    time.sleep(0.01)
    _let_obstore_threads_leave_python(bound=10)
    assert left.is_set()


def test_the_exit_wait_is_bounded() -> None:
    release = threading.Event()
    _thread.start_new_thread(release.wait, (5,))
    time.sleep(0.01)
    _let_obstore_threads_leave_python(bound=0.1)
    assert not release.is_set()
    release.set()
