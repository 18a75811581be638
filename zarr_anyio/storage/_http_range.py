"""Byte ranges over plain HTTP, checked: a server that ignores ``Range`` or names other bytes.

fsspec's HTTP filesystem sends ``Range`` and returns whatever body comes back. A server that
ignores the header (``python -m http.server`` does) answers 200 with the whole object, which was
returned as the range: ``get(key, RangeByteRequest(4, 12))`` gave all 232 bytes, and a sharded
array failed its checksum. A 206 whose ``Content-Range`` names other bytes than asked (a server
that aligns ranges to its blocks, a broken cache) was returned as is. Here the answer is judged
by its status and ``Content-Range``:

* **206**: its ``Content-Range`` must name exactly the bytes asked for (the end clipped to the
  object's size), and the body must be that long; anything else raises `RangeNotHonoured`.
* **200**: the body is the whole object, so the asked bytes are cut out of it, as zarr's
  slicing semantics say. Only as much of the body as the range needs is read: a range that
  ends early reads up to its end and drops the connection, instead of downloading the rest.
* **416**, **404** and other failures raise as fsspec raises them (the store reads a 416 as
  "nothing there").
"""

from __future__ import annotations

import re
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest

from ._redact import redact_url

__all__ = ["RangeNotHonoured", "get_range", "range_header", "span"]

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)
_READ_STEP = 1 << 20


class RangeNotHonoured(OSError):
    """A server answered a byte-range request with other bytes than the ones asked for."""


def range_header(byte_range: ByteRequest) -> str:
    """The ``Range`` header that asks for ``byte_range`` (never an empty range)."""
    if isinstance(byte_range, RangeByteRequest):
        return f"bytes={byte_range.start}-{byte_range.end - 1}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"bytes={byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"bytes=-{byte_range.suffix}"
    raise TypeError(f"Unexpected byte_range, got {byte_range!r}.")


def span(byte_range: ByteRequest, size: int) -> tuple[int, int]:
    """Where the bytes ``byte_range`` asks for lie in an object of ``size`` bytes (start, stop)."""
    if isinstance(byte_range, RangeByteRequest):
        start, stop = byte_range.start, byte_range.end
    elif isinstance(byte_range, OffsetByteRequest):
        start, stop = byte_range.offset, size
    else:
        assert isinstance(byte_range, SuffixByteRequest)
        start, stop = size - byte_range.suffix, size
    start = min(max(start, 0), size)
    return start, max(start, min(stop, size))


def _check_partial(byte_range: ByteRequest, content_range: str | None, length: int) -> None:
    """Raise `RangeNotHonoured` (its reason) unless a 206 holds exactly the asked bytes."""
    found = _CONTENT_RANGE.fullmatch(content_range or "")
    if found is None:
        raise RangeNotHonoured(f"a 206 answer with no usable Content-Range ({content_range!r})")
    first, last, total = int(found[1]), int(found[2]), found[3]
    if last < first or last - first + 1 != length:
        raise RangeNotHonoured(
            f"a 206 answer of {length} bytes whose Content-Range says {content_range!r}"
        )
    if total != "*":
        wanted = span(byte_range, int(total))
        if (first, last + 1) != wanted:
            raise RangeNotHonoured(
                f"asked for bytes {wanted[0]}-{wanted[1] - 1}, the server sent bytes "
                f"{first}-{last} (of {total})"
            )
        return
    # The size unknown ("*"): the start must be the asked one, the end within the asked one.
    if isinstance(byte_range, RangeByteRequest):
        fits = first == byte_range.start and last < byte_range.end
    elif isinstance(byte_range, OffsetByteRequest):
        fits = first == byte_range.offset
    else:
        fits = length <= byte_range.suffix
    if not fits:
        raise RangeNotHonoured(
            f"asked for {range_header(byte_range)}, the server sent bytes {first}-{last}"
        )


async def _read_prefix(response: Any, size: int) -> bytes:
    """The first ``size`` bytes of a body (fewer if it ends first); the rest is not read."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = await response.content.read(min(_READ_STEP, size - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def get_range(fs: Any, url: str, byte_range: ByteRequest) -> bytes:
    """The bytes of ``url`` that ``byte_range`` asks for, through fsspec HTTP filesystem ``fs``
    (its session and client options), checked as this module's docstring says."""
    options = dict(fs.kwargs)
    headers = {**options.pop("headers", {}), "Range": range_header(byte_range)}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **options) as response:
        if response.status == 404:
            raise FileNotFoundError(redact_url(url))
        response.raise_for_status()
        if response.status == 206:
            body: bytes = await response.read()
            try:
                _check_partial(byte_range, response.headers.get("Content-Range"), len(body))
            except RangeNotHonoured as error:
                raise RangeNotHonoured(f"{redact_url(url)}: {error}") from None
            return body
        if isinstance(byte_range, RangeByteRequest):
            # The whole object follows: what the range needs is its first `end` bytes.
            head = await _read_prefix(response, byte_range.end)
            start, stop = span(byte_range, len(head))
            return head[start:stop]
        body = await response.read()
        start, stop = span(byte_range, len(body))
        return body[start:stop]
