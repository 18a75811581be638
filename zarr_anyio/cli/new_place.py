"""A local destination that the copy itself brought into being, taken away again if the copy
failed before anything was written into it.

A copy that fails leaves the destination as it found it: where DST did not exist, opening it
made a folder (and the missing folders above it) or a zip holding no member, which would
otherwise outlive the failed command and read as an empty store.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .urls import local_path

__all__ = ["first_missing", "remove_if_still_empty"]


def first_missing(url: str) -> Path | None:
    """The highest folder or file on the way to the local ``url`` that does not exist yet."""
    path = local_path(url)
    if path is None:
        return None
    missing: Path | None = None
    for candidate in (Path(path), *Path(path).parents):
        if os.path.lexists(candidate):
            break
        missing = candidate
    return missing


def _holds_nothing(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        return all(_holds_nothing(entry) for entry in path.iterdir())
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return not archive.infolist()


def remove_if_still_empty(made: Path) -> None:
    """Remove ``made`` if it holds no value: only empty folders and zips without members.

    What is not empty stays: a failed copy keeps the whole keys it wrote, for a resume.
    """
    if not os.path.lexists(made) or not _holds_nothing(made):
        return
    if made.is_dir():
        for folder, subfolders, files in os.walk(made, topdown=False):
            for name in files:
                os.unlink(os.path.join(folder, name))
            for name in subfolders:
                os.rmdir(os.path.join(folder, name))
        os.rmdir(made)
    else:
        made.unlink()
