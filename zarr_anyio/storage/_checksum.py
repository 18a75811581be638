"""What an S3 ETag says of an object's bytes, for both S3 clients.

An S3 object written by one PUT (unencrypted or SSE-S3) has the MD5 of its bytes as its ETag,
32 hex digits in quotes. One written by a multipart upload has the MD5 of its parts' MD5s and a
``-N`` suffix (the part count), which only another upload with the same part sizes would
match: it says nothing of the bytes, and is not given as a checksum. An SSE-KMS or SSE-C object
has 32 hex digits that are not its MD5; taken as one it can only make two equal values look
different (a key copied again), never two different values look equal. Other servers' ETags
(a local file's inode and time, an HTTP server's) are no checksum at all: only S3 stores ask.
"""

from __future__ import annotations

import re

__all__ = ["etag_checksum"]

_MD5 = re.compile(r"[0-9a-f]{32}")


def etag_checksum(etag: object) -> str | None:
    """``"md5:<hex>"`` for a single-PUT S3 ETag, ``None`` for any other."""
    if not isinstance(etag, str):
        return None
    digest = etag.strip().strip('"').lower()
    return f"md5:{digest}" if _MD5.fullmatch(digest) else None
