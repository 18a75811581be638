"""The ``zarr-anyio`` command: copy Zarr data between stores, look at what a store holds.

This module parses arguments, opens stores, handles signals and turns outcomes into messages
and exit codes; the work is done by `.copy` (copy), `.info` (ls, info) and `.progress`.

Exit codes: 0 done; 1 failed while running (a missing source, a refused write, a network error,
keys that ``--verify`` found different); 2 the command line is wrong (an unknown option, a URL
no store takes, an unwritable kind of destination); 128 + the signal's number when stopped by
SIGINT (130) or SIGTERM (143). An error is one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import anyio
import numpy as np
import zarr
from anyio.abc import TaskStatus

from zarr_anyio._core.errors import single_error
from zarr_anyio._core.limit import DEFAULT_MAX_CONCURRENCY
from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._local import LocalStore
from zarr_anyio.storage._open import REMOTE_SCHEMES, AccessMode, make_store
from zarr_anyio.storage._retry import RateLimit

from .copy import CopyOptions, CopyReport, copy_node
from .info import describe, human_size, render_info, render_tree
from .progress import choose_mode, show_progress, store_counters

__all__ = ["main"]

PROG = "zarr-anyio"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class UsageError(Exception):
    """The command line asks for something impossible: exit code 2."""


# ---------------------------------------------------------------- demo


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


def _demo_command(args: argparse.Namespace) -> int:
    if args.folder is not None:
        return demo(args.folder, args.backend)
    with tempfile.TemporaryDirectory() as folder:
        return demo(Path(folder), args.backend)


# ---------------------------------------------------------------- opening stores


def _set_option(options: dict[str, Any], pair: str) -> None:
    key, separator, text = pair.partition("=")
    if not separator or not key:
        raise UsageError(f"a storage option is KEY=VALUE, got {pair!r}")
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    *parents, last = key.split(".")
    for parent in parents:
        inner = options.setdefault(parent, {})
        if not isinstance(inner, dict):
            raise UsageError(f"storage option {parent!r} is both a value and a group in {pair!r}")
        options = inner
    options[last] = value


def storage_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict: VALUE as JSON if it parses, else as text; ``a.b=1`` nests."""
    options: dict[str, Any] = {}
    for pair in pairs:
        _set_option(options, pair)
    return options


def _scheme(url: str) -> str:
    scheme, separator, _ = url.partition("://")
    return scheme.lower() if separator else ""


def _local_path(url: str) -> str | None:
    scheme = _scheme(url)
    if scheme not in ("", "file"):
        return None
    return os.path.realpath(url.partition("://")[2] if scheme else url)


def open_url(
    url: str, args: argparse.Namespace, extra_options: list[str], mode: AccessMode
) -> AnyioStore:
    """The store for ``url``; a URL no store takes is a usage error."""
    remote = _scheme(url) in REMOTE_SCHEMES
    if extra_options and not remote:
        raise UsageError(f"storage options are for remote URLs (s3://, gs://, ...), not {url!r}")
    options = storage_options([*args.storage_option, *extra_options])
    if not remote:
        options = {}  # --storage-option goes to every remote URL of the command, no local one
    kwargs: dict[str, Any] = {"max_concurrency": args.max_concurrency}
    if remote and args.rate is not None:
        # One budget for every remote store of the command.
        if getattr(args, "rate_limit", None) is None:
            args.rate_limit = RateLimit(args.rate)
        kwargs["rate_limit"] = args.rate_limit
    try:
        return make_store(
            url, mode=mode, storage_options=options or None, backend=args.backend, **kwargs
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{url!r} does not exist: {error}") from None
    except (ValueError, TypeError) as error:
        raise UsageError(f"cannot open {url!r}: {error}") from None
    except ImportError as error:
        raise RuntimeError(f"cannot open {url!r}: {error.name or error} is not installed") from None


async def _ensure_open(store: AnyioStore, what: str, url: str) -> None:
    try:
        await store._ensure_open()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {url!r} does not exist") from None
    except OSError as error:
        raise OSError(f"cannot open {what} {url!r}: {_describe(error)}") from None


async def _close(*stores: AnyioStore) -> None:
    # Shielded: closing a zip writes its central directory, also after Ctrl-C.
    with anyio.CancelScope(shield=True):
        for store in stores:
            if store._is_open:
                await store.aclose()


# ---------------------------------------------------------------- signals


class Interrupt:
    """Cancels ``scope`` on the first SIGINT or SIGTERM and remembers which it was.

    Signals are received for as long as `watch` runs, so a second Ctrl-C while the command
    cleans up (closing a zip writes its central directory) does not cut the cleanup short.
    """

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.signal: int | None = None

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as received:
            task_status.started()
            async for number in received:
                if self.signal is None:
                    self.signal = int(number)
                    self.scope.cancel()

    @property
    def exit_code(self) -> int:
        assert self.signal is not None
        return 128 + self.signal

    @property
    def name(self) -> str:
        assert self.signal is not None
        return signal.Signals(self.signal).name


async def interruptible(work: Callable[[Interrupt], Awaitable[int]]) -> int:
    """Run ``work`` with SIGINT/SIGTERM turned into a cancellation of ``interrupt.scope``."""
    interrupt = Interrupt()
    code = 0
    with single_error():
        async with anyio.create_task_group() as tg:
            await tg.start(interrupt.watch)
            try:
                code = await work(interrupt)
            finally:
                tg.cancel_scope.cancel()
    return code


# ---------------------------------------------------------------- copy


def _summary_lines(report: CopyReport, args: argparse.Namespace) -> list[str]:
    verb = "would copy" if args.dry_run else "copied"
    total = report.keys_total if report.keys_total is not None else "?"
    lines = [
        f"{verb} {report.keys_copied} keys ({human_size(report.bytes_copied)}), "
        f"skipped {report.keys_skipped} ({human_size(report.bytes_skipped)}) already there, "
        f"{report.keys_done} of {total} keys in {report.seconds:.1f} s"
    ]
    if report.keys_vanished:
        lines.append(f"{report.keys_vanished} keys vanished from the source while copying")
    if report.invalid_keys:
        examples = ", ".join(repr(k) for k in report.examples.get("invalid keys", [])[:3])
        lines.append(f"left out {report.invalid_keys} objects that are not valid keys: {examples}")
    if args.verify:
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
        "source": args.src,
        "destination": args.dst,
        "path": args.path,
        "dry_run": args.dry_run,
        "verify": args.verify,
        **report.as_dict(),
        "requests": counters,
    }
    return json.dumps(summary, indent=2)


async def _copy(args: argparse.Namespace, interrupt: Interrupt, out: TextIO) -> int:
    src_path, dst_path = _local_path(args.src), _local_path(args.dst)
    if src_path is not None and src_path == dst_path:
        raise UsageError("SRC and DST are the same place")
    if src_path is not None and dst_path is not None and dst_path.startswith(src_path + os.sep):
        # Each run would copy what the last one wrote, one level deeper.
        raise UsageError("DST is inside SRC: copy to a place outside it")
    if _scheme(args.dst) in ("http", "https"):
        raise UsageError(f"cannot write to {args.dst!r}: HTTP is read-only here")
    src = open_url(args.src, args, args.src_storage_option, "r")
    # A dry run writes nothing, so it does not create DST either.
    dst = open_url(args.dst, args, args.dst_storage_option, "r" if args.dry_run else "a")
    report = CopyReport()
    options = CopyOptions(
        workers=args.max_concurrency,
        skip_existing=args.skip_existing,
        verify=args.verify,
        dry_run=args.dry_run,
        max_bytes=args.max_memory,
    )
    mode = choose_mode(args.quiet)

    def counters() -> dict[str, int] | None:
        return store_counters([src, dst])

    status = "done"
    failure: BaseException | None = None
    try:
        with interrupt.scope, single_error():
            await _ensure_open(src, "source", args.src)
            if not args.dry_run:
                await _ensure_open(dst, "destination", args.dst)
            async with anyio.create_task_group() as tg:
                tg.start_soon(show_progress, report, counters, mode, None, args.progress_interval)
                await copy_node(src, dst, args.path or "", options, report)
                tg.cancel_scope.cancel()
    except Exception as error:
        failure, status = error, "failed"
    finally:
        await _close(src, dst)
    if interrupt.signal is not None:
        status = "interrupted"
    report.finished = report.finished or time.monotonic()
    if args.json:
        print(_copy_json(report, args, counters(), status), file=out)
    elif not args.quiet:
        for line in _summary_lines(report, args):
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


def _copy_command(args: argparse.Namespace) -> int:
    # zipfile warns when a member is written again (a copy into an existing zip): expected here.
    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
    return anyio.run(interruptible, lambda interrupt: _copy(args, interrupt, sys.stdout))


# ---------------------------------------------------------------- ls and info


async def _inspect(args: argparse.Namespace, interrupt: Interrupt, *, tree: bool) -> int:
    store = open_url(args.url, args, [], "r")
    try:
        with interrupt.scope:
            await _ensure_open(store, "source", args.url)
            node = await describe(
                store, args.path or "", args.depth if tree else 0, detail=not tree
            )
    finally:
        await _close(store)
    if interrupt.signal is not None:
        return interrupt.exit_code
    if args.json:
        print(json.dumps(node.as_dict(children=tree), indent=2))
    else:
        print("\n".join(render_tree(node) if tree else render_info(node)))
    return 0


def _ls_command(args: argparse.Namespace) -> int:
    return anyio.run(interruptible, lambda interrupt: _inspect(args, interrupt, tree=True))


def _info_command(args: argparse.Namespace) -> int:
    return anyio.run(interruptible, lambda interrupt: _inspect(args, interrupt, tree=False))


# ---------------------------------------------------------------- arguments


def _whole_number(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    number = text.upper().removesuffix("IB").removesuffix("B")
    unit = number[-1:] if number[-1:] in _UNITS else ""
    try:
        value = int(float(number[: len(number) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size (like 256M or 1G): {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


COPY_EXAMPLES = """\
examples:
  zarr-anyio copy data.zarr data.zip                   # a folder into a zip file
  zarr-anyio copy data.zip restored.zarr --verify=bytes
  zarr-anyio copy s3://bucket/data.zarr data.zarr --storage-option anon=true
  zarr-anyio copy data.zarr s3://bucket/data.zarr --max-concurrency 64 --rate 500
  zarr-anyio copy data.zarr s3://bucket/x.zarr --storage-option endpoint_url=http://127.0.0.1:9000
  zarr-anyio copy s3://bucket/data.zarr one.zarr --path group/temperature   # one node
  zarr-anyio copy s3://bucket/data.zarr data.zarr --skip-existing   # resume an interrupted copy
  zarr-anyio copy data.zarr s3://bucket/data.zarr --dry-run --json

Keys are copied a page of listing at a time, at most --max-concurrency at once and at most
--max-memory bytes of values in flight; each key is written whole (or not at all) and the
metadata (zarr.json, .zarray, .zgroup, .zattrs, .zmetadata) last, so an interrupted copy never
looks like a finished one. Ctrl-C (or SIGTERM) stops cleanly: exit 130 (143), and re-running
with --skip-existing copies only what is missing (compared by key and size).

exit codes: 0 done, 1 failed (or --verify found differences), 2 bad command line or URL,
130/143 stopped by SIGINT/SIGTERM."""

LS_EXAMPLES = """\
examples:
  zarr-anyio ls data.zarr
  zarr-anyio ls data.zip --path group --depth 1
  zarr-anyio ls s3://bucket/data.zarr --storage-option anon=true --json

Each line: the node's name, group or array, Zarr format; for arrays the dtype, shape, chunk
shape, shard shape, codecs, bytes stored and how many chunks (shards) are stored of how many
the shape has. A group's bytes are everything stored under it."""

INFO_EXAMPLES = """\
examples:
  zarr-anyio info data.zarr --path temperature
  zarr-anyio info data.zip --path group/temperature --json
  zarr-anyio info s3://bucket/data.zarr --storage-option anon=true

Shows zarr-python's own info for the node, plus the bytes stored under it and, for an array,
how many of its chunks (shards) are stored."""

DEMO_EXAMPLES = """\
examples:
  zarr-anyio demo
  zarr-anyio demo ./demo-folder --backend asyncio"""


def _add_store_options(parser: argparse.ArgumentParser, *, sides: bool) -> None:
    parser.add_argument(
        "--path", default="", help="a node within the hierarchy (default: the root)"
    )
    parser.add_argument(
        "--backend",
        choices=["fsspec", "obstore"],
        default="fsspec",
        help="client library for remote URLs (default: fsspec)",
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for the remote client, repeatable: VALUE is JSON if it parses "
        "(true, 3, {...}), else text; KEY a.b sets b inside a",
    )
    for side in ("src", "dst") if sides else ():
        parser.add_argument(
            f"--{side}-storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"as --storage-option, for {side.upper()} only",
        )
    parser.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help=f"requests in flight at once, per store (default: {DEFAULT_MAX_CONCURRENCY})",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        metavar="PER_SECOND",
        help="at most this many requests a second to remote stores (default: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Copy Zarr hierarchies between stores and look inside them, with zarr_anyio.",
        epilog="Run 'zarr-anyio COMMAND --help' for a command's options and examples.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    copy = commands.add_parser(
        "copy",
        parents=[common],
        help="copy a Zarr hierarchy (or one node) from one store to another",
        description="Copy every key under SRC (or its node --path) to DST.",
        epilog=COPY_EXAMPLES,
        formatter_class=raw,
    )
    copy.add_argument(
        "src", metavar="SRC", help="folder, .zip, file://, s3://, gs://, az://, http(s)://"
    )
    copy.add_argument("dst", metavar="DST", help="folder, .zip, file://, s3://, gs://, az://")
    _add_store_options(copy, sides=True)
    copy.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave keys that DST already has with the same size (resumes an interrupted copy)",
    )
    copy.add_argument(
        "--verify",
        choices=["sizes", "bytes"],
        default=None,
        help="check every key at DST afterwards: --verify (or --verify=sizes) compares sizes, "
        "--verify=bytes the bytes; differences make the exit code 1",
    )
    copy.add_argument(
        "--dry-run", action="store_true", help="list what would be copied, write nothing"
    )
    copy.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    copy.add_argument("--quiet", action="store_true", help="no progress and no summary")
    copy.add_argument(
        "--max-memory",
        type=_size,
        default=CopyOptions.max_bytes,
        metavar="SIZE",
        help="bytes of values in flight at most, like 256M (default: 64M)",
    )
    copy.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: 5)",
    )
    copy.set_defaults(run=_copy_command)

    for name, run, summary, examples in (
        ("ls", _ls_command, "show a hierarchy as a tree", LS_EXAMPLES),
        ("info", _info_command, "show one group or array in detail", INFO_EXAMPLES),
    ):
        sub = commands.add_parser(
            name,
            parents=[common],
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=examples,
            formatter_class=raw,
        )
        sub.add_argument("url", metavar="URL", help="folder, .zip, file://, s3://, gs://, ...")
        _add_store_options(sub, sides=False)
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "ls":
            sub.add_argument(
                "--depth",
                type=_non_negative_int,
                default=None,
                metavar="N",
                help="show N levels below the node (default: all)",
            )
        sub.set_defaults(run=run)

    demo_parser = commands.add_parser(
        "demo",
        parents=[common],
        help="write with zarr-python, read back under trio",
        description=__doc__,
        epilog=DEMO_EXAMPLES,
        formatter_class=raw,
    )
    demo_parser.add_argument("folder", nargs="?", type=Path, help="where to write (default: temp)")
    demo_parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    demo_parser.set_defaults(run=_demo_command)
    return parser


def _spelled_out(argv: list[str]) -> list[str]:
    # A bare --verify means sizes; argparse alone would take the next word (SRC) as its value.
    return ["--verify=sizes" if arg == "--verify" else arg for arg in argv]


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError | FileNotFoundError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_spelled_out(sys.argv[1:] if argv is None else argv))
    try:
        code: int = args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`zarr-anyio ls ... | head`): stop quietly, as if by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        # Before the signal handlers are installed (or after they are gone).
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_describe(error)}", file=sys.stderr)
        return 1
    return code
