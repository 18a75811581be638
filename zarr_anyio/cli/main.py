"""The ``zarr-anyio`` command's entry point: the argument parser, and outcomes turned into exit
codes and one-line messages; `.commands` does the work (with `.copy`, `.info` and `.progress`).

Exit codes: 0 done; 1 failed while running (a missing source, a destination that holds data
and no flag saying what to do with it, a refused write, a network error, keys that ``--verify``
found different); 2 the command line is wrong (an unknown option, a URL no store takes, an
unwritable kind of destination); 128 + the signal's number when stopped by SIGINT (130) or
SIGTERM (143). An error is one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import os
import platform
import signal
import sys
import traceback
from pathlib import Path

import zarr

from zarr_anyio._core.limit import DEFAULT_MAX_CONCURRENCY
from zarr_anyio.storage._redact import redact, scrub

from .commands import PROG, copy_command, demo_command, info_command, ls_command
from .copy import CopyOptions
from .urls import UsageError, describe_error

__all__ = ["build_parser", "main"]


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
  zarr-anyio copy data.zip restored.zarr --verify        # read DST back, compare bytes
  zarr-anyio copy s3://bucket/data.zarr data.zarr --storage-option anon=true
  zarr-anyio copy data.zarr s3://bucket/data.zarr --max-concurrency 64 --rate 500
  zarr-anyio copy data.zarr s3://bucket/x.zarr --storage-option endpoint_url=http://127.0.0.1:9000
  zarr-anyio copy s3://bucket/data.zarr one.zarr --path group/temperature   # one node
  zarr-anyio copy s3://bucket/data.zarr data.zarr --skip-existing   # resume, or bring up to date
  zarr-anyio copy data.zarr s3://bucket/data.zarr --overwrite       # replace what is there
  zarr-anyio copy data.zarr s3://bucket/data.zarr --skip-existing --dry-run   # what would change

Keys are copied a page of listing at a time, at most --max-concurrency at once and at most
--max-memory bytes of values in flight; each key is written whole (or not at all) and the
metadata (zarr.json, .zarray, .zgroup, .zattrs, .zmetadata) last, so an interrupted copy never
looks like a finished one. Ctrl-C (or SIGTERM) stops cleanly: exit 130 (143), and re-running
with --skip-existing copies only what is missing or different.

A copy that exits 0 leaves DST reading what SRC reads: the same keys, the same bytes. So a DST
that already holds data is refused (exit 1, nothing written) unless told what to do with it:
--skip-existing (rclone sync --checksum; aws s3 sync --delete) keeps the keys that have the same
bytes, --overwrite (rclone sync --ignore-times) writes every key again; both delete the keys SRC
does not have, take DST's metadata down before the first change and write SRC's last.

exit codes: 0 done, 1 failed (DST holds data, or --verify found differences), 2 bad command
line or URL, 130/143 stopped by SIGINT/SIGTERM."""

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
    parser.add_argument(
        "--version",
        action="version",
        version=(
            f"{PROG} {importlib.metadata.version('zarr-anyio')} (zarr {zarr.__version__}, "
            f"Python {sys.version.split()[0]})"
        ),
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
    existing = copy.add_mutually_exclusive_group()
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="when DST holds data: keep the keys it has with the same bytes as SRC, copy the "
        "others, delete the keys SRC does not have (resumes an interrupted copy)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="when DST holds data: write every key of SRC again and delete the keys SRC does "
        "not have",
    )
    copy.add_argument(
        "--size-only",
        action="store_true",
        help="with --skip-existing: keys of the same size count as the same, unread (faster, "
        "blind to a change that keeps the size)",
    )
    copy.add_argument(
        "--verify",
        choices=["bytes", "sizes"],
        default=None,
        help="read DST back afterwards: --verify (or --verify=bytes) compares every key's "
        "bytes, --verify=sizes only sizes; a key missing, different or at DST only makes the "
        "exit code 1",
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
        help="bytes of values in flight at most, the clients' buffers for them included, like "
        "64M (default: 4M); a value larger than an eighth of it (at least 1 MiB) is copied "
        "in parts",
    )
    copy.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default: 5)",
    )
    copy.set_defaults(run=copy_command)

    for name, run, summary, examples in (
        ("ls", ls_command, "show a hierarchy as a tree", LS_EXAMPLES),
        ("info", info_command, "show one group or array in detail", INFO_EXAMPLES),
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
        description=(
            "Write a 256 x 256 array with zarr-python into a LocalStore in FOLDER (default: a "
            "temporary folder), then read its chunks back with fetch_many under trio (or "
            "asyncio) and check them: a first look at zarr_anyio, and a check of the install."
        ),
        epilog=DEMO_EXAMPLES,
        formatter_class=raw,
    )
    demo_parser.add_argument("folder", nargs="?", type=Path, help="where to write (default: temp)")
    demo_parser.add_argument(
        "--backend",
        choices=["trio", "asyncio"],
        default=None,
        help="default: trio if it is installed (the trio extra), else asyncio",
    )
    demo_parser.set_defaults(run=demo_command)
    return parser


def _spelled_out(argv: list[str]) -> list[str]:
    # A bare --verify means bytes; argparse alone would take the next word (SRC) as its value.
    return ["--verify=bytes" if arg == "--verify" else arg for arg in argv]


# glibc's mallopt parameter for the most malloc arenas a process makes.
_M_ARENA_MAX = -8
# Two arenas: the event loop's thread and one for every other.
_ARENAS = 2


def few_malloc_arenas() -> None:
    """Cap the malloc arenas of this process (glibc only; elsewhere nothing changes).

    glibc gives a thread that allocates an arena of its own, up to 8 a core, and keeps what is
    freed in it: a copy's threads (the worker threads that write files, obstore's tokio
    threads, which allocate each response's buffers) each kept a MiB or more. With two arenas,
    64 values of 8 MiB from moto with obstore under ``--max-memory 4M`` peaked 10 MiB above
    the command's imports, against 15 (median of 2, same run, same speed). The command owns
    its process, so it sets this for every subcommand, before any thread starts.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, _ARENAS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_spelled_out(sys.argv[1:] if argv is None else argv))
    few_malloc_arenas()
    try:
        code: int = args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {redact(str(error))}", file=sys.stderr)
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
        # A URL given on the command line may hold a password: never echoed back.
        scrub(error)
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {redact(describe_error(error))}", file=sys.stderr)
        return 1
    return code
