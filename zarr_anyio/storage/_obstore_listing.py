"""obstore's listing of a prefix, going on past objects whose names obstore refuses.

S3 takes any object name; obstore (object_store) refuses names with a ``.``, ``..`` or empty
segment (``data/../x``, ``c//2``), and a listing that met one raised ``InvalidPathError``: one
such object made ``list()`` fail and ``zarr-anyio copy --backend obstore`` copy nothing. Such a
name can be no key, and is to be left out; but obstore refuses the whole page of up to 1,000
names that holds it, and goes no further, so what it lists cannot be completed with obstore
alone (an ``offset=`` must itself be a name it takes, and the names of that page that sort
before the bad one are lost with it).

So on an ``S3Store`` the rest of the listing — from the last name obstore gave — is made with
botocore (which every S3 setup that has s3fs or boto3 has), from the store's own configuration
(endpoint, region, keys; botocore's usual sources for what it leaves out), one request per page,
its own retries off: every name comes, and the caller leaves out (and a copy counts) those that
are no keys. Elsewhere (GCS, Azure, HTTP), or without botocore, the listing raises an error that
says which object and what to do instead of giving a listing with names silently missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["Lister", "Page"]

Page = list[tuple[str, int | None]]
"""Names (relative to the store) and sizes."""


def _store_root(store: Any) -> str:
    """The key prefix under which ``store`` keeps its names ("" for none)."""
    root = getattr(store, "prefix", None)
    return root.strip("/") if isinstance(root, str) else ""


def _s3_client(store: Any) -> Any:
    import botocore.config
    import botocore.session

    config = {key.lower().removeprefix("aws_"): value for key, value in store.config.items()}
    options: dict[str, Any] = {"retries": {"total_max_attempts": 1}}
    if str(config.get("skip_signature", "")).lower() == "true":
        options["signature_version"] = botocore.UNSIGNED
    if str(config.get("virtual_hosted_style_request", "")).lower() == "true":
        options["s3"] = {"addressing_style": "virtual"}
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=config.get("endpoint") or config.get("endpoint_url"),
        region_name=config.get("region") or config.get("default_region"),
        aws_access_key_id=config.get("access_key_id"),
        aws_secret_access_key=config.get("secret_access_key"),
        aws_session_token=config.get("session_token") or config.get("token"),
        config=botocore.config.Config(**options),
    )


def _s3_pages(store: Any, prefix: str | None, start_after: str | None) -> Iterator[Page]:
    """The listing of ``prefix`` after ``start_after`` (names relative to the store), a page per
    request, through botocore."""
    client = _s3_client(store)
    bucket = store.config.get("bucket") or store.config.get("aws_bucket")
    root = _store_root(store)
    under = "/".join(part for part in (root, prefix) if part)
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{under}/" if under else ""}
    if start_after is not None:
        request["StartAfter"] = "/".join(part for part in (root, start_after) if part)
    strip = len(root) + 1 if root else 0
    while True:
        answer = client.list_objects_v2(**request)
        yield [(item["Key"][strip:], int(item["Size"])) for item in answer.get("Contents", [])]
        token = answer.get("NextContinuationToken")
        if not answer.get("IsTruncated") or not token:
            return
        request["ContinuationToken"] = token


class Lister:
    """Pages of ``(name, size)`` under ``prefix``; each `next_page` is one blocking request."""

    def __init__(self, store: Any, prefix: str | None, chunk_size: int) -> None:
        import obstore

        self._store = store
        self._prefix = prefix
        self._stream: Iterator[Any] = obstore.list(store, prefix=prefix, chunk_size=chunk_size)
        self._fallback: Iterator[Page] | None = None
        self._last: str | None = None

    def next_page(self) -> Page | None:
        """The next page, ``None`` at the end."""
        import obstore.exceptions

        if self._fallback is not None:
            return next(self._fallback, None)
        try:
            batch = next(self._stream, None)
        except obstore.exceptions.InvalidPathError as error:
            self._fallback = self._go_on_without_obstore(error)
            return next(self._fallback, None)
        if batch is None:
            return None
        page: Page = [(meta["path"], int(meta["size"])) for meta in batch]
        if page:
            self._last = page[-1][0]
        return page

    def _go_on_without_obstore(self, error: Exception) -> Iterator[Page]:
        import importlib.util

        import obstore.store

        s3 = isinstance(self._store, obstore.store.S3Store)
        if s3 and importlib.util.find_spec("botocore") is not None:
            return _s3_pages(self._store, self._prefix, self._last)
        hint = ", or install botocore" if s3 else ""
        raise RuntimeError(
            f"obstore cannot list {self._prefix or 'the store'!r} of {self._store!r}: an object "
            "there has a name it refuses, and obstore drops the whole page of names that holds "
            "it. Such a name is no zarr key; to list (or copy) the rest, use FsspecStore "
            f"(zarr-anyio: --backend fsspec){hint}. obstore said: {str(error).splitlines()[0]}"
        ) from None
