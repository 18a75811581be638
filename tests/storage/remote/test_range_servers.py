"""Servers that do not answer byte ranges as asked, on loopback: both remote stores.

One ignores ``Range`` and answers 200 with the whole object (``python -m http.server`` does); the
other answers 206 with other bytes than asked, and says so in ``Content-Range``. The first must
give exactly the asked bytes (cut from the whole object); the second must raise, never return
the wrong bytes as a success.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype

from support.servers import Faults, HTTPServer, S3Server
from zarr_anyio import FsspecStore, ObjectStore, RangeNotHonoured, RemoteStore
from zarr_anyio.storage._http_range import _check_partial

PROTO = default_buffer_prototype()
KINDS = ["fsspec", "obstore"]
DATA = bytes(range(232))

RANGES: list[ByteRequest] = [
    RangeByteRequest(4, 12),
    RangeByteRequest(200, 300),  # past the end: what exists
    RangeByteRequest(300, 400),  # starts past the end: nothing
    OffsetByteRequest(220),
    SuffixByteRequest(10),
    SuffixByteRequest(1000),
    RangeByteRequest(0, 1),
]


def expected(byte_range: ByteRequest) -> bytes:
    if isinstance(byte_range, RangeByteRequest):
        return DATA[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return DATA[byte_range.offset :]
    assert isinstance(byte_range, SuffixByteRequest)
    return DATA[-byte_range.suffix :]


def http_store(kind: str, server: HTTPServer, **kwargs: Any) -> RemoteStore:
    """A read-only store of ``server``'s objects, the client's own retries off."""
    if kind == "fsspec":
        return FsspecStore.from_url(server.url, read_only=True, **kwargs)
    from obstore.store import HTTPStore

    store = HTTPStore.from_url(
        server.url, client_options={"allow_http": True}, retry_config={"max_retries": 0}
    )
    return ObjectStore(store, read_only=True, **kwargs)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_ignores_range_gives_just_the_asked_bytes(
    http_server: HTTPServer, kind: str
) -> None:
    http_server.objects["k"] = DATA
    http_server.faults = Faults(ignore_range=True)
    store = http_store(kind, http_server)
    for byte_range in RANGES:
        value = await store.get("k", PROTO, byte_range)
        assert value is not None
        assert value.to_bytes() == expected(byte_range), byte_range
    assert await store.get("missing", PROTO, RangeByteRequest(4, 12)) is None
    assert 206 not in http_server.answers  # the server did ignore every range
    partial = await store.get_partial_values(
        PROTO, [("k", RangeByteRequest(1, 3)), ("k", RangeByteRequest(5, 9)), ("k", None)]
    )
    assert [value.to_bytes() if value else None for value in partial] == [
        DATA[1:3],
        DATA[5:9],
        DATA,
    ]
    await store.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_a_206_with_other_bytes_than_asked_is_an_error(
    http_server: HTTPServer, kind: str
) -> None:
    http_server.objects["k"] = DATA
    http_server.faults = Faults(range_shift=3)
    store = http_store(kind, http_server)
    with pytest.raises(RangeNotHonoured, match="asked for bytes 4-11, the server sent bytes 7-14"):
        await store.get("k", PROTO, RangeByteRequest(4, 12))
    assert http_server.requests == 1  # not retried: the server would answer the same
    with pytest.raises(RangeNotHonoured):
        await store.get_partial_values(
            PROTO, [("k", RangeByteRequest(1, 3)), ("k", RangeByteRequest(5, 9))]
        )
    for byte_range in (OffsetByteRequest(220), SuffixByteRequest(10)):
        with pytest.raises(RangeNotHonoured):
            await store.get("k", PROTO, byte_range)
    # The whole object is not a range: read as ever.
    whole = await store.get("k", PROTO)
    assert whole is not None
    assert whole.to_bytes() == DATA
    await store.aclose()


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_array_reads_right_from_a_server_that_ignores_range(
    http_server: HTTPServer, kind: str
) -> None:
    # The reported failure: shard indexes and chunks read by range, checked by their crc32c.
    written = zarr.storage.MemoryStore()
    array = zarr.create_array(written, shape=(64,), chunks=(8,), shards=(32,), dtype="u2")
    array[:] = np.arange(64)
    objects = written._store_dict
    http_server.objects.update({key: value.to_bytes() for key, value in objects.items()})
    http_server.faults = Faults(ignore_range=True)
    store = http_store(kind, http_server)
    read = zarr.open_array(store, mode="r")
    assert np.asarray(read[:]).tolist() == list(range(64))
    assert np.asarray(read[9:13]).tolist() == [9, 10, 11, 12]
    store.close()
    assert 200 in http_server.answers
    assert 206 not in http_server.answers


@pytest.mark.parametrize(
    ("byte_range", "content_range", "length"),
    [
        (RangeByteRequest(4, 12), "bytes 4-11/232", 8),
        (RangeByteRequest(200, 300), "bytes 200-231/232", 32),
        (RangeByteRequest(4, 12), "bytes 4-11/*", 8),
        (RangeByteRequest(4, 12), "bytes 4-9/*", 6),  # size unknown: may end early
        (OffsetByteRequest(220), "bytes 220-231/232", 12),
        (SuffixByteRequest(10), "bytes 222-231/232", 10),
        (SuffixByteRequest(1000), "bytes 0-231/232", 232),
    ],
)
def test_content_ranges_that_name_the_asked_bytes(
    byte_range: ByteRequest, content_range: str, length: int
) -> None:
    _check_partial(byte_range, content_range, length)


@pytest.mark.parametrize(
    ("byte_range", "content_range", "length"),
    [
        (RangeByteRequest(4, 12), "bytes 0-7/232", 8),  # other bytes
        (RangeByteRequest(4, 12), "bytes 4-10/232", 7),  # fewer bytes than the object has
        (RangeByteRequest(4, 12), "bytes 4-11/232", 9),  # a body longer than it says
        (RangeByteRequest(4, 12), "bytes 4-12/*", 9),  # more than asked
        (RangeByteRequest(4, 12), None, 8),
        (RangeByteRequest(4, 12), "items 4-11/232", 8),
        (OffsetByteRequest(220), "bytes 220-230/232", 11),
        (SuffixByteRequest(10), "bytes 0-9/232", 10),
        (SuffixByteRequest(10), "bytes 0-19/*", 20),
    ],
)
def test_content_ranges_that_do_not(
    byte_range: ByteRequest, content_range: str | None, length: int
) -> None:
    with pytest.raises(RangeNotHonoured):
        _check_partial(byte_range, content_range, length)


@pytest.mark.anyio
async def test_ranges_of_an_empty_object_that_s3_answers_whole_are_empty(
    s3_server: S3Server,
) -> None:
    # moto's S3 answers a range of an empty object with 200 and its (empty) whole body, which
    # obstore refuses ("non-partial response"): every range of it is nothing, as zarr's own
    # stores give, and the store goes on asking this server for ranges.
    store = ObjectStore(s3_server.obstore(s3_server.new_bucket()))
    await store.set("empty", PROTO.buffer.from_bytes(b""))
    await store.set("k", PROTO.buffer.from_bytes(DATA))
    ranges: list[ByteRequest] = [
        OffsetByteRequest(35),
        OffsetByteRequest(0),
        RangeByteRequest(0, 10),
        RangeByteRequest(73, 100),
        SuffixByteRequest(59),
    ]
    for byte_range in ranges:
        value = await store.get("empty", PROTO, byte_range)
        assert value is not None
        assert value.to_bytes() == b"", byte_range
    partial = await store.get_partial_values(
        PROTO,
        [("empty", r) for r in ranges] + [("k", RangeByteRequest(4, 12)), ("empty", None)],
    )
    assert [None if value is None else value.to_bytes() for value in partial] == [b""] * len(
        ranges
    ) + [
        DATA[4:12],
        b"",
    ]
    assert not store._ranges_ignored
    value = await store.get("k", PROTO, RangeByteRequest(200, 300))
    assert value is not None
    assert value.to_bytes() == DATA[200:]
    await store.aclose()


@pytest.mark.anyio
async def test_an_s3_store_whose_server_ignores_range_gives_just_the_asked_bytes(
    http_server: HTTPServer,
) -> None:
    # obstore's S3Store (not only its HTTPStore) over a server that answers a range with 200
    # and the whole object: the asked bytes, cut from it.
    from obstore.store import S3Store

    http_server.objects["bucket/k"] = DATA
    http_server.faults = Faults(ignore_range=True)
    s3 = S3Store(
        "bucket",
        endpoint=http_server.url,
        access_key_id="testing",
        secret_access_key="testing",
        region="us-east-1",
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    store = ObjectStore(s3, read_only=True)
    for byte_range in RANGES:
        value = await store.get("k", PROTO, byte_range)
        assert value is not None
        assert value.to_bytes() == expected(byte_range), byte_range
    assert store._ranges_ignored
    await store.aclose()
