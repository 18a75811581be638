"""``--storage-option`` names for S3, as either client spells them, given to the client in use.

s3fs and obstore name the same settings differently (``endpoint_url`` and ``endpoint``, ``key``
and ``access_key_id``, ``anon`` and ``skip_signature``...). A command line that switches
``--backend`` should not need its options respelled, and a name the client does not take should
be refused here, by name, rather than surface as ``AioSession.__init__() got an unexpected
keyword argument`` at the first request. So for ``s3://`` the names of the other client are
mapped to the one in use, and names neither takes are refused. obstore refuses plain ``http://``
unless told (``client_options.allow_http``); fsspec takes it as given, so an ``http://`` URL or
endpoint turns it on here: the user who typed ``http://`` asked for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["client_options"]

# obstore's name -> s3fs's, for the settings both have. s3fs takes the region inside
# client_kwargs (botocore's client), obstore at the top.
_OBSTORE_TO_S3FS = {
    "endpoint": "endpoint_url",
    "aws_endpoint": "endpoint_url",
    "access_key_id": "key",
    "aws_access_key_id": "key",
    "secret_access_key": "secret",
    "aws_secret_access_key": "secret",
    "session_token": "token",
    "aws_session_token": "token",
    "skip_signature": "anon",
}
_S3FS_TO_OBSTORE = {
    "endpoint_url": "endpoint",
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "anon": "skip_signature",
}
_REGION_NAMES = ("region", "aws_region", "region_name")

# What s3fs takes besides its constructor's own parameters: fsspec's, for every filesystem.
_FSSPEC_COMMON = frozenset(
    {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
)


def _s3fs_names() -> frozenset[str]:
    import inspect

    import s3fs

    parameters = inspect.signature(s3fs.S3FileSystem.__init__).parameters
    own = {name for name, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    return frozenset(own - {"self", "loop", "asynchronous", "session"}) | _FSSPEC_COMMON


def _for_s3fs(options: dict[str, Any]) -> dict[str, Any]:
    found = dict(options)
    for obstore_name, s3fs_name in _OBSTORE_TO_S3FS.items():
        if obstore_name in found:
            found.setdefault(s3fs_name, found.pop(obstore_name))
    for name in _REGION_NAMES:
        if name in found:
            client = found.setdefault("client_kwargs", {})
            client.setdefault("region_name", found.pop(name))
    if "client_options" in found:
        client_options = found.pop("client_options")
        if set(client_options) - {"allow_http"}:
            raise ValueError(
                f"client_options {sorted(client_options)} are obstore's: use --backend obstore"
            )
    unknown = sorted(set(found) - _s3fs_names())
    if unknown:
        raise ValueError(
            f"storage option {unknown[0]!r} is not one that s3fs takes (--backend fsspec); "
            "see s3fs.S3FileSystem's parameters, or use --backend obstore"
        )
    return found


def _for_obstore(options: dict[str, Any]) -> dict[str, Any]:
    found = dict(options)
    client_kwargs = found.pop("client_kwargs", {})
    if isinstance(client_kwargs, dict):
        if "endpoint_url" in client_kwargs:
            found.setdefault("endpoint", client_kwargs.pop("endpoint_url"))
        if "region_name" in client_kwargs:
            found.setdefault("region", client_kwargs.pop("region_name"))
        if client_kwargs:
            raise ValueError(
                f"storage option client_kwargs.{sorted(client_kwargs)[0]} is botocore's "
                "(--backend fsspec); obstore does not take it"
            )
    for s3fs_name, obstore_name in _S3FS_TO_OBSTORE.items():
        if s3fs_name in found:
            found.setdefault(obstore_name, found.pop(s3fs_name))
    return found


def client_options(scheme: str, backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as the client for ``scheme`` under ``backend`` takes them.

    Raises ``ValueError`` naming an option the client does not take.
    """
    if scheme in ("s3", "s3a"):
        options = _for_s3fs(options) if backend == "fsspec" else _for_obstore(options)
    if backend == "obstore":
        endpoint = str(options.get("endpoint", ""))
        if scheme == "http" or endpoint.startswith("http://"):
            client = dict(options.get("client_options", {}))
            client.setdefault("allow_http", True)
            options = {**options, "client_options": client}
    return options
