"""A key where a folder of keys is, or below a key: what a store whose keys are paths cannot hold.

In a tree of files (a folder, obstore's local store, fsspec's local and memory file systems) ``x``
cannot be both a key and the folder of ``x/y``. Every such store answers a write that would need
both with the same error, naming the two keys and the store, and changes nothing: `KeyIsAFolder`
(``set("x")`` while ``x/y`` exists) or `FolderIsAKey` (``set("p/q")`` while ``p`` exists), both
`KeyConflict`. MemoryStore and the object stores (S3, GCS, Azure) hold both.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._base import AnyioStore

__all__ = ["FolderIsAKey", "KeyConflict", "KeyIsAFolder", "conflict", "find_conflict"]


class KeyConflict(OSError):
    """A key that the tree of files cannot hold beside another: ``key`` is where a folder of
    keys is, or below a key. ``other`` is the key in the way (``None``: files that are no keys).
    Nothing was changed."""

    key: str
    other: str | None


class KeyIsAFolder(KeyConflict, IsADirectoryError):
    """The key names a folder that holds other keys (or files that are no keys)."""


class FolderIsAKey(KeyConflict, NotADirectoryError):
    """A folder on the key's path is a key (a file)."""


def conflict(store: str, key: str, other: str | None, *, below: bool) -> KeyConflict:
    """The error for writing ``key`` into ``store`` (named for the message) where ``other`` is
    in the way: a key on its path (``below``), or one under it (``None``: files that are no
    keys)."""
    where = f"cannot write key {key!r} in {store}"
    error: KeyConflict
    if below:
        error = FolderIsAKey(
            errno.ENOTDIR,
            f"{where}: {other!r} is a key, and in a store of files a key cannot also be a "
            "folder of other keys. Nothing was changed; delete that key first to write this one.",
        )
    elif other is None:
        error = KeyIsAFolder(
            errno.EISDIR,
            f"{where}: it is a folder that holds no key but other files (not a store's: left "
            "as they are). Nothing was changed.",
        )
    else:
        error = KeyIsAFolder(
            errno.EISDIR,
            f"{where}: it is a folder of other keys ({other!r}, maybe more), and in a store of "
            "files a key cannot also be a folder of other keys. Nothing was changed; delete "
            f"the keys under {key + '/'!r} first to write this one.",
        )
    error.key, error.other = key, other
    return error


async def find_conflict(store: AnyioStore, key: str, name: str) -> KeyConflict:
    """The conflict that kept ``key`` from being written to ``store`` (named ``name``): a key on
    its path, else one under it (``None`` where the folder holds no key)."""
    parts = key.split("/")
    for depth in range(1, len(parts)):
        above = "/".join(parts[:depth])
        if await store._backend_exists(above):
            return conflict(name, key, above, below=True)
    under = await store._backend_list_prefix(key + "/")
    return conflict(name, key, next(iter(sorted(under)), None), below=False)
