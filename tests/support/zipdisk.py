"""Disks for the ZipStore tests: a small real filesystem to fill, or slow and full stand-ins.

`small_disk` mounts a 1 MiB tmpfs or a 4 MiB ext4 image (loop device) when the tests run as root,
and falls back to tmpfs, then to an injected ENOSPC (`zarr_anyio.storage._zipformat._write_at`,
the one place ZipStore writes) where mounting is not possible.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from zarr_anyio.storage import _zipformat


def _run(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


@contextmanager
def _mounted(kind: str, where: Path, scratch: Path) -> Iterator[bool]:
    mounted = False
    if kind != "injected" and os.geteuid() == 0 and shutil.which("mount"):
        if kind == "ext4" and shutil.which("mkfs.ext4"):
            image = scratch / "ext4.img"
            with open(image, "wb") as file:
                file.truncate(4 << 20)
            mounted = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image)) and _run(
                "mount", "-o", "loop", str(image), str(where)
            )
        if not mounted:
            mounted = _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where))
    try:
        yield mounted
    finally:
        if mounted:
            # Lazily, so a failing test that left a file open cannot leave the mount behind.
            _run("umount", "-l", str(where))


class SmallDisk:
    """A folder on a disk that a test can fill up (``fill``) and empty again (``free``)."""

    def __init__(self, path: Path, real: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self.real = real
        self._filler = path / "filler"
        self._budget: int | None = None
        if not real:
            real_write = _zipformat._write_at

            def write_at(fd: int, data: bytes | memoryview, offset: int) -> int:
                if self._budget is None:
                    return real_write(fd, data, offset)
                if self._budget <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written = real_write(fd, memoryview(data)[: self._budget], offset)
                self._budget -= written
                return written

            monkeypatch.setattr(_zipformat, "_write_at", write_at)

    def fill(self, leave: int = 0) -> None:
        """Leave about ``leave`` bytes free (a real disk rounds to its blocks)."""
        if not self.real:
            self._budget = leave
            return
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            block = b"\xff" * (64 << 10)
            size = 0
            while True:
                try:
                    size += os.pwrite(fd, block, size)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
            if leave:
                os.ftruncate(fd, max(0, size - leave))
        finally:
            os.close(fd)

    def free(self) -> None:
        self._budget = None
        with suppress(FileNotFoundError):
            os.unlink(self._filler)


@contextmanager
def small_disk(kind: str, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    """``kind`` is "tmpfs", "ext4" (falling back to tmpfs) or "injected"."""
    where = scratch / "disk"
    where.mkdir()
    with _mounted(kind, where, scratch) as mounted:
        yield SmallDisk(where, mounted, monkeypatch)


class SlowDisk:
    """Stands in for a disk whose every write takes ``delay`` seconds; counts them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        real_write = _zipformat._write_at

        def write_at(fd: int, data: bytes | memoryview, offset: int) -> int:
            with self._lock:
                self.calls += 1
            time.sleep(delay)
            return real_write(fd, data, offset)

        monkeypatch.setattr(_zipformat, "_write_at", write_at)
