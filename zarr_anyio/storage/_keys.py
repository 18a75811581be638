"""Key, prefix and byte-range validation: the one place every store checks its untrusted input.

Keys come from metadata that someone else wrote, so a store treats them like user input: a key
that could name something outside the store (``..``, an absolute path, a backslash that Windows
reads as a separator, a NUL that truncates a C string) is refused before any backend sees it.
"""

from __future__ import annotations

from collections.abc import Iterable

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest

__all__ = [
    "byte_range_slice",
    "check_byte_range",
    "directory_prefix",
    "is_valid_key",
    "names_under",
    "validate_key",
    "validate_prefix",
]

_FORBIDDEN_CHARS = ("\\", "\x00")
# The limits of the stores we serve, taken as one rule for all of them so that a hierarchy that
# one store accepts can be copied to any other: a file name is at most 255 bytes on every common
# filesystem, an object key at most 1,024 bytes on S3, GCS and Azure.
MAX_SEGMENT_BYTES = 255
MAX_KEY_BYTES = 1024


def _check_segments(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r}")
    for char in _FORBIDDEN_CHARS:
        if char in text:
            raise ValueError(f"invalid {what} {text!r}: it contains {char!r}")
    # Keys are ASCII almost always, and then their length in characters is their length in bytes.
    ascii_only = text.isascii()
    if not ascii_only:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"invalid {what} {text!r}: it is not valid Unicode text (a lone surrogate)"
            ) from None
    size = len(text) if ascii_only else len(text.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise ValueError(
            f"invalid {what} {text[:80]!r}…: it is {size} bytes long in UTF-8, "
            f"over the limit of {MAX_KEY_BYTES}"
        )
    if text.startswith("/"):
        raise ValueError(f"invalid {what} {text!r}: keys are relative to the store, not absolute")
    for segment in text.split("/"):
        if segment == "":
            raise ValueError(f"invalid {what} {text!r}: it has an empty path segment")
        if segment in (".", ".."):
            raise ValueError(f"invalid {what} {text!r}: it has a {segment!r} path segment")
        if len(segment if ascii_only else segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise ValueError(
                f"invalid {what} {text!r}: a path segment is over {MAX_SEGMENT_BYTES} bytes "
                "in UTF-8"
            )


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe store key, else raise ``ValueError`` naming it."""
    if key == "":
        raise ValueError("invalid key '': a key cannot be empty")
    _check_segments(key, "key")
    return key


def is_valid_key(key: str) -> bool:
    """Whether `validate_key` takes ``key``: for listings, which leave out what it refuses."""
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """Return a listing/deletion ``prefix`` unchanged if it is safe, else raise ``ValueError``.

    ``""`` (the whole store) is allowed, and so is one trailing ``/``; otherwise a prefix follows
    the same rules as a key.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if stripped:
        _check_segments(stripped, "prefix")
    return prefix


def directory_prefix(prefix: str) -> str:
    """``prefix`` as a directory: ``"a"`` and ``"a/"`` give ``"a/"``, ``""`` stays ``""``.

    Used where zarr means a node of the hierarchy (``delete_dir``, ``getsize_prefix``), so that
    ``"c"`` never takes in ``"cc/0"``.
    """
    stripped = validate_prefix(prefix).rstrip("/")
    return f"{stripped}/" if stripped else ""


def names_under(keys: Iterable[str], prefix: str) -> list[str]:
    """The sorted names directly under ``prefix`` (``""`` or ending in ``/``): keys and folders.

    For stores that hold a flat set of keys, where folders exist only as parts of keys.
    """
    start = len(prefix)
    return sorted(
        {
            key[start:].split("/", 1)[0]
            for key in keys
            if key.startswith(prefix) and len(key) > start
        }
    )


def _non_negative_int(value: object, field: str, byte_range: ByteRequest) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Unexpected byte_range, got {byte_range!r}: {field} must be an int")
    if value < 0:
        raise ValueError(f"invalid byte_range {byte_range!r}: {field} must not be negative")
    return value


def check_byte_range(byte_range: ByteRequest | None) -> None:
    """Raise if ``byte_range`` is not a zarr ``ByteRequest`` with sane, non-negative bounds."""
    if byte_range is None:
        return
    if isinstance(byte_range, RangeByteRequest):
        start = _non_negative_int(byte_range.start, "start", byte_range)
        end = _non_negative_int(byte_range.end, "end", byte_range)
        if end < start:
            raise ValueError(f"invalid byte_range {byte_range!r}: end is before start")
    elif isinstance(byte_range, OffsetByteRequest):
        _non_negative_int(byte_range.offset, "offset", byte_range)
    elif isinstance(byte_range, SuffixByteRequest):
        _non_negative_int(byte_range.suffix, "suffix", byte_range)
    else:
        # zarr's own stores and its StoreTests use this wording.
        raise TypeError(f"Unexpected byte_range, got {byte_range!r}.")


def byte_range_slice(byte_range: ByteRequest | None, size: int) -> slice:
    """The ``slice`` of a value of ``size`` bytes that ``byte_range`` asks for.

    zarr's semantics, like Python slicing: a range that runs past the end gives what exists, one
    that starts past the end gives nothing. ``byte_range`` must have passed `check_byte_range`.
    """
    if byte_range is None:
        return slice(0, size)
    if isinstance(byte_range, RangeByteRequest):
        return slice(min(byte_range.start, size), min(byte_range.end, size))
    if isinstance(byte_range, OffsetByteRequest):
        return slice(min(byte_range.offset, size), size)
    if isinstance(byte_range, SuffixByteRequest):
        return slice(max(0, size - byte_range.suffix), size)
    raise TypeError(f"Unexpected byte_range, got {byte_range!r}.")
