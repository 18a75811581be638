"""A local destination that the copy itself brought into being, taken away again if the copy
failed before anything was written into it.

A copy that fails leaves the destination as it found it: where DST did not exist, opening it
made a folder (and the missing folders above it) or a zip holding no member, which would
otherwise outlive the failed command and read as an empty store. Likewise a zip destination
that was a file of no bytes, into which the zip store writes an empty directory at close, is
made empty again.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path

from .urls import local_path

__all__ = ["emptied_if_still_empty", "empty_file", "first_missing", "remove_if_still_empty"]


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


def empty_file(url: str) -> Path | None:
    """The local ``url`` if it is a file of no bytes: a zip destination takes it as a new
    archive and writes the archive's (empty) directory into it at close."""
    path = local_path(url)
    if path is None or not os.path.isfile(path) or os.path.getsize(path) != 0:
        return None
    return Path(path)


def emptied_if_still_empty(path: Path) -> None:
    """``path``, found empty, made empty again if it is a zip without members (what a failed
    copy to it left)."""
    if os.path.isfile(path) and _holds_nothing(path):
        os.truncate(path, 0)


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
    # Another process may write into ``made`` after the check (another copy into a sibling
    # of ours under the same new folder): each entry is looked at again as it goes, and a
    # folder goes with ``rmdir``, which refuses one that is no longer empty.
    if made.is_dir():
        for folder, subfolders, files in os.walk(made, topdown=False):
            for name in files:
                _remove_empty_zip(Path(folder, name))
            for name in subfolders:
                _remove_empty_folder(Path(folder, name))
        _remove_empty_folder(made)
    else:
        _remove_empty_zip(made)


def _remove_empty_zip(path: Path) -> None:
    if os.path.lexists(path) and not path.is_dir() and _holds_nothing(path):
        path.unlink(missing_ok=True)


def _remove_empty_folder(path: Path) -> None:
    if path.is_symlink():
        return
    # Gone already, or not empty any more (ENOTEMPTY): either way not ours to take.
    with contextlib.suppress(OSError):
        os.rmdir(path)
