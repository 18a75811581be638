"""Progress of a copy on stderr: a live bar on a terminal, plain periodic lines otherwise.

tqdm draws both (its bar, and its ``format_meter`` for the lines a log file or CI keeps):
one small pure-Python package with no dependencies of its own, where rich would bring three
(markdown-it-py, mdurl, pygments) for one bar. The bar counts bytes, since bytes are what take
time; keys, retries and throttled responses ride beside it. Remote stores count their requests
(`RemoteStore.stats`), so a copy from or to one shows its retries and throttled answers; a copy
between local stores shows neither.

The time left is ours, not tqdm's: tqdm divides the bytes left by the byte rate so far, and a copy
whose first keys are small ones (metadata, small chunks: the cost is per key, not per byte) starts
at a byte rate near zero, which once showed "638:45:24" for a copy that took a minute. Here the
estimate is made from keys and from bytes both, the smaller taken: the estimate errs short for a
while, never absurdly long; and none is shown in the first second, before any rate means much.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any, Literal, TextIO

import anyio

from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._remote import RemoteStore

from .copy import CopyReport

__all__ = ["Mode", "choose_mode", "show_progress", "store_counters"]

Mode = Literal["bar", "lines", "off"]

BAR_REFRESH = 0.2
"""Seconds between redraws of the bar."""

FIRST_ESTIMATE = 1.0
"""Seconds of copying before the time left is estimated."""

_FORMAT = (
    "{desc}: {percentage:3.0f}%{bar_part} {n_fmt}/{total_fmt} "
    "[{elapsed}<{left}, {rate_fmt}{postfix}]"
)


def seconds_left(report: CopyReport) -> float | None:
    """The time the copy still needs, ``None`` while there is no telling."""
    elapsed = report.seconds
    if report.keys_total is None or report.bytes_total is None or elapsed < FIRST_ESTIMATE:
        return None
    estimates: list[float] = []
    if report.keys_done:
        estimates.append(max(report.keys_total - report.keys_done, 0) * elapsed / report.keys_done)
    if report.bytes_done:
        left = max(report.bytes_total - report.bytes_done, 0)
        estimates.append(left * elapsed / report.bytes_done)
    return min(estimates) if estimates else None


def tqdm() -> Any:
    """tqdm's class, imported when first drawn: a copy with ``--quiet`` (or ``--json``) draws
    nothing, and the import costs the command 1.1 MiB of its peak."""
    from tqdm import tqdm as found  # type: ignore[import-untyped]

    return found


def _left_text(report: CopyReport) -> str:
    left = seconds_left(report)
    return "?" if left is None else str(tqdm().format_interval(left))


def choose_mode(quiet: bool, stream: TextIO | None = None) -> Mode:
    """``off`` with ``--quiet``, a bar on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return "off"
    return "bar" if stream.isatty() else "lines"


def store_counters(stores: Iterable[AnyioStore]) -> dict[str, int] | None:
    """Retries and throttled answers summed over the remote stores, ``None`` if none is."""
    remote = [store.stats() for store in stores if isinstance(store, RemoteStore)]
    if not remote:
        return None
    return {
        "retries": sum(stats.retries for stats in remote),
        "throttled": sum(stats.throttled for stats in remote),
    }


def _postfix(report: CopyReport, counters: dict[str, int] | None) -> str:
    total = "?" if report.keys_total is None else str(report.keys_total)
    parts = [f"keys {report.keys_done}/{total}"]
    if report.keys_skipped:
        parts.append(f"skipped {report.keys_skipped}")
    if counters is not None:
        parts.append(f"retries {counters['retries']}")
        parts.append(f"throttled {counters['throttled']}")
    return ", ".join(parts)


def progress_line(report: CopyReport, counters: dict[str, int] | None) -> str:
    """One plain line: bytes done of the total when known, rate, ETA, keys and counters."""
    line: str = tqdm().format_meter(
        n=report.bytes_done,
        total=report.bytes_total,
        elapsed=report.seconds,
        prefix="copy",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        postfix=_postfix(report, counters),
        # No bar: a log keeps the numbers.
        bar_format=_FORMAT.replace("{bar_part}", ""),
        left=_left_text(report),
    )
    return line


@functools.cache
def _bar_class() -> Any:
    class _Bar(tqdm()):  # type: ignore[misc]
        """tqdm's bar with our estimate of the time left."""

        left = "?"

        @property
        def format_dict(self) -> dict[str, Any]:
            found: dict[str, Any] = super().format_dict
            found["left"] = self.left
            return found

    return _Bar


async def show_progress(
    report: CopyReport,
    counters: Callable[[], dict[str, int] | None],
    mode: Mode,
    stream: TextIO | None = None,
    interval: float = 5.0,
) -> None:
    """Show the copy's progress until cancelled (the caller cancels it when the copy ends)."""
    stream = stream or sys.stderr
    if mode == "off":
        await anyio.sleep_forever()
    if mode == "lines":
        while True:
            await anyio.sleep(interval)
            print(progress_line(report, counters()), file=stream, flush=True)
    bar = _bar_class()(
        total=report.bytes_total,
        bar_format=_FORMAT.replace("{bar_part}", "|{bar}|"),
        desc="copy",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=stream,
        dynamic_ncols=True,
        leave=True,
    )
    try:
        while True:
            _update(bar, report, counters())
            await anyio.sleep(BAR_REFRESH)
    finally:
        _update(bar, report, counters())
        bar.close()


def _update(bar: Any, report: CopyReport, counters: dict[str, int] | None) -> None:
    if bar.total != report.bytes_total:
        bar.total = report.bytes_total
    bar.n = report.bytes_done
    bar.left = _left_text(report)
    bar.set_postfix_str(_postfix(report, counters), refresh=False)
    bar.refresh()
