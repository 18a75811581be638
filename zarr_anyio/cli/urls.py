"""Stores from what a command line says: URLs, paths and ``--storage-option KEY=VALUE`` pairs,
and errors told in one line."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import anyio

from zarr_anyio.storage import AnyioStore, RateLimit
from zarr_anyio.storage._open import REMOTE_SCHEMES, AccessMode, make_store

from .options import client_options

__all__ = [
    "UsageError",
    "close_stores",
    "describe_error",
    "ensure_open",
    "exists",
    "inside",
    "local_path",
    "open_url",
    "place",
    "scheme",
    "storage_options",
]


class UsageError(Exception):
    """The command line asks for something impossible: exit code 2."""


_LONGEST_ERROR = 400


def describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    text = str(error) or type(error).__name__
    # obstore appends its Rust error's debug dump (hundreds of characters): the line before it
    # says what went wrong.
    text = text.split("Debug source:", 1)[0]
    quoted = len(text) > 1 and text[0] in "'\"" and text.count(text[0]) == 2
    if isinstance(error, KeyError | FileNotFoundError) and quoted and text.endswith(text[0]):
        text = text[1:-1]  # a key's repr: 'a/b'
    text = " ".join(text.split())
    if len(text) > _LONGEST_ERROR:
        # A server's whole HTML error page, quoted by a client: the start says what happened.
        text = text[: _LONGEST_ERROR - 30].rstrip() + " ... (--debug shows it all)"
    return text


def _set_option(options: dict[str, Any], pair: str) -> None:
    key, separator, text = pair.partition("=")
    if not separator or not key:
        raise UsageError(f"a storage option is KEY=VALUE, got {pair!r}")
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = text
    *parents, last = key.split(".")
    for parent in parents:
        inner = options.setdefault(parent, {})
        if not isinstance(inner, dict):
            raise UsageError(f"storage option {parent!r} is both a value and a group in {pair!r}")
        options = inner
    options[last] = value


def storage_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict: VALUE as JSON if it parses, else as text; ``a.b=1`` nests."""
    options: dict[str, Any] = {}
    for pair in pairs:
        _set_option(options, pair)
    return options


def scheme(url: str) -> str:
    name, separator, _ = url.partition("://")
    return name.lower() if separator else ""


def local_path(url: str) -> str | None:
    kind = scheme(url)
    if kind not in ("", "file"):
        return None
    return os.path.realpath(url.partition("://")[2] if kind else url)


# Schemes that name the same service, so that `s3a://b/x` is seen to be `s3://b/x`.
_SAME_SERVICE = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "azure": "az"}


def place(url: str) -> tuple[str, ...]:
    """Where ``url`` points, as a path of names: one URL is inside another when its place
    starts with the other's (a folder and its real path, ``s3://b/x/`` and ``s3a://b/x`` alike)."""
    path = local_path(url)
    if path is not None:
        return ("file", *Path(path).parts)
    kind, _, rest = url.partition("://")
    kind = _SAME_SERVICE.get(kind.lower(), kind.lower())
    names = [name for name in rest.split("?", 1)[0].split("/") if name not in ("", ".")]
    return (kind, *names)


def inside(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    """Whether the place ``inner`` is ``outer`` or below it."""
    return inner[: len(outer)] == outer


_LOOKS_LIKE_A_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):(.*)", re.DOTALL)


def _check_url(url: str) -> None:
    """A URL typo (``s3:/bucket``) as a command-line error, before it is taken for a folder."""
    typo = _LOOKS_LIKE_A_SCHEME.fullmatch(url)
    if "://" in url or typo is None or os.path.exists(url):
        return
    name, after = typo.groups()
    raise UsageError(
        f"{url!r} looks like a URL, but {name + ':'!r} is not followed by '//' (did you mean "
        f"'{name}://{after.lstrip('/')}'?); for a local path with a colon, write './{url}'"
    )


def open_url(
    url: str, args: argparse.Namespace, extra_options: list[str], mode: AccessMode
) -> AnyioStore:
    """The store for ``url``; a URL no store takes is a usage error."""
    _check_url(url)
    remote = scheme(url) in REMOTE_SCHEMES
    if extra_options and not remote:
        raise UsageError(f"storage options are for remote URLs (s3://, gs://, ...), not {url!r}")
    options = storage_options([*args.storage_option, *extra_options])
    if not remote:
        options = {}  # --storage-option goes to every remote URL of the command, no local one
    else:
        try:
            options = client_options(scheme(url), args.backend, options)
        except ValueError as error:
            raise UsageError(f"{url}: {error}") from None
    kwargs: dict[str, Any] = {"max_concurrency": args.max_concurrency}
    if remote and args.rate is not None:
        # One budget for every remote store of the command.
        if getattr(args, "rate_limit", None) is None:
            args.rate_limit = RateLimit(args.rate)
        kwargs["rate_limit"] = args.rate_limit
    try:
        return make_store(
            url, mode=mode, storage_options=options or None, backend=args.backend, **kwargs
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{url!r} does not exist: {error}") from None
    except (ValueError, TypeError) as error:
        raise UsageError(f"cannot open {url!r}: {error}") from None
    except ImportError as error:
        raise RuntimeError(f"cannot open {url!r}: {error.name or error} is not installed") from None


async def ensure_open(store: AnyioStore, what: str, url: str) -> None:
    try:
        await store._ensure_open()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {url!r} does not exist") from None
    except OSError as error:
        raise OSError(f"cannot open {what} {url!r}: {describe_error(error)}") from None


async def exists(store: AnyioStore) -> bool:
    """Whether the store's root is there (a dry run's destination need not be)."""
    try:
        await store._ensure_open()
    except FileNotFoundError:
        return False
    return True


async def close_stores(*stores: AnyioStore) -> None:
    # Shielded: closing a zip writes its central directory, also after Ctrl-C.
    with anyio.CancelScope(shield=True):
        for store in stores:
            if store._is_open:
                await store.aclose()
