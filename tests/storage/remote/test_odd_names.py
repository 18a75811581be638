"""Listings of remote stores holding objects whose names are not keys.

S3 allows any name (``data/../x``, ``sub/../../x``, a backslash, a 300-byte segment), and an
HTTP index page may link anything (``../secret``, ``a%2Fb``, which is the key ``a/b`` of another
object). A listing yields only keys that ``get`` takes and that name the listed object; the
others are left out, never an error, and every key listed reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from zarr.core.buffer import default_buffer_prototype

from support.command_line import s3_options
from support.servers import HTTPServer, S3Server
from zarr_anyio import FsspecStore, ObjectStore, RemoteStore
from zarr_anyio.cli import main

PROTO = default_buffer_prototype()

# "-a" sorts before "../x": obstore refuses the whole page of a listing that holds a bad name.
GOOD = ["-a", "a", "c/0", "c/1", "sub/k", "zarr.json"]
ODD = [
    "../x",
    "sub/../../x",
    "..",
    "c//2",
    "e\\f",
    "x" * 300,
    "./y",
    "sub/./k2",
    "c/../z",
]


async def listed(store: RemoteStore) -> dict[str, Any]:
    return {
        "list": sorted([key async for key in store.list()]),
        "prefix c/": sorted([key async for key in store.list_prefix("c/")]),
        "dir": sorted([key async for key in store.list_dir("")]),
        "dir sub": sorted([key async for key in store.list_dir("sub")]),
    }


async def assert_lists_only_keys(store: RemoteStore) -> None:
    found = await listed(store)
    assert found == {
        "list": GOOD,
        "prefix c/": ["c/0", "c/1"],
        "dir": ["-a", "a", "c", "sub", "zarr.json"],
        "dir sub": ["k"],
    }
    for key in found["list"]:
        value = await store.get(key, PROTO)
        assert value is not None
        assert value.to_bytes() == key.encode()


def s3_client(s3_server: S3Server) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def s3_objects(s3_server: S3Server) -> str:
    bucket = s3_server.new_bucket()
    client = s3_client(s3_server)
    for key in GOOD + ODD:
        client.put_object(Bucket=bucket, Key=f"data/{key}", Body=key.encode())
    return bucket


@pytest.mark.anyio
async def test_fsspec_over_s3_lists_only_keys(s3_server: S3Server) -> None:
    bucket = s3_objects(s3_server)
    fs = s3_server.s3fs(asynchronous=True, skip_instance_cache=True)
    await assert_lists_only_keys(FsspecStore(fs, path=f"{bucket}/data", read_only=True))


@pytest.mark.anyio
async def test_obstore_over_s3_lists_only_keys(s3_server: S3Server) -> None:
    bucket = s3_objects(s3_server)
    store = ObjectStore(s3_server.obstore(bucket, prefix="data"), read_only=True)
    await assert_lists_only_keys(store)


def index(*links: str) -> str:
    return "".join(f'<a href="{link}">{link}</a>\n' for link in links)


@pytest.mark.anyio
async def test_fsspec_over_an_http_index_lists_only_keys(http_server: HTTPServer) -> None:
    for key in GOOD:
        http_server.objects[f"data/{key}"] = key.encode()
    # Another object, which the link "b%2Fc" would reach if decoded into the key "b/c".
    http_server.objects["data/b/c"] = b"not the listed object"
    http_server.pages.update(
        {
            "data": index(
                "-a", "a", "c/", "sub/", "zarr.json", "b%2Fc", "../secret", "sub/../../x",
                "%00", "e%5Cf", "x" * 300, "%2e%2e/y", "..",
            ),
            "data/c": index("0", "1", "%2F2"),
            "data/sub": index("k", "../../../etc/passwd"),
        }
    )  # fmt: skip
    store = FsspecStore.from_url(f"{http_server.url}/data", read_only=True)
    await assert_lists_only_keys(store)
    await store.aclose()


def test_many_pages_with_a_refused_name_in_the_middle(s3_server: S3Server) -> None:
    # 1,050 keys: the bad name sits in the first page of 1,000, so obstore drops that page and
    # the listing is made on from the start, over two pages.
    import anyio

    bucket = s3_server.new_bucket()
    client = s3_client(s3_server)
    keys = [f"c/{i:04d}" for i in range(1050)]
    for key in [*keys, "c/0500/../x"]:
        client.put_object(Bucket=bucket, Key=f"data/{key}", Body=b"1")
    store = ObjectStore(s3_server.obstore(bucket, prefix="data"), read_only=True)

    async def listed_keys() -> list[str]:
        return sorted([key async for key in store.list_prefix("c/")])

    assert anyio.run(listed_keys) == keys


@pytest.mark.parametrize("backend", ["fsspec", "obstore"])
def test_a_copy_leaves_out_and_counts_the_refused_names(
    s3_server: S3Server, tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = s3_objects(s3_server)
    destination = tmp_path / "copy"
    options = s3_options(s3_server.endpoint, backend)
    source = f"s3://{bucket}/data"
    code = main(
        ["copy", "--json", "--quiet", "--backend", backend, *options, source, str(destination)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["keys_copied"] == len(GOOD)
    assert report["invalid_keys"] == len(ODD)
    copied = sorted(
        str(path.relative_to(destination)) for path in destination.rglob("*") if path.is_file()
    )
    assert copied == GOOD
