"""Helpers for the tests of the ``zarr-anyio`` command: running the installed console script,
making hierarchies to copy, and looking at folders byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr

# The console script that pip installed beside this interpreter (an editable install of the
# checkout, so it runs the code under test).
SCRIPT = Path(sys.executable).parent / "zarr-anyio"
# What LocalStore's own files (its temporary ones) hold in their names, and no key can.
TEMP_MARK = "\\"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for the command: moto's credentials, no proxies, columns for tqdm."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith("AWS_")
    }
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        COLUMNS="120",
    )
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``zarr-anyio *args`` to the end; its output as text."""
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        check=False,
        **kwargs,
    )


def start_cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([str(SCRIPT), *args], text=True, env=cli_env(), **kwargs)


def s3_options(endpoint: str, backend: str = "fsspec") -> list[str]:
    """``--storage-option`` arguments that point a client at a loopback S3 endpoint."""
    if backend == "obstore":
        pairs = [
            f"endpoint={endpoint}",
            "region=us-east-1",
            "access_key_id=testing",
            "secret_access_key=testing",
            "client_options.allow_http=true",
        ]
    else:
        pairs = [
            "key=testing",
            "secret=testing",
            f"client_kwargs.endpoint_url={endpoint}",
            "client_kwargs.region_name=us-east-1",
        ]
    return [arg for pair in pairs for arg in ("--storage-option", pair)]


def make_hierarchy(root: Path, *, chunks: int = 16, chunk_bytes: int = 1024) -> Path:
    """A v3 hierarchy: a group with attributes, an array of ``chunks`` uncompressed chunks of
    ``chunk_bytes``, a sharded array in a subgroup."""
    group = zarr.open_group(str(root), mode="w", attributes={"title": "test"})
    items = chunk_bytes // 4
    data = np.arange(chunks * items, dtype="int32")
    group.create_array("a", shape=data.shape, chunks=(items,), dtype="int32", compressors=None)[
        :
    ] = data
    sharded = group.create_group("sub").create_array(
        "b", shape=(64, 64), chunks=(8, 8), shards=(32, 32), dtype="float64"
    )
    sharded[:] = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its key, with its bytes."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
