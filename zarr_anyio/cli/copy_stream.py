"""Values larger than a part: read and written a part at a time, so memory stays at a part.

A value is copied in parts when it is larger than the part size (`part_size`): the source reads
it a part at a time (the store's `_read_parts`: one GET whose body is taken a part at a time on
S3, where a ranged read per part would cost a request each, and moto reads the whole object for
each range; ranged reads elsewhere), each part handed to the destination's streamed write as it
arrives (a temporary file renamed into place at the end for a folder, the multipart upload for
S3), so a value of any size costs the copy's byte budget one part and what the source's client
holds for the response (`held`), not the value. Each part is held once: the source reads it
into a slot of the read pool (``zarr_anyio.storage._pieces``: a client's pieces copied in as
they come, a file read straight in), the destination writes from there, and the next part,
read only once that write is done, takes the same slot, since nothing refers to the part any
more (each generator on the way lets go of it before asking for the next, the folder's writer
thread is handed it in a box it empties): a value in flight holds one slot, where a part kept
alive by a variable, an empty view of it or the thread that wrote it had the next take a
second. Where the store's parts were joined, copied to bytes, then cut again here, a copy of 64
values of 8 MiB under a budget of 16 MiB peaked 73 MiB above its imports (obstore), then 35
MiB with each part held once, two slots a value. Measured (``benchmarks/copy_cli.py --only
huge``, one run, load 3.8 on 2 cores): a 2 GiB value from moto to a folder at the default
budget in 3.7 s at a 66 MiB peak (obstore, 9 MiB above its imports; s3fs 3.0 s, 90 MiB; 86
and 105 MiB with two slots a value under 64 MiB, 184 and 131 MiB before parts were held once),
where ``fs.get`` took 45 s at 1,115 MiB and a gather of zarr's own store 49 s at 4,228 MiB.

The write is whole or absent as any other: the temporary file is removed, the multipart upload
aborted (s3fs) or left incomplete and invisible (obstore, which has no abort),
if the copy stops mid-value; a copy killed outright leaves only these invisible leftovers, and
its resume writes the value again from its first byte.

A destination that cannot write a value in parts (a zip file, whose members we append whole
under its lock, and memory) gets it whole: held in memory as before this module, one value at a
time when it is bigger than the budget.

The part size is an eighth of ``--max-memory``, at least 1 MiB (each part is a thread hop, or a
request) and at least what the destination takes (S3: 5 MiB): for the default of 4 MiB, parts
of 1 MiB, and two values from S3 at once (each counted as its part and a MiB for the client).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._pieces import Pieces

__all__ = ["SourceChanged", "Vanished", "part_size", "ranged_parts", "streams"]

_LEAST_PART = 1 << 20


class Vanished(Exception):
    """The source key went away while it was being read in parts."""


class SourceChanged(Exception):
    """The source value changed (its size, or a file written to) while it was read in parts."""


def part_size(max_bytes: int, dst: AnyioStore) -> int:
    """The size of the parts a value is copied in under a budget of ``max_bytes``."""
    return max(max_bytes // 8, _LEAST_PART, dst._min_part_size)


def streams(src: AnyioStore, dst: AnyioStore, size: int, part: int) -> bool:
    """Whether a value of ``size`` bytes goes from ``src`` to ``dst`` in parts.

    One of a part or less is read whole, as one buffer of the client's: in parts (a slot of the
    read pool) it held as much and took longer (64 values of 8 MiB from moto, parts of 8 MiB,
    obstore: 1.36 s against 1.59 s), unless the source's whole read holds the value twice
    (s3fs: aiohttp joins the body's pieces into new bytes): then from 1 MiB on it goes as one
    part (172 MiB peak against 155, 2.26 s against 2.06).
    """
    if not dst._streams_writes:
        return False
    return size > part or (size >= _LEAST_PART and src._whole_reads_twice)


def held(src: AnyioStore, size: int, part: int) -> int:
    """The bytes a value of ``size`` copied in parts of ``part`` from ``src`` holds at once: one
    part (read into a slot of the read pool, then written from it: the next part is read only
    once the destination is done with this one, and takes the same slot), and what the source's
    client holds for the response beside it (`AnyioStore._stream_overhead`)."""
    return min(size, part) + src._stream_overhead


async def ranged_parts(
    store: AnyioStore, key: str, size: int, part: int
) -> AsyncGenerator[memoryview, None]:
    """The ``size`` bytes of ``key`` in order, in parts of ``part`` bytes, the last shorter
    (the store's `_read_parts`, ranged reads or one streamed read), so that two values compare
    part by part. Each part is the store's own, held once (``zarr_anyio.storage._pieces``);
    a store that gives other sizes has its pieces cut to parts.

    Raises `Vanished` if the key goes away, `SourceChanged` if it no longer has ``size``
    bytes (a shorter answer, or bytes past the end), rather than give a torn value.
    """
    got = 0
    try:
        async with contextlib.aclosing(store._read_parts(key, size, part)) as given:

            async def piece(_: int) -> memoryview | None:
                nonlocal got
                data = await anext(given, None)
                got += 0 if data is None else len(data)
                if got > size:
                    raise SourceChanged(f"{key} changed while it was copied")
                return data

            cut = Pieces(piece)
            while data := await cut.part(part):
                yield data
                del data  # see `AnyioStore._read_parts`
    except FileNotFoundError:
        raise Vanished(key) from None
    # Nothing past the end either (the store reads past it): a value that grew would otherwise
    # be copied cut short.
    if got != size:
        raise SourceChanged(f"{key} changed while it was copied")
