"""What each command does, once its arguments are parsed: ``copy``, ``ls``, ``info``, ``demo``.

Each runs under `interruptible` (SIGINT/SIGTERM stop it cleanly), opens its stores with
`open_url`, closes them whatever happens, and gives the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import anyio
import numpy as np
import zarr

from zarr_anyio._core.errors import single_error
from zarr_anyio._core.extras import missing_module
from zarr_anyio.storage import AnyioStore, LocalStore, MemoryStore
from zarr_anyio.storage._redact import redact

from .copy import CopyOptions, CopyReport, copy_node
from .copy_plan import DestinationHoldsData
from .info import describe, human_size, render_info, render_tree
from .new_place import emptied_if_still_empty, empty_file, first_missing, remove_if_still_empty
from .plain_listing import PlainEntry, list_level, render_level
from .progress import choose_mode, show_progress, store_counters
from .signals import Interrupt, interruptible
from .urls import (
    UsageError,
    close_stores,
    ensure_open,
    exists,
    inside,
    local_path,
    open_url,
    place,
    scheme,
)
from .verify import verify_node

__all__ = ["PROG", "copy_command", "demo", "demo_command", "info_command", "ls_command"]

PROG = "zarr-anyio"
TRIO_EXTRA = "pip install 'zarr-anyio[trio]'"


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


def demo_command(args: argparse.Namespace) -> int:
    backend = _demo_backend(args.backend)
    if args.folder is not None:
        return demo(args.folder, backend)
    with tempfile.TemporaryDirectory() as folder:
        return demo(Path(folder), backend)


def _demo_backend(asked: str | None) -> str:
    """The backend the demo reads under: checked before it writes anything, so that a base
    install (no trio) either runs the whole demo under asyncio or names the extra up front."""
    trio_missing = missing_module("trio") is not None
    if asked == "trio" and trio_missing:
        # anyio's own message would name anyio[trio]; ours installs trio at a tested version.
        raise UsageError("--backend trio needs trio, which is not installed: " + TRIO_EXTRA)
    if asked is None and trio_missing:
        print(f"trio is not installed ({TRIO_EXTRA}): reading back under asyncio")
        return "asyncio"
    return asked or "trio"


def _summary_lines(report: CopyReport, args: argparse.Namespace, verified: bool) -> list[str]:
    verb = "would copy" if args.dry_run else "copied"
    total = report.keys_total if report.keys_total is not None else "?"
    plan = [f"would copy {key}" for key in sorted(report.would_copy)]
    plan += [f"would delete {key}" for key in sorted(report.would_delete)]
    lines = [
        *plan,
        f"{verb} {report.keys_copied} keys ({human_size(report.bytes_copied)}), "
        f"skipped {report.keys_skipped} ({human_size(report.bytes_skipped)}) already there, "
        f"{report.keys_done} of {total} keys in {report.seconds:.1f} s",
    ]
    if report.keys_deleted:
        verb_deleted = "would delete" if args.dry_run else "deleted"
        lines.append(f"{verb_deleted} {report.keys_deleted} keys that SRC does not have")
    if report.keys_in_doubt:
        lines.append(
            f"{report.keys_in_doubt} more keys were being written when it stopped: each is at "
            "DST whole or not at all"
        )
    if report.keys_vanished:
        lines.append(f"{report.keys_vanished} keys vanished from the source while copying")
    if report.invalid_keys:
        examples = ", ".join(repr(k) for k in report.examples.get("invalid keys", [])[:3])
        lines.append(f"left out {report.invalid_keys} objects that are not valid keys: {examples}")
    if args.verify and verified:
        lines.append(
            f"verified {report.keys_verified} keys by {args.verify}: "
            f"{report.mismatched_keys} differ"
        )
        for example in report.examples.get("mismatched", []):
            lines.append(f"  differs: {example}")
    return lines


def _copy_json(
    report: CopyReport, args: argparse.Namespace, counters: dict[str, int] | None, status: str
) -> str:
    summary: dict[str, Any] = {
        "status": status,
        "source": redact(args.src),
        "destination": redact(args.dst),
        "path": args.path,
        "dry_run": args.dry_run,
        "verify": args.verify,
        **report.as_dict(),
        "requests": counters,
    }
    if args.dry_run:
        summary["would_copy"] = sorted(report.would_copy)
        summary["would_delete"] = sorted(report.would_delete)
    return json.dumps(summary, indent=2)


async def _copy(args: argparse.Namespace, interrupt: Interrupt, out: TextIO) -> int:
    src_place, dst_place = place(args.src), place(args.dst)
    if src_place == dst_place:
        raise UsageError("SRC and DST are the same place")
    if inside(dst_place, src_place):
        # Each run would copy what the last one wrote, one level deeper.
        raise UsageError("DST is inside SRC: copy to a place outside it")
    if inside(src_place, dst_place):
        # DST's keys that SRC does not have would include SRC itself: replacing DST deletes it.
        raise UsageError("SRC is inside DST: copy to a place that does not hold SRC")
    if scheme(args.dst) in ("http", "https"):
        raise UsageError(f"cannot write to {args.dst!r}: HTTP is read-only here")
    if args.size_only and not args.skip_existing:
        raise UsageError("--size-only goes with --skip-existing (it says how keys are compared)")
    src = open_url(args.src, args, args.src_storage_option, "r")
    made = None if args.dry_run else first_missing(args.dst)
    # A file of no bytes (``touch out.zip``) is left with no bytes by a copy that fails.
    found_empty = None if args.dry_run else empty_file(args.dst)
    # A dry run writes nothing, so it does not create DST either.
    dst: AnyioStore
    try:
        dst = open_url(args.dst, args, args.dst_storage_option, "r" if args.dry_run else "a")
    except FileNotFoundError:
        if not args.dry_run:
            raise
        dst = MemoryStore(read_only=True)  # a destination that does not exist yet reads empty
    report = CopyReport()
    options = CopyOptions(
        workers=args.max_concurrency,
        existing="skip" if args.skip_existing else "overwrite" if args.overwrite else "refuse",
        compare="size" if args.size_only else "bytes",
        dry_run=args.dry_run,
        max_bytes=args.max_memory,
    )
    mode = choose_mode(args.quiet)

    def counters() -> dict[str, int] | None:
        return store_counters([src, dst])

    status = "done"
    verified = False
    failure: BaseException | None = None
    try:
        with interrupt.scope, single_error():
            await ensure_open(src, "source", args.src)
            if not args.dry_run:
                target = local_path(args.dst)
                if made is not None and target is not None:
                    # A zip store makes its file but not the folders above it (a folder store
                    # makes both).
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                await ensure_open(dst, "destination", args.dst)
            elif not await exists(dst):
                await close_stores(dst)
                dst = MemoryStore(read_only=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(show_progress, report, counters, mode, None, args.progress_interval)
                await copy_node(src, dst, args.path or "", options, report)
                if args.verify:
                    await verify_node(
                        src,
                        dst,
                        args.path or "",
                        args.verify,
                        report,
                        workers=args.max_concurrency,
                        max_bytes=args.max_memory,
                    )
                    verified = True
                tg.cancel_scope.cancel()
    except DestinationHoldsData as error:
        failure, status = error, "refused"
    except Exception as error:
        failure, status = error, "failed"
    finally:
        await close_stores(src, dst)
        if failure is not None or interrupt.signal is not None:
            if made is not None:
                remove_if_still_empty(made)
            if found_empty is not None:
                emptied_if_still_empty(found_empty)
    if interrupt.signal is not None:
        status = "interrupted"
    report.finished = report.finished or time.monotonic()
    if args.json:
        print(_copy_json(report, args, counters(), status), file=out)
    elif not args.quiet and status != "refused":
        for line in _summary_lines(report, args, verified):
            print(line, file=out)
    out.flush()  # before anything on stderr, so that a terminal shows them in order
    if interrupt.signal is not None:
        print(
            f"{PROG}: stopped by {interrupt.name} after {report.keys_done} of "
            f"{report.keys_total if report.keys_total is not None else '?'} keys "
            f"({human_size(report.bytes_done)}); every key at DST is whole or absent and the "
            f"metadata goes last: run the same command with --skip-existing to finish",
            file=sys.stderr,
        )
        return interrupt.exit_code
    if failure is not None:
        raise failure
    if report.mismatched_keys:
        raise RuntimeError(
            f"--verify found {report.mismatched_keys} keys that differ at the destination "
            f"(first: {report.examples['mismatched'][0]})"
        )
    return 0


def copy_command(args: argparse.Namespace) -> int:
    # zipfile warns when a member is written again (a copy into an existing zip): expected here.
    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
    return anyio.run(interruptible, lambda interrupt: _copy(args, interrupt, sys.stdout))


async def _inspect(args: argparse.Namespace, interrupt: Interrupt, *, tree: bool) -> int:
    store = open_url(args.url, args, [], "r")
    level: list[PlainEntry] | None = None
    try:
        with interrupt.scope:
            await ensure_open(store, "source", args.url)
            try:
                node = await describe(
                    store, args.path or "", args.depth if tree else 0, detail=not tree
                )
            except FileNotFoundError:
                # No node here: `ls` shows what is here instead (a bucket of datasets).
                level = await list_level(store, args.path or "") if tree else None
                if not level:
                    raise
    finally:
        await close_stores(store)
    if interrupt.signal is not None:
        return interrupt.exit_code
    if level is not None:
        where = args.url + (f" --path {args.path}" if args.path else "")
        if args.json:
            entries = [entry.as_dict() for entry in level]
            listing = {"path": args.path or "", "node_type": None, "entries": entries}
            print(json.dumps(listing, indent=2))
        else:
            print("\n".join(render_level(where, level)))
        return 0
    if args.json:
        print(json.dumps(node.as_dict(children=tree), indent=2))
    else:
        print("\n".join(render_tree(node) if tree else render_info(node)))
    return 0


def ls_command(args: argparse.Namespace) -> int:
    return anyio.run(interruptible, lambda interrupt: _inspect(args, interrupt, tree=True))


def info_command(args: argparse.Namespace) -> int:
    return anyio.run(interruptible, lambda interrupt: _inspect(args, interrupt, tree=False))
