"""Credentials in URLs never come back in what we print or raise: a store's str() and repr(),
its errors, open_store's errors, and the command's output and error lines."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest

import zarr_anyio
from support.servers import HTTPServer
from zarr_anyio import FsspecStore, ObjectStore, RemoteStore
from zarr_anyio.cli import main
from zarr_anyio.storage._redact import redact

SECRET = "s3cr3t-PASS"


def with_password(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:pw@host/x", "http://***@host/x"),
        ("https://TOKEN@github.com/a/b", "https://***@github.com/a/b"),
        ("cannot open 'http://a:b@h:80/p?q=1': 404", "cannot open 'http://***@h:80/p?q=1': 404"),
        ("s3://bucket/path@2026", "s3://bucket/path@2026"),  # an "@" after the host: a path
        ("http://host:8080/x", "http://host:8080/x"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&x-id=Get",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x-id=Get",
        ),
        (
            "https://acct.blob.core.windows.net/c?sv=2020&sig=XYZ",
            "https://acct.blob.core.windows.net/c?sv=2020&sig=***",
        ),
        ("two: http://a:1@x/ and ftp://b:2@y/", "two: http://***@x/ and ftp://***@y/"),
        ("no url here: a=b&c=d", "no url here: a=b&c=d"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def http_store(kind: str, url: str) -> RemoteStore:
    if kind == "fsspec":
        return FsspecStore.from_url(url, read_only=True)
    from obstore.store import HTTPStore

    client = HTTPStore.from_url(
        url, client_options={"allow_http": True}, retry_config={"max_retries": 0}
    )
    return ObjectStore(client, read_only=True)


@pytest.mark.parametrize("kind", ["fsspec", "obstore"])
def test_str_and_repr_of_a_remote_store_hide_the_password(
    http_server: HTTPServer, kind: str
) -> None:
    http_server.objects["data/k"] = b"value"
    store = http_store(kind, with_password(http_server.url) + "/data")
    assert SECRET not in str(store)
    assert SECRET not in repr(store)
    assert "***@127.0.0.1" in str(store)
    # While the store lives, its name still reaches it (and its credentials).
    again = zarr_anyio.open_store(str(store), mode="r")
    assert again.get_sync("k") is not None
    store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["fsspec", "obstore"])
async def test_errors_of_a_remote_store_hide_the_password(
    http_server: HTTPServer, kind: str
) -> None:
    store = http_store(kind, with_password(http_server.url) + "/data")
    with pytest.raises(FileNotFoundError) as caught:
        await store.getsize("missing")  # the clients name the URL they asked for
    printed = "".join(traceback.format_exception(caught.value))
    assert SECRET not in printed
    assert "127.0.0.1" in printed  # still says where
    await store.aclose()


def test_open_store_errors_hide_the_password() -> None:
    with pytest.raises(ValueError, match="no zarr_anyio store for the scheme") as caught:
        zarr_anyio.open_store(f"nope://alice:{SECRET}@host/x")
    assert SECRET not in str(caught.value)
    assert "nope://***@host/x" in str(caught.value)


def test_the_command_never_echoes_a_password(
    http_server: HTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = with_password(http_server.url) + "/data"
    code = main(["copy", "--json", "--quiet", source, str(tmp_path / "copy")])
    out, err = capsys.readouterr()
    assert code == 1  # an HTTP server gives no listing: nothing to copy
    assert SECRET not in out + err
    assert json.loads(out)["source"] == source.replace(f"alice:{SECRET}", "***")
    for debug in ([], ["--debug"]):
        assert main(["ls", *debug, source]) == 1
        out, err = capsys.readouterr()
        assert "error:" in err
        assert SECRET not in out + err
