"""What each optional part of zarr_anyio needs installed, and the one line that says so.

The base install (``pip install zarr-anyio``) has the local stores and runs under asyncio;
the rest comes in extras (pyproject.toml). Without this, a missing package speaks in its own
words (fsspec's "Install s3fs to access S3", anyio's "pip install anyio[trio]", or none when
fsspec itself is missing), and none of them names the extra that brings it with the versions
we test.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_FOR_SCHEME", "missing_module", "require", "require_for_url"]

# A URL scheme (fsspec's names and their aliases): our extra, and what it installs that the
# store needs at import.
EXTRA_FOR_SCHEME: dict[str, tuple[str, tuple[str, ...]]] = {
    "s3": ("s3", ("fsspec", "s3fs")),
    "s3a": ("s3", ("fsspec", "s3fs")),
    "gs": ("gcs", ("fsspec", "gcsfs")),
    "gcs": ("gcs", ("fsspec", "gcsfs")),
    "az": ("azure", ("fsspec", "adlfs")),
    "abfs": ("azure", ("fsspec", "adlfs")),
    "abfss": ("azure", ("fsspec", "adlfs")),
    "http": ("http", ("fsspec", "aiohttp")),
    "https": ("http", ("fsspec", "aiohttp")),
}


def missing_module(*modules: str) -> str | None:
    """The first of ``modules`` that cannot be imported here, or ``None``."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a broken or half-removed install
            found = None
        if found is None:
            return module
    return None


def require(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Raise ``ModuleNotFoundError`` naming ``zarr-anyio[extra]`` if one of ``modules`` is not
    installed; ``what`` is what needs it (a URL, "a trio program")."""
    missing = missing_module(*modules)
    if missing is not None:
        raise ModuleNotFoundError(
            f"{what} needs {missing}, which is not installed: pip install 'zarr-anyio[{extra}]'",
            name=missing,
        )


def require_for_url(url: str, scheme: str, backend: str = "fsspec") -> None:
    """Check that a remote ``url`` can be opened with ``backend`` ("fsspec" or "obstore")."""
    if backend == "obstore":
        require("obstore", ("obstore",), f"{url!r} with backend='obstore'")
        return
    known = EXTRA_FOR_SCHEME.get(scheme.lower())
    if known is not None:
        extra, modules = known
        require(extra, modules, repr(url))
    # Any other scheme is fsspec's to know or refuse (its own packages are not ours to name).
