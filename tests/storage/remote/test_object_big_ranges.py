"""Byte positions past 2**64 on ObjectStore: read what exists, as every other store does.

obstore takes positions as unsigned 64-bit integers and raised its own ``ValueError`` for a
larger one; no object is that large, so such a range reaches past the end of any object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import cpu, default_buffer_prototype

from support.servers import HTTPServer
from zarr_anyio import MemoryStore, ObjectStore

pytestmark = pytest.mark.anyio
PROTO = default_buffer_prototype()
BIG = 2**64
RANGES: list[ByteRequest] = [
    RangeByteRequest(2, BIG),
    RangeByteRequest(2, BIG + 5),
    RangeByteRequest(BIG, BIG + 5),
    RangeByteRequest(2**63, BIG),
    RangeByteRequest(BIG - 1, BIG),
    OffsetByteRequest(BIG),
    SuffixByteRequest(BIG),
    RangeByteRequest(2, 2**63),
]


@pytest.mark.parametrize("backend", ["memory", "local", "http"])
async def test_positions_past_2_64_read_what_exists(
    backend: str, tmp_path: Path, http_server: HTTPServer
) -> None:
    import obstore.store

    value = b"0123456789"
    inner: Any
    if backend == "http":
        http_server.objects["k"] = value
        inner = obstore.store.HTTPStore.from_url(
            http_server.url, client_options={"allow_http": True}
        )
    elif backend == "local":
        inner = obstore.store.LocalStore(tmp_path)
    else:
        inner = obstore.store.MemoryStore()
    store = ObjectStore(inner, read_only=backend == "http")
    reference = MemoryStore()
    await reference.set("k", cpu.Buffer.from_bytes(value))
    if backend != "http":
        await store.set("k", cpu.Buffer.from_bytes(value))
    for byte_range in RANGES:
        got = await store.get("k", PROTO, byte_range)
        want = await reference.get("k", PROTO, byte_range)
        assert got is not None
        assert want is not None
        assert got.to_bytes() == want.to_bytes(), byte_range
        assert await store.get("missing", PROTO, byte_range) is None
    parts = await store.get_partial_values(PROTO, [("k", r) for r in RANGES])
    wanted = await reference.get_partial_values(PROTO, [("k", r) for r in RANGES])
    assert [p.to_bytes() if p else None for p in parts] == [
        w.to_bytes() if w else None for w in wanted
    ]
