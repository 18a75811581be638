"""The ``zarr-anyio`` command: ``zarr-anyio demo [FOLDER]``.

The demo writes a Zarr array with zarr-python through `zarr_anyio.LocalStore`, then reads every
chunk back from a trio program through the store's bulk API and checks it against the array.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
import zarr

from .local import LocalStore

__all__ = ["main"]


def demo(folder: Path, backend: str) -> int:
    store = LocalStore(folder / "demo.zarr", max_concurrency=8)
    data = np.arange(256 * 256, dtype="int32").reshape(256, 256)
    array = zarr.create_array(
        store=store, shape=data.shape, chunks=(32, 32), dtype=data.dtype, compressors=None
    )
    array[:] = data
    print(f"wrote {array} with zarr-python: {array.nchunks} chunks in {store}")

    async def read_back() -> int:
        keys = [
            f"c/{i}/{j}" for i in range(data.shape[0] // 32) for j in range(data.shape[1] // 32)
        ]
        checked = 0
        started = time.perf_counter()
        async with store.fetch_many(keys) as results:
            async for key, buffer in results:
                assert buffer is not None, f"{key} is missing"
                i, j = (int(part) for part in key.split("/")[1:])
                chunk = np.frombuffer(buffer.to_bytes(), dtype="<i4").reshape(32, 32)
                if not np.array_equal(chunk, data[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32]):
                    raise SystemExit(f"chunk {key} differs from what zarr wrote")
                checked += 1
        elapsed = time.perf_counter() - started
        stats = store.limiter.statistics()
        print(
            f"read {checked} chunks back under {backend} with fetch_many in "
            f"{elapsed * 1000:.1f} ms, at most {store.max_concurrency} in flight "
            f"(limiter now: {stats.borrowed_tokens} borrowed, {stats.tasks_waiting} waiting)"
        )
        return checked

    checked = anyio.run(read_back, backend=backend)
    print(f"all {checked} chunks match the array zarr wrote")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zarr-anyio", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="write with zarr-python, read back under trio")
    demo_parser.add_argument("folder", nargs="?", type=Path, help="where to write (default: temp)")
    demo_parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    args = parser.parse_args(argv)
    if args.folder is not None:
        return demo(args.folder, args.backend)
    with tempfile.TemporaryDirectory() as folder:
        return demo(Path(folder), args.backend)


if __name__ == "__main__":
    sys.exit(main())
