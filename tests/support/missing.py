"""Python without some packages: a real interpreter in a subprocess in which importing the
named top-level packages fails as it does where they were never installed.

A ``sitecustomize`` module (run by ``site`` at start-up) wraps the finder that searches
``sys.path``, so ``import s3fs`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec("s3fs")`` gives ``None``; nothing of zarr_anyio is replaced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import TOP

__all__ = ["BASE_INSTALL_LACKS", "run_without"]

BASE_INSTALL_LACKS = ("fsspec", "s3fs", "gcsfs", "adlfs", "aiohttp", "obstore", "trio", "upath")
"""What ``pip install zarr-anyio`` (no extras) does not bring (universal_pathlib, of the test
extra, needs fsspec: zarr 3.4 imports it whenever it is there)."""

_SITECUSTOMIZE = """
import os
import sys
from importlib.machinery import PathFinder

_REFUSED = frozenset(os.environ["ZA_TEST_REFUSE"].split(","))


class _Without(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _REFUSED:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_Without if f is PathFinder else f for f in sys.meta_path]
"""


def run_without(
    missing: tuple[str, ...], args: list[str], where: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` (in ``where``) as if ``missing`` were not installed."""
    site = where / "without-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(TOP)])
    env["ZA_TEST_REFUSE"] = ",".join(missing)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=where,
        check=False,
    )
