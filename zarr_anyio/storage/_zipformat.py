"""The zip format as ZipStore writes it: its records, appended by blocking calls on a file
descriptor (reading and repairing an archive: `._zipread`).

Append only. A ZipStore session never changes a byte that was in the file when it opened: new
members go after the end of the file, and closing appends a new central directory (the old one
stays behind as dead bytes, 46 bytes and the name a member, per append session; ``rewrite()``
drops them).
zipfile's own append mode writes over the old directory instead, so a crash, a full disk or a
failed close in an append session leaves a file with no directory at all (zarr's ZipStore: 17 of
22 archives no longer opened after kill -9). Here the archive as it was stays a prefix of the
file, byte for byte, until the new directory is complete.
"""

from __future__ import annotations

import copy
import errno
import io
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence

from . import _oscalls

__all__ = [
    "DESCRIPTOR",
    "DESCRIPTOR_32",
    "DESCRIPTOR_64",
    "DESCRIPTOR_MAGIC",
    "ENCRYPTED",
    "END",
    "END64",
    "END64_MAGIC",
    "END_MAGIC",
    "LOCAL",
    "LOCAL_MAGIC",
    "LOCATOR",
    "LOCATOR_MAGIC",
    "PIECE",
    "UTF8",
    "ZIP64_EXTRA",
    "data_offset",
    "directory_record",
    "member_record",
    "rewritten_header",
    "strip_zip64",
    "write_all",
]

# PKWARE APPNOTE 4.3: a member's local header, a central directory entry, the end records.
LOCAL = struct.Struct("<4s2B4HL2L2H")
LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_MAGIC = b"PK\x01\x02"
END = struct.Struct("<4s4H2LH")
END_MAGIC = b"PK\x05\x06"
END64 = struct.Struct("<4sQ2H2L4Q")
END64_MAGIC = b"PK\x06\x06"
LOCATOR = struct.Struct("<4sLQL")
LOCATOR_MAGIC = b"PK\x06\x07"
DESCRIPTOR_MAGIC = b"PK\x07\x08"
DESCRIPTOR_32 = struct.Struct("<4sLLL")
DESCRIPTOR_64 = struct.Struct("<4sLQQ")
ZIP64_EXTRA = 0x0001
_ZIP64_LIMIT = (1 << 31) - 1  # zipfile's: above it, sizes and offsets need zip64 fields
ENCRYPTED = 0x01
DESCRIPTOR = 0x08
UTF8 = 0x800
_MAX_NAME = 0xFFFF

# Pieces for reading and writing big members: a write checks for cancellation between pieces.
PIECE = 1 << 20
# The blocking write at an offset; a module attribute so tests can stand in for the disk.
_write_at: Callable[[int, bytes | memoryview, int], int] = _oscalls.pwrite


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
    header_length = data_offset(bytes(record[: LOCAL.size]), 0)
    return info, bytes(record[:header_length]), record[header_length:]


def _name_and_extra_length(header: bytes) -> int:
    fields = LOCAL.unpack(header)
    return int(fields[-2] + fields[-1])


def data_offset(header: bytes, header_offset: int) -> int:
    """Where the data of the member whose local header starts ``header`` begins."""
    if len(header) < LOCAL.size or header[:4] != LOCAL_MAGIC:
        raise zipfile.BadZipFile("bad local header")
    return header_offset + LOCAL.size + _name_and_extra_length(header[: LOCAL.size])


def strip_zip64(extra: bytes) -> bytes:
    """``extra`` without its zip64 field: the writer adds its own where sizes need one."""
    kept = bytearray()
    position = 0
    while position + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, position)
        if kind != ZIP64_EXTRA:
            kept += extra[position : position + 4 + length]
        position += 4 + length
    return bytes(kept)


def rewritten_header(info: zipfile.ZipInfo, header_offset: int) -> tuple[zipfile.ZipInfo, bytes]:
    """A copy of ``info`` placed at ``header_offset``, and a fresh local header for it (with
    sizes and CRC in it, so without a data descriptor)."""
    new = copy.copy(info)
    new.flag_bits &= ~DESCRIPTOR
    new.extra = strip_zip64(info.extra)
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
        extra = strip_zip64(info.extra)
        version = 20
        if wide:
            if not allow_zip64:
                raise zipfile.LargeZipFile("the archive would require ZIP64 extensions")
            extra = struct.pack(f"<HH{len(wide)}Q", ZIP64_EXTRA, 8 * len(wide), *wide) + extra
            version = 45
        if info.compress_type == zipfile.ZIP_BZIP2:
            version = max(version, 46)
        elif info.compress_type == zipfile.ZIP_LZMA:
            version = max(version, 63)
        try:
            name, flags = info.filename.encode("ascii"), info.flag_bits & ~UTF8
        except UnicodeEncodeError:
            name, flags = _encoded_name(info.filename), info.flag_bits | UTF8
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
        parts.append(END64.pack(END64_MAGIC, 44, 45, 45, 0, 0, count, count, size, offset))
        parts.append(LOCATOR.pack(LOCATOR_MAGIC, 0, record_at, 1))
        count, size, offset = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(offset, 0xFFFFFFFF)
    parts.append(END.pack(END_MAGIC, 0, 0, count, count, size, offset, len(comment)))
    parts.append(comment)
    return b"".join(parts)


# ---------------------------------------------------------------- what an archive holds
