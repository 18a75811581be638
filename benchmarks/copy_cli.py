"""``zarr-anyio copy`` from S3 to a local folder, beside the other ways to do it, in one run.

    python benchmarks/copy_cli.py            # 2,000 x 4 KiB and 64 x 8 MiB, median of 5
    python benchmarks/copy_cli.py --quick    # a short run
    python benchmarks/copy_cli.py --only huge --repeat 3   # one 2 GiB value (slow: selected)

The 2 GiB case needs ~2 GiB free where ``--tmp`` points (default: the system's temporary
folder) for each copy in turn, and ~2 GiB of memory for moto.

moto's S3 server runs in a process of its own. Each way of copying runs in a fresh process of
its own, so its peak memory (``VmHWM``) is its own; the time is that of the copy itself,
measured inside the process after the imports. The memory after the imports (the libraries
each one needs, its client's included: ``VmRSS`` before the copy starts) is shown beside the
peak, and the peak above it, which is what the copy itself holds:

* ``zarr-anyio copy`` (the console script's code, ``--quiet``), with s3fs and with obstore, at
  the default ``--max-memory`` (4M: parts of 1 MiB, two values at once, each counted with a
  MiB for its client's buffers) and with obstore at ``--max-memory 16M`` (parts of 2 MiB, five
  values at once) and ``64M`` (the default until it was measured here: values of 8 MiB read
  whole, eight at once);
* ``fsspec``: s3fs's ``fs.get(src, dst, recursive=True)``;
* ``asyncio.gather``: every key listed through ``zarr.storage.FsspecStore``, then one
  ``dst.set(key, await src.get(key))`` per key into ``zarr.storage.LocalStore``, all gathered.

The machine is shared: the load average is printed before and after, and runs are interleaved so
that a busy moment costs every contender alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CONTENDERS = [
    "zarr-anyio copy (fsspec)",
    "zarr-anyio copy (obstore)",
    "zarr-anyio copy (obstore, 16M)",
    "zarr-anyio copy (obstore, 64M)",
    "fsspec get",
    "asyncio.gather",
]
OURS = [name for name in CONTENDERS if name.startswith("zarr-anyio")]


def _s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def fill(endpoint: str, bucket: str, name: str, count: int, size: int) -> None:
    """``count`` objects of ``size`` bytes under ``bucket/name``: a Zarr array's chunks."""
    import anyio
    import numpy as np
    import zarr
    from zarr.core.buffer import default_buffer_prototype

    import zarr_anyio

    # moto takes over a minute to complete a 2 GiB multipart upload: botocore's 60 s read
    # timeout would end it.
    options = {**_s3_options(endpoint), "config_kwargs": {"read_timeout": 900}}
    store = zarr_anyio.FsspecStore.from_url(
        f"s3://{bucket}/{name}", storage_options=options, max_concurrency=16
    )
    items = size // 4
    zarr.create_array(
        store=store, shape=(count * items,), chunks=(items,), dtype="float32", compressors=None
    )
    part = min(size, 64 << 20)
    data = np.random.default_rng(0).bytes(part)
    if size > part:
        # A 2 GiB value goes up in parts, as the copy's streamed writes send it.
        async def parts() -> AsyncIterator[bytes]:
            for start in range(0, size, part):
                yield data[: min(part, size - start)]

        async def put_parts() -> None:
            for i in range(count):
                await store._set_streamed(f"c/{i}", parts())
            await store.aclose()

        anyio.run(put_parts)
        return
    values = [(f"c/{i}", default_buffer_prototype().buffer.from_bytes(data)) for i in range(count)]

    async def put() -> None:
        await store.set_many(values)
        await store.aclose()

    anyio.run(put)


# ---------------------------------------------------------------- the contenders (in a child)


def run_ours(endpoint: str, src: str, dst: str, backend: str, max_memory: str | None) -> float:
    from zarr_anyio.cli import main

    # The client the command imports when it opens the stores, imported here first so that
    # the memory after the imports counts it.
    __import__("obstore" if backend == "obstore" else "s3fs")
    imported()
    if backend == "obstore":
        options = [
            f"endpoint={endpoint}",
            "region=us-east-1",
            "access_key_id=testing",
            "secret_access_key=testing",
            "client_options.allow_http=true",
        ]
    else:
        options = ["key=testing", "secret=testing", f"client_kwargs.endpoint_url={endpoint}"]
    args = ["copy", src, dst, "--backend", backend, "--json", "--quiet"]
    if max_memory is not None:
        args += ["--max-memory", max_memory]
    args += [arg for option in options for arg in ("--storage-option", option)]
    stdout = sys.stdout
    sys.stdout = capture = _Capture()
    try:
        code = main(args)
    finally:
        sys.stdout = stdout
    if code:
        raise SystemExit(f"zarr-anyio copy failed with {code}")
    seconds: float = json.loads(capture.text)["seconds"]
    return seconds


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def run_fsspec(endpoint: str, src: str, dst: str) -> float:
    import fsspec
    import s3fs  # noqa: F401

    imported()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **_s3_options(endpoint))
    started = time.perf_counter()
    fs.get(src.removeprefix("s3://"), dst, recursive=True)
    return time.perf_counter() - started


def run_gather(endpoint: str, src: str, dst: str) -> float:
    import asyncio

    import s3fs  # noqa: F401
    import zarr.storage
    from zarr.core.buffer import default_buffer_prototype

    imported()

    async def copy() -> float:
        source = zarr.storage.FsspecStore.from_url(
            src, storage_options=_s3_options(endpoint), read_only=True
        )
        target = zarr.storage.LocalStore(dst)
        prototype = default_buffer_prototype()
        started = time.perf_counter()
        keys = [key async for key in source.list()]

        async def one(key: str) -> None:
            value = await source.get(key, prototype)
            assert value is not None
            await target.set(key, value)

        await asyncio.gather(*(one(key) for key in keys))
        return time.perf_counter() - started

    return asyncio.run(copy())


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own address space;
    ``ru_maxrss`` would also count the parent's memory at the fork before the exec."""
    return _status_mib("VmHWM")


_IMPORTED: list[float] = []


def imported() -> None:
    """Note the memory after the imports, before the copy."""
    _IMPORTED.append(_status_mib("VmRSS"))


def child(name: str, endpoint: str, src: str, dst: str) -> None:
    if name.startswith("zarr-anyio"):
        backend = "obstore" if "obstore" in name else "fsspec"
        budget = name.rstrip(")").rpartition(", ")[2]
        seconds = run_ours(endpoint, src, dst, backend, budget if budget[-1:] == "M" else None)
    elif name == "fsspec get":
        seconds = run_fsspec(endpoint, src, dst)
    else:
        seconds = run_gather(endpoint, src, dst)
    print(json.dumps({"seconds": seconds, "peak": peak_rss_mib(), "imported": _IMPORTED[0]}))


# ---------------------------------------------------------------- the parent


def measure(name: str, endpoint: str, src: str, dst: Path) -> tuple[float, float, float]:
    """One run of one contender in a process of its own: seconds, peak memory in MiB, memory
    after the imports in MiB."""
    command = [sys.executable, __file__, "--child", name, endpoint, src, str(dst)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{name} failed ({result.returncode}): {result.stdout}")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return float(found["seconds"]), float(found["peak"]), float(found["imported"])


def expected_files(count: int) -> int:
    return count + 1  # the chunks and the array's zarr.json


def bench(
    endpoint: str, bucket: str, name: str, count: int, size: int, repeat: int, tmp: str | None
) -> list[str]:
    fill(endpoint, bucket, name, count, size)
    src = f"s3://{bucket}/{name}"
    results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        for number in range(repeat):
            for contender in CONTENDERS:
                dst = Path(folder) / f"{number}-{contender.replace(' ', '_')}"
                results[contender].append(measure(contender, endpoint, src, dst))
                files = [path for path in dst.rglob("*") if path.is_file()]
                if len(files) != expected_files(count):
                    raise SystemExit(f"{contender} copied {len(files)} files, not {count + 1}")
                shutil.rmtree(dst)
    mib = count * size / 2**20
    lines = [
        f"\n## {count} x {size // 1024} KiB ({mib:.0f} MiB) from moto S3 to a folder "
        f"(median of {repeat}, load {' '.join(f'{x:.2f}' for x in os.getloadavg())})",
        f"{'':32s} {'seconds':>8s} {'MiB/s':>8s} {'keys/s':>8s} {'peak RSS MiB':>13s} "
        f"{'imports MiB':>12s} {'peak - imports':>15s}",
    ]
    medians = {}
    for contender, runs in results.items():
        seconds = statistics.median(run[0] for run in runs)
        peak = statistics.median(run[1] for run in runs)
        imports = statistics.median(run[2] for run in runs)
        medians[contender] = (seconds, peak, imports)
        lines.append(
            f"{contender:32s} {seconds:8.2f} {mib / seconds:8.1f} {count / seconds:8.0f} "
            f"{peak:13.0f} {imports:12.0f} {statistics.median(r[1] - r[2] for r in runs):15.0f}"
        )
    ours = min(medians[c][0] for c in OURS)
    best = min(medians[c][0] for c in CONTENDERS if c not in OURS)
    lines.append(f"time, best of ours / best of the others: {ours / best:.2f}")
    least = min(medians[c][1] for c in OURS)
    lines.append(f"peak memory, least of ours / fsspec get: {least / medians['fsspec get'][1]:.2f}")
    above = min(medians[c][1] - medians[c][2] for c in OURS)
    get_above = medians["fsspec get"][1] - medians["fsspec get"][2]
    lines.append(f"peak above the imports, least of ours / fsspec get: {above / get_above:.2f}")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument(
        "--only",
        choices=["small", "large", "huge"],
        default=None,
        help="one case; huge (one 2 GiB value) runs only when chosen",
    )
    parser.add_argument("--tmp", default=None, help="where the copies go (needs room)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    print(f"# zarr-anyio copy benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cores)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    # Imported here, not by the children: moto and the test servers would count in their
    # memory.
    from support.servers import S3ServerProcess

    server = S3ServerProcess()
    server.start()
    try:
        bucket = server.new_bucket()
        small = (200, 4096) if args.quick else (2000, 4096)
        large = (8, 8 << 20) if args.quick else (64, 8 << 20)
        huge = (1, 256 << 20) if args.quick else (1, 2 << 30)
        for name, (count, size) in (("small", small), ("large", large), ("huge", huge)):
            if args.only != name and (args.only is not None or name == "huge"):
                continue
            for line in bench(server.endpoint, bucket, name, count, size, repeat, args.tmp):
                print(line, flush=True)
    finally:
        server.stop()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
