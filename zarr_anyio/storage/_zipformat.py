"""The zip format as ZipStore writes, reads and repairs it: blocking calls on a file descriptor.

Append only. A ZipStore session never changes a byte that was in the file when it opened: new
members go after the end of the file, and closing appends a new central directory (the old one
stays behind as dead bytes, 46 bytes and the name a member, per append session; ``rewrite()``
drops them).
zipfile's own append mode writes over the old directory instead, so a crash, a full disk or a
failed close in an append session leaves a file with no directory at all (zarr's ZipStore: 17 of
22 archives no longer opened after kill -9). Here the archive as it was stays a prefix of the
file, byte for byte, until the new directory is complete.

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
import copy
import errno
import io
import itertools
import lzma
import os
import struct
import time
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ._fileio import read_exact

__all__ = [
    "Contents",
    "FdReader",
    "crc_of",
    "data_offset",
    "directory_record",
    "member_record",
    "overlapping",
    "read_contents",
    "rewritten_header",
    "write_all",
]

# PKWARE APPNOTE 4.3: a member's local header, a central directory entry, the end records.
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_MAGIC = b"PK\x01\x02"
_END = struct.Struct("<4s4H2LH")
_END_MAGIC = b"PK\x05\x06"
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_MAGIC = b"PK\x06\x06"
_LOCATOR = struct.Struct("<4sLQL")
_LOCATOR_MAGIC = b"PK\x06\x07"
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
_DESCRIPTOR_32 = struct.Struct("<4sLLL")
_DESCRIPTOR_64 = struct.Struct("<4sLQQ")
_ZIP64_EXTRA = 0x0001
_ZIP64_LIMIT = (1 << 31) - 1  # zipfile's: above it, sizes and offsets need zip64 fields
_ENCRYPTED = 0x01
_DESCRIPTOR = 0x08
_UTF8 = 0x800
_MAX_NAME = 0xFFFF

# Pieces for reading and writing big members: a write checks for cancellation between pieces.
PIECE = 1 << 20
# The blocking write at an offset; a module attribute so tests can stand in for the disk.
_write_at: Callable[[int, bytes | memoryview, int], int] = os.pwrite


# ---------------------------------------------------------------- reading and writing bytes


def write_all(
    fd: int, data: bytes | memoryview, offset: int, check_cancelled: Callable[[], None]
) -> int:
    """Write ``data`` at ``offset`` in pieces, checking for cancellation between them; gives
    the offset after it."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        count = _write_at(fd, view[written : written + PIECE], offset + written)
        if count <= 0:
            raise OSError(errno.EIO, f"a write at offset {offset + written} wrote nothing")
        written += count
        if written < len(view):
            check_cancelled()
    return offset + written


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
        data = os.pread(self._fd, length, self._position) if length else b""
        memoryview(buffer)[: len(data)] = data
        self._position += len(data)
        return len(data)


# ---------------------------------------------------------------- members and directories


def _encoded_name(name: str) -> bytes:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"invalid key {name!r}: it is not valid Unicode text") from None
    if len(encoded) > _MAX_NAME:
        raise ValueError(
            f"invalid key {name[:60]!r}...: {len(encoded)} bytes, and a zip member's name "
            f"holds at most {_MAX_NAME}"
        )
    return encoded


def member_record(
    name: str, data: bytes, compression: int, allow_zip64: bool
) -> tuple[zipfile.ZipInfo, bytes, bytes | memoryview]:
    """A new member: its ``ZipInfo`` (``header_offset`` still to set), its local header, and
    the bytes that follow the header. Sizes and CRC are known before a byte is written, so the
    header is final and no data descriptor is needed."""
    _encoded_name(name)
    info = zipfile.ZipInfo(name, date_time=time.localtime(time.time())[:6])
    info.external_attr = 0o644 << 16
    info.compress_type = compression
    if compression == zipfile.ZIP_STORED:
        info.file_size = info.compress_size = len(data)
        info.CRC = zlib.crc32(data)
        zip64 = len(data) > _ZIP64_LIMIT
        if zip64 and not allow_zip64:
            raise zipfile.LargeZipFile("Filesize would require ZIP64 extensions")
        return info, info.FileHeader(zip64), data
    # zipfile compresses (deflate, bzip2, lzma, each framed its own way) into memory; we take
    # the header and compressed bytes it wrote. Its ``info`` then holds the sizes and CRC.
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", allowZip64=allow_zip64) as scratch:
        scratch.writestr(info, data)
        end = sink.tell()
    record = sink.getbuffer()[:end]
    header_length = data_offset(bytes(record[: _LOCAL.size]), 0)
    return info, bytes(record[:header_length]), record[header_length:]


def _name_and_extra_length(header: bytes) -> int:
    fields = _LOCAL.unpack(header)
    return int(fields[-2] + fields[-1])


def data_offset(header: bytes, header_offset: int) -> int:
    """Where the data of the member whose local header starts ``header`` begins."""
    if len(header) < _LOCAL.size or header[:4] != _LOCAL_MAGIC:
        raise zipfile.BadZipFile("bad local header")
    return header_offset + _LOCAL.size + _name_and_extra_length(header[: _LOCAL.size])


def _strip_zip64(extra: bytes) -> bytes:
    """``extra`` without its zip64 field: the writer adds its own where sizes need one."""
    kept = bytearray()
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, position)
        if kind != _ZIP64_EXTRA:
            kept += extra[position : position + 4 + length]
        position += 4 + length
    return bytes(kept)


def rewritten_header(info: zipfile.ZipInfo, header_offset: int) -> tuple[zipfile.ZipInfo, bytes]:
    """A copy of ``info`` placed at ``header_offset``, and a fresh local header for it (with
    sizes and CRC in it, so without a data descriptor)."""
    new = copy.copy(info)
    new.flag_bits &= ~_DESCRIPTOR
    new.extra = _strip_zip64(info.extra)
    new.header_offset = header_offset
    zip64 = new.file_size > _ZIP64_LIMIT or new.compress_size > _ZIP64_LIMIT
    return new, new.FileHeader(zip64)


def directory_record(
    infos: Sequence[zipfile.ZipInfo], offset: int, comment: bytes, allow_zip64: bool
) -> bytes:
    """The central directory listing ``infos``, written at ``offset``, and its end records."""
    parts: list[bytes] = []
    for info in infos:
        year, month, day, hour, minute, second = info.date_time
        dos_date = (year - 1980) << 9 | month << 5 | day
        dos_time = hour << 11 | minute << 5 | (second // 2)
        wide: list[int] = []
        file_size, compress_size, header_offset = (
            info.file_size,
            info.compress_size,
            info.header_offset,
        )
        if file_size > _ZIP64_LIMIT or compress_size > _ZIP64_LIMIT:
            wide += [file_size, compress_size]
            file_size = compress_size = 0xFFFFFFFF
        if header_offset > _ZIP64_LIMIT:
            wide.append(header_offset)
            header_offset = 0xFFFFFFFF
        extra = _strip_zip64(info.extra)
        version = 20
        if wide:
            if not allow_zip64:
                raise zipfile.LargeZipFile("the archive would require ZIP64 extensions")
            extra = struct.pack(f"<HH{len(wide)}Q", _ZIP64_EXTRA, 8 * len(wide), *wide) + extra
            version = 45
        if info.compress_type == zipfile.ZIP_BZIP2:
            version = max(version, 46)
        elif info.compress_type == zipfile.ZIP_LZMA:
            version = max(version, 63)
        try:
            name, flags = info.filename.encode("ascii"), info.flag_bits & ~_UTF8
        except UnicodeEncodeError:
            name, flags = _encoded_name(info.filename), info.flag_bits | _UTF8
        parts.append(
            _CENTRAL.pack(
                _CENTRAL_MAGIC,
                max(version, info.create_version),
                info.create_system,
                max(version, info.extract_version),
                info.reserved,
                flags,
                info.compress_type,
                dos_time,
                dos_date,
                info.CRC,
                compress_size,
                file_size,
                len(name),
                len(extra),
                len(info.comment),
                0,
                info.internal_attr,
                info.external_attr,
                header_offset,
            )
        )
        parts += [name, extra, info.comment]
    size = sum(len(part) for part in parts)
    count = len(infos)
    if count > 0xFFFF or offset > _ZIP64_LIMIT or size > _ZIP64_LIMIT:
        if not allow_zip64:
            raise zipfile.LargeZipFile("the archive would require ZIP64 extensions")
        record_at = offset + size
        parts.append(_END64.pack(_END64_MAGIC, 44, 45, 45, 0, 0, count, count, size, offset))
        parts.append(_LOCATOR.pack(_LOCATOR_MAGIC, 0, record_at, 1))
        count, size, offset = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(offset, 0xFFFFFFFF)
    parts.append(_END.pack(_END_MAGIC, 0, 0, count, count, size, offset, len(comment)))
    parts.append(comment)
    return b"".join(parts)


# ---------------------------------------------------------------- what an archive holds


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
    tail = read_exact(fd, _END.size, size - _END.size - len(comment))
    if len(tail) != _END.size or tail[:4] != _END_MAGIC or _END.unpack(tail)[-1] != len(comment):
        return None
    return Contents(infos, comment)


def recover(fd: int, size: int) -> Contents | None:
    """Every whole member of a damaged file (see the module docstring); ``None`` if it holds
    neither a directory nor a whole member, which is to say it is not a zip file."""
    found = _last_directory(fd, size)
    contents = Contents([], recovered=True)
    start = 0
    if found is not None:
        contents.infos, contents.comment, contents.data_offsets, start = found
        contents.found_directory = True
    region = _Region(fd, start, size)
    position, junk = start, 0
    for candidate in _signatures(fd, _LOCAL_MAGIC, start, size):
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
    if not contents.infos and found is None:
        return None
    return contents


def overlapping(infos: Sequence[zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo] | None:
    """Two entries whose bytes overlap, if any: each takes at least its local header's fixed
    part and its compressed bytes from its header offset on. zipfile refuses such archives (a
    zip-bomb shape); a rewrite would copy the shared bytes once per entry."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for first, second in itertools.pairwise(ordered):
        if first.header_offset + _LOCAL.size + first.compress_size > second.header_offset:
            return first, second
    return None


def _signatures(fd: int, magic: bytes, start: int, stop: int) -> Iterator[int]:
    """Every offset in ``[start, stop)`` where ``magic`` starts, in order, reading each byte
    once."""
    position = start
    while position < stop:
        chunk = os.pread(fd, min(PIECE, stop - position), position)
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
    while (at := _rfind(fd, _END_MAGIC, stop)) >= 0:
        stop = at + len(_END_MAGIC) - 1
        record = read_exact(fd, _END.size, at)
        if len(record) < _END.size:
            continue
        _, disk, start_disk, on_disk, count, cd_size, cd_offset, comment_length = _END.unpack(
            record
        )
        end = at + _END.size + comment_length
        if end > size or disk or start_disk or on_disk != count:
            continue
        directory_end = at
        locator = read_exact(fd, _LOCATOR.size, at - _LOCATOR.size) if at >= _LOCATOR.size else b""
        if locator[:4] == _LOCATOR_MAGIC:
            record_at = _LOCATOR.unpack(locator)[2]
            wide = read_exact(fd, _END64.size, record_at)
            if len(wide) < _END64.size or wide[:4] != _END64_MAGIC:
                continue
            fields = _END64.unpack(wide)
            cd_size, cd_offset = fields[-2], fields[-1]
            if record_at + 12 + fields[1] != at - _LOCATOR.size:
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
            header = read_exact(fd, _LOCAL.size, info.header_offset)
            if len(header) < _LOCAL.size or header[:4] != _LOCAL_MAGIC:
                break
            fields = _LOCAL.unpack(header)
            raw = read_exact(fd, fields[-2], info.header_offset + _LOCAL.size)
            if _decoded(raw, fields[3]) != info.orig_filename:
                break
            offsets[info.header_offset] = data_offset(header, info.header_offset)
        else:
            return infos, comment, offsets, end
    return None


def _decoded(name: bytes, flags: int) -> str | None:
    try:
        return name.decode("utf-8" if flags & _UTF8 else "cp437")
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
        chunk = os.pread(fd, min(PIECE, stop - position), position)
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
        if kind == _ZIP64_EXTRA and length >= 16:
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
            chunk = os.pread(fd, min(PIECE, stop - position), position)
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
            index = joined.find(_DESCRIPTOR_MAGIC)
            while index >= 0:
                self._file(base + index, joined[index : index + _DESCRIPTOR_64.size])
                index = joined.find(_DESCRIPTOR_MAGIC, index + 1)
            previous = chunk[-(len(_DESCRIPTOR_MAGIC) - 1) :]
            position += len(chunk)
        self._stop = position

    def _file(self, at: int, record: bytes) -> None:
        if len(record) < _DESCRIPTOR_64.size:
            record = read_exact(self._fd, _DESCRIPTOR_64.size, at)
        for form in (_DESCRIPTOR_64, _DESCRIPTOR_32):
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
    header = read_exact(fd, _LOCAL.size, at)
    if len(header) < _LOCAL.size:
        return f"a cut local header at offset {at}"
    _, version, _, flags, method, dos_time, dos_date, crc, compress_size, file_size = _LOCAL.unpack(
        header
    )[:10]
    name_length, extra_length = _LOCAL.unpack(header)[-2:]
    raw = read_exact(fd, name_length + extra_length, at + _LOCAL.size)
    name = _decoded(raw[:name_length], flags) if len(raw) == name_length + extra_length else None
    label = f"{name!r} at offset {at}" if name is not None else f"a member at offset {at}"
    if name is None:
        return f"{label} (its header is cut or its name unreadable)"
    extra = raw[name_length:]
    start = at + _LOCAL.size + name_length + extra_length
    wide = _zip64_sizes(extra)
    if wide is not None and 0xFFFFFFFF in (compress_size, file_size):
        file_size, compress_size = wide
    descriptor = 0
    if flags & _DESCRIPTOR:
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
    info.extra = _strip_zip64(extra)
    info.create_system = 3
    info.external_attr = (0o40755 << 16 | 0x10) if name.endswith("/") else 0o644 << 16
    if not flags & (_ENCRYPTED | _DESCRIPTOR) and not _data_matches(fd, info, start, region):
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
                data = os.pread(fd, min(PIECE, size - position), position)
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
        if len(fields) == 4 and fields[0] != _DESCRIPTOR_MAGIC:
            continue
        stated_crc, stated_compressed, stated_size = fields[-3:]
        if (stated_crc, stated_compressed, stated_size) == (crc, compressed, total):
            return crc, compressed, total, len(record)
    return None
