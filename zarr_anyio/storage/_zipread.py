"""Reading a zip archive as ZipStore does: its directory, CRC-32 checks, and recovery.

Recovery, when the file does not end in a directory that lists it (as ``zip -FF``): the last
well-formed directory, searched backwards from the end, is the state at the last successful
close; members after it are found by their local headers, and each is kept only if whole: within
the file and its CRC-32 right (data descriptors included). So recovery reads what was appended
after the last directory, or the whole file when there is none (a crash in the first session).
Candidates can overlap (a crafted file can hold a local header every 31 bytes, each claiming the
rest), so stored ones are checked without reading their bytes again: CRC-32s of spans come from
one pass (see `_Region`). That worst case reads ~20 times the file's size and takes ~2 s per MB,
where reading each candidate's bytes read a 130 KB file 4258 times, and matching descriptors
took 100 s for 200 KB. Compressed candidates are still decompressed each from its own start,
holding at most `PIECE` bytes of output at a time (a 64 KiB crafted member peaked at 148 MB).
"""

from __future__ import annotations

import bz2
import io
import itertools
import lzma
import struct
import zipfile
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from . import _oscalls
from ._fileio import read_exact
from ._zipformat import (
    DESCRIPTOR,
    DESCRIPTOR_32,
    DESCRIPTOR_64,
    DESCRIPTOR_MAGIC,
    ENCRYPTED,
    END,
    END64,
    END64_MAGIC,
    END_MAGIC,
    LOCAL,
    LOCAL_MAGIC,
    LOCATOR,
    LOCATOR_MAGIC,
    PIECE,
    UTF8,
    ZIP64_EXTRA,
    data_offset,
    strip_zip64,
)

__all__ = [
    "Contents",
    "FdReader",
    "crc_of",
    "overlapping",
    "read_contents",
    "recover",
]


class FdReader(io.RawIOBase):
    """A read-only file object over ``fd`` that ends at ``end``, with a position of its own
    (``pread``), so several readers share one descriptor and ``zipfile`` sees a file cut short."""

    def __init__(self, fd: int, end: int, position: int = 0) -> None:
        super().__init__()
        self._fd = fd
        self._end = end
        self._position = position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._end}[whence]
        if base + offset < 0:
            raise OSError(22, "Invalid argument: seek before the start of the file")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        length = max(0, min(len(buffer), self._end - self._position))
        data = _oscalls.pread(self._fd, length, self._position) if length else b""
        memoryview(buffer)[: len(data)] = data
        self._position += len(data)
        return len(data)


# ---------------------------------------------------------------- members and directories


@dataclass
class Contents:
    """What a zip file holds: every entry (a member per name, newest last), its comment, and,
    if it had to be recovered, what was dropped."""

    infos: list[zipfile.ZipInfo]
    comment: bytes = b""
    # Where each member's data starts and whether its CRC was checked, where already known.
    data_offsets: dict[int, int] = field(default_factory=dict)
    checked: set[int] = field(default_factory=set)
    recovered: bool = False
    found_directory: bool = False
    dropped: list[str] = field(default_factory=list)


_DIRECTORY_ERRORS = (zipfile.BadZipFile, ValueError, struct.error, EOFError, OverflowError)


def _directory(fd: int, end: int) -> tuple[list[zipfile.ZipInfo], bytes] | None:
    """The entries of the directory that ends the first ``end`` bytes, as zipfile reads it."""
    try:
        with zipfile.ZipFile(FdReader(fd, end)) as archive:
            return archive.infolist(), archive.comment
    except _DIRECTORY_ERRORS:
        return None


def read_contents(fd: int, size: int) -> Contents | None:
    """What the file holds, from the directory at its very end; ``None`` if it has none (it
    is damaged, or is not a zip at all): then see `recover`."""
    found = _directory(fd, size)
    if found is None:
        return None
    infos, comment = found
    # zipfile also accepts an end record followed by other bytes; here those bytes would be
    # members appended after the last close, so the directory is not the whole story.
    tail = read_exact(fd, END.size, size - END.size - len(comment))
    if len(tail) != END.size or tail[:4] != END_MAGIC or END.unpack(tail)[-1] != len(comment):
        return None
    return Contents(infos, comment)


def recover(fd: int, size: int, *, writable: bool = False) -> Contents | None:
    """Every whole member of a damaged file (see the module docstring); ``None`` if it holds
    neither a directory nor a whole member, which is to say it is not a zip file. Unless
    ``writable`` and the file begins with a local header: a new archive whose writer died in
    its first member (kill -9 before anything was whole) holds nothing whole, and a writable
    opening goes on from there (refused, no writer could open that file again; a read still
    refuses it, as there is no archive in it to read)."""
    found = _last_directory(fd, size)
    contents = Contents([], recovered=True)
    start = 0
    if found is not None:
        contents.infos, contents.comment, contents.data_offsets, start = found
        contents.found_directory = True
    region = _Region(fd, start, size)
    position, junk = start, 0
    begins_with_member = False
    for candidate in _signatures(fd, LOCAL_MAGIC, start, size):
        begins_with_member = begins_with_member or candidate == 0
        if candidate < position:
            continue  # inside a member already kept
        junk += candidate - position
        member = _whole_member(fd, candidate, size, region)
        if isinstance(member, str):
            contents.dropped.append(member)
            junk += 1
            position = candidate + 1
            continue
        contents.infos.append(member.info)
        contents.data_offsets[candidate] = member.data_offset
        contents.checked.add(candidate)
        position = member.end
    junk += max(0, size - position)
    if junk:
        contents.dropped.append(f"{junk} bytes that hold no whole member")
    if not contents.infos and found is None and not (writable and begins_with_member):
        return None
    return contents


def overlapping(infos: Sequence[zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo] | None:
    """Two entries whose bytes overlap, if any: each takes at least its local header's fixed
    part and its compressed bytes from its header offset on. zipfile refuses such archives (a
    zip-bomb shape); a rewrite would copy the shared bytes once per entry."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for first, second in itertools.pairwise(ordered):
        if first.header_offset + LOCAL.size + first.compress_size > second.header_offset:
            return first, second
    return None


def _signatures(fd: int, magic: bytes, start: int, stop: int) -> Iterator[int]:
    """Every offset in ``[start, stop)`` where ``magic`` starts, in order, reading each byte
    once."""
    position = start
    while position < stop:
        chunk = _oscalls.pread(fd, min(PIECE, stop - position), position)
        index = chunk.find(magic)
        while index >= 0:
            yield position + index
            index = chunk.find(magic, index + 1)
        if len(chunk) < len(magic) or position + len(chunk) >= stop:
            return
        position += len(chunk) - len(magic) + 1


def _rfind(fd: int, magic: bytes, stop: int) -> int:
    """The last offset where ``magic`` starts and ends before ``stop``, or -1."""
    end = stop
    while end >= len(magic):
        start = max(0, end - PIECE)
        index = read_exact(fd, end - start, start).rfind(magic)
        if index >= 0:
            return start + index
        if start == 0:
            return -1
        end = start + len(magic) - 1
    return -1


def _last_directory(
    fd: int, size: int
) -> tuple[list[zipfile.ZipInfo], bytes, dict[int, int], int] | None:
    """The last directory in the file whose records agree with each other and whose every
    entry points at a local header of that name: its entries, comment, their data offsets,
    and where it ends."""
    stop = size
    while (at := _rfind(fd, END_MAGIC, stop)) >= 0:
        stop = at + len(END_MAGIC) - 1
        record = read_exact(fd, END.size, at)
        if len(record) < END.size:
            continue
        _, disk, start_disk, on_disk, count, cd_size, cd_offset, comment_length = END.unpack(record)
        end = at + END.size + comment_length
        if end > size or disk or start_disk or on_disk != count:
            continue
        directory_end = at
        locator = read_exact(fd, LOCATOR.size, at - LOCATOR.size) if at >= LOCATOR.size else b""
        if locator[:4] == LOCATOR_MAGIC:
            record_at = LOCATOR.unpack(locator)[2]
            wide = read_exact(fd, END64.size, record_at)
            if len(wide) < END64.size or wide[:4] != END64_MAGIC:
                continue
            fields = END64.unpack(wide)
            cd_size, cd_offset = fields[-2], fields[-1]
            if record_at + 12 + fields[1] != at - LOCATOR.size:
                continue
            directory_end = record_at
        # Offsets as written, with nothing in front: an end record inside some member's data
        # (a zip stored in a zip) records offsets from its own start, and is not taken.
        if cd_offset + cd_size != directory_end:
            continue
        found = _directory(fd, end)
        if found is None:
            continue
        infos, comment = found
        offsets: dict[int, int] = {}
        for info in infos:
            header = read_exact(fd, LOCAL.size, info.header_offset)
            if len(header) < LOCAL.size or header[:4] != LOCAL_MAGIC:
                break
            fields = LOCAL.unpack(header)
            raw = read_exact(fd, fields[-2], info.header_offset + LOCAL.size)
            if _decoded(raw, fields[3]) != info.orig_filename:
                break
            offsets[info.header_offset] = data_offset(header, info.header_offset)
        else:
            return infos, comment, offsets, end
    return None


def _decoded(name: bytes, flags: int) -> str | None:
    try:
        return name.decode("utf-8" if flags & UTF8 else "cp437")
    except UnicodeDecodeError:
        return None


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    data_offset: int
    end: int


def crc_of(fd: int, start: int, stop: int, crc: int = 0) -> int | None:
    """The CRC-32 of bytes ``[start, stop)`` continued from ``crc``; ``None`` if the file ends
    first."""
    position = start
    while position < stop:
        chunk = _oscalls.pread(fd, min(PIECE, stop - position), position)
        if not chunk:
            return None
        crc = zlib.crc32(chunk, crc)
        position += len(chunk)
    return crc


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    """(file size, compressed size) from a local header's zip64 field."""
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, position)
        if kind == ZIP64_EXTRA and length >= 16:
            sizes: tuple[int, int] = struct.unpack_from("<QQ", extra, position + 4)
            return sizes
        position += 4 + length
    return None


# ---------------------------------------------------------------- CRC-32 of any span, in one pass

# Recovery checks candidate members that may overlap each other (a crafted file can hold a local
# header every 31 bytes, each claiming the rest of the file): reading each candidate's bytes
# again made recovery quadratic (1.29 GB read for a 200 KB file). Instead one forward pass keeps
# the CRC-32 of the region up to every `_STEP`-th byte, and the CRC-32 of any span is worked out
# from those of its two ends, as zlib's crc32_combine does (~0.1 ms in Python, however long).
# Every 512 bytes: a span's CRC-32 reads at most 2 x 512 bytes, and the marks cost 4 bytes of
# memory per 512 and ~1.5 ms a MiB of Python on top of the CRC-32 itself (~0.4 ms a MiB).
_STEP = 512
_CRC_POLY = 0xEDB88320  # CRC-32's polynomial, bits reflected


def _multmodp(a: int, b: int) -> int:
    """``a`` times ``b`` modulo CRC-32's polynomial (zlib's multmodp)."""
    m, product = 1 << 31, 0
    while m:
        if a & m:
            product ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial: what appending ``n`` bytes multiplies a CRC-32 by."""
    product, k = 1 << 31, 3
    while n:
        if n & 1:
            product = _multmodp(_X2N[k & 31], product)
        n >>= 1
        k += 1
    return product


def crc_of_tail(whole: int, head: int, length: int) -> int:
    """The CRC-32 of ``B`` from that of ``A + B`` (``whole``), that of ``A`` (``head``) and
    ``len(B)``: crc(A + B) = crc(A) * x^(8 len(B)) + crc(B), crc32_combine solved for crc(B)."""
    return whole ^ _multmodp(_x8n(length), head)


class _Region:
    """The bytes recovery searches, ``[start, stop)``, read once, forwards: the CRC-32 of the
    bytes from ``start`` to every `_STEP`-th offset, and every data descriptor signature
    there, filed under the data start its sizes point back to."""

    def __init__(self, fd: int, start: int, stop: int) -> None:
        self._fd, self._start = fd, start
        self._marks = array("I")
        self._descriptors: dict[int, list[tuple[int, int, int]]] = {}
        self._found: dict[int, tuple[int, int, int, int] | None] = {}
        crc, position, previous = 0, start, b""
        while position < stop:
            chunk = _oscalls.pread(fd, min(PIECE, stop - position), position)
            if not chunk:
                break
            view, done = memoryview(chunk), 0
            first = start + len(self._marks) * _STEP - position
            for cut in range(first, len(chunk) + 1, _STEP):
                crc = zlib.crc32(view[done:cut], crc)
                done = cut
                self._marks.append(crc)
            crc = zlib.crc32(view[done:], crc)
            # A signature may straddle two chunks: search from the last 3 bytes of the one before.
            joined = previous + chunk
            base = position - len(previous)
            index = joined.find(DESCRIPTOR_MAGIC)
            while index >= 0:
                self._file(base + index, joined[index : index + DESCRIPTOR_64.size])
                index = joined.find(DESCRIPTOR_MAGIC, index + 1)
            previous = chunk[-(len(DESCRIPTOR_MAGIC) - 1) :]
            position += len(chunk)
        self._stop = position

    def _file(self, at: int, record: bytes) -> None:
        if len(record) < DESCRIPTOR_64.size:
            record = read_exact(self._fd, DESCRIPTOR_64.size, at)
        for form in (DESCRIPTOR_64, DESCRIPTOR_32):
            if len(record) >= form.size:
                _, crc, compressed, size = form.unpack_from(record)
                if compressed == size and at - compressed >= self._start:
                    self._descriptors.setdefault(at - compressed, []).append((at, crc, form.size))

    def _crc_to(self, offset: int) -> int | None:
        """The CRC-32 of the bytes from ``start`` to ``offset``."""
        index = (offset - self._start) // _STEP
        if offset > self._stop or index >= len(self._marks):
            return None
        mark = self._start + index * _STEP
        return crc_of(self._fd, mark, offset, self._marks[index])

    def crc(self, start: int, stop: int) -> int | None:
        """The CRC-32 of the bytes ``[start, stop)`` (within the region); ``None`` if the file
        ends first."""
        if stop - start <= 2 * _STEP or start < self._start:
            return crc_of(self._fd, start, stop)
        head, whole = self._crc_to(start), self._crc_to(stop)
        if head is None or whole is None:
            return None
        return crc_of_tail(whole, head, stop - start)

    def stored_through_descriptor(self, start: int) -> tuple[int, int, int, int] | None:
        """For a stored member whose data starts at ``start`` and whose sizes follow it: (CRC,
        compressed size, size, length of the descriptor), from the first descriptor whose
        signature, sizes and CRC-32 agree with the bytes before it. Remembered: several
        headers can put their data at one offset."""
        if start not in self._found:
            self._found[start] = next(
                (
                    (crc, at - start, at - start, length)
                    for at, crc, length in self._descriptors.get(start, [])
                    if self.crc(start, at) == crc
                ),
                None,
            )
        return self._found[start]


# ---------------------------------------------------------------- whole members


def _whole_member(fd: int, at: int, size: int, region: _Region) -> _Member | str:
    """The member whose local header is at ``at``, if it is whole; else why it is not."""
    header = read_exact(fd, LOCAL.size, at)
    if len(header) < LOCAL.size:
        return f"a cut local header at offset {at}"
    _, version, _, flags, method, dos_time, dos_date, crc, compress_size, file_size = LOCAL.unpack(
        header
    )[:10]
    name_length, extra_length = LOCAL.unpack(header)[-2:]
    raw = read_exact(fd, name_length + extra_length, at + LOCAL.size)
    name = _decoded(raw[:name_length], flags) if len(raw) == name_length + extra_length else None
    label = f"{name!r} at offset {at}" if name is not None else f"a member at offset {at}"
    if name is None:
        return f"{label} (its header is cut or its name unreadable)"
    extra = raw[name_length:]
    start = at + LOCAL.size + name_length + extra_length
    wide = _zip64_sizes(extra)
    if wide is not None and 0xFFFFFFFF in (compress_size, file_size):
        file_size, compress_size = wide
    descriptor = 0
    if flags & DESCRIPTOR:
        if method == zipfile.ZIP_STORED:
            found = region.stored_through_descriptor(start)
        else:
            # Streaming writers leave the sizes 0 in the header; any other value is a claim.
            found = _inflate_through_descriptor(
                fd, start, size, method, wide is not None, file_size
            )
        if found is None:
            return f"{label} (incomplete, or its data descriptor does not match)"
        crc, compress_size, file_size, descriptor = found
    if start + compress_size + descriptor > size:
        return f"{label} (incomplete: {size - start} of {compress_size} bytes)"
    info = zipfile.ZipInfo(name, date_time=_date_time(dos_date, dos_time))
    info.flag_bits, info.compress_type, info.extract_version = flags, method, version
    info.CRC, info.compress_size, info.file_size = crc, compress_size, file_size
    info.header_offset = at
    info.extra = strip_zip64(extra)
    info.create_system = 3
    info.external_attr = (0o40755 << 16 | 0x10) if name.endswith("/") else 0o644 << 16
    if not flags & (ENCRYPTED | DESCRIPTOR) and not _data_matches(fd, info, start, region):
        return f"{label} (its data does not match its CRC-32)"
    return _Member(info, start, start + compress_size + descriptor)


def _date_time(dos_date: int, dos_time: int) -> tuple[int, int, int, int, int, int]:
    return (
        (dos_date >> 9) + 1980,
        (dos_date >> 5) & 0xF,
        dos_date & 0x1F,
        dos_time >> 11,
        (dos_time >> 5) & 0x3F,
        (dos_time & 0x1F) * 2,
    )


def _data_matches(fd: int, info: zipfile.ZipInfo, start: int, region: _Region) -> bool:
    """Whether the member's data, decompressed, has its size and CRC-32."""
    if info.compress_type == zipfile.ZIP_STORED:
        return (
            info.compress_size == info.file_size
            and region.crc(start, start + info.compress_size) == info.CRC
        )
    reader = FdReader(fd, start + info.compress_size, start)
    total = 0
    try:
        # zipfile's reader checks the CRC-32 once it reaches the end.
        with zipfile.ZipExtFile(reader, "r", info) as member:
            while piece := member.read(PIECE):
                total += len(piece)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error, lzma.LZMAError):
        return False
    except OSError:  # bz2's "Invalid data stream"
        return False
    return total == info.file_size


def _inflate_through_descriptor(
    fd: int, start: int, size: int, method: int, wide: bool, claimed: int
) -> tuple[int, int, int, int] | None:
    """For a compressed member whose sizes follow its data: (CRC, compressed size, size,
    length of the descriptor), found by decompressing to the end of the stream (deflate,
    bzip2). At most `PIECE` bytes of output are held at a time (a 64 KiB deflate stream
    inflates to 64 MiB), and a header that claims a size (``claimed``, not 0) is held to it."""
    decompressor: zlib._Decompress | bz2.BZ2Decompressor  # typeshed's name for zlib's type
    if method == zipfile.ZIP_DEFLATED:
        decompressor = zlib.decompressobj(-15)
    elif method == zipfile.ZIP_BZIP2:
        decompressor = bz2.BZ2Decompressor()
    else:
        return None
    crc, total, position, data = 0, 0, start, b""
    try:
        while not decompressor.eof:
            if isinstance(decompressor, bz2.BZ2Decompressor):
                # It keeps the input it has not used yet itself.
                hungry, data = decompressor.needs_input, b""
            else:
                data = decompressor.unconsumed_tail
                hungry = not data
            if hungry:
                data = _oscalls.pread(fd, min(PIECE, size - position), position)
                if not data:
                    return None
                position += len(data)
            out = decompressor.decompress(data, PIECE)
            crc, total = zlib.crc32(out, crc), total + len(out)
            if claimed and total > claimed:
                return None
    except (zlib.error, OSError, EOFError):
        return None
    left = len(decompressor.unused_data)
    if not isinstance(decompressor, bz2.BZ2Decompressor):
        left += len(decompressor.unconsumed_tail)
    compressed = position - start - left
    after = start + compressed
    formats = ["<4sLQQ", "<LQQ"] if wide else ["<4sLLL", "<LLL", "<4sLQQ", "<LQQ"]
    for fmt in formats:
        record = read_exact(fd, struct.calcsize(fmt), after)
        if len(record) < struct.calcsize(fmt):
            continue
        fields = struct.unpack(fmt, record)
        if len(fields) == 4 and fields[0] != DESCRIPTOR_MAGIC:
            continue
        stated_crc, stated_compressed, stated_size = fields[-3:]
        if (stated_crc, stated_compressed, stated_size) == (crc, compressed, total):
            return crc, compressed, total, len(record)
    return None
