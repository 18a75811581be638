"""``zarr-anyio ls`` where there is no Zarr node: what is there instead, one level deep.

Pointed at a bucket or a folder that holds Zarr hierarchies rather than being one
(``ls s3://bucket/``), ``ls`` shows the names at that level, as ``aws s3 ls`` and ``rclone lsf``
do, and marks those that are the root of a Zarr group or array, so the next command can name
one. One ``list_dir`` of the level and, per name, a few existence checks: no listing of what is
below, which in a bucket of datasets would be every chunk of every one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zarr_anyio.storage._base import AnyioStore

from .info import human_size

__all__ = ["PlainEntry", "list_level", "render_level"]

# The documents that make a folder a Zarr node, and what each says about it.
_ROOTS = (("zarr.json", "Zarr v3"), (".zgroup", "Zarr v2 group"), (".zarray", "Zarr v2 array"))


@dataclass
class PlainEntry:
    """One name at the level: a key (with its size) or a folder (Zarr or not)."""

    name: str
    size: int | None = None  # a key's size; None for a folder
    zarr: str | None = None  # "Zarr v3", "Zarr v2 group", ... for the root of a node

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "zarr": self.zarr}


async def list_level(store: AnyioStore, path: str = "") -> list[PlainEntry]:
    """The names directly under ``path``, sorted, each a key or a folder."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    names = sorted({name async for name in store.list_dir(prefix)})
    entries: dict[str, PlainEntry] = {}

    async def look(name: str) -> None:
        key = prefix + name
        try:
            size: int | None = await store.getsize(key)
        except (FileNotFoundError, IsADirectoryError, ValueError):
            size = None
        entry = PlainEntry(name, size)
        if size is None:
            for document, kind in _ROOTS:
                if await store.exists(f"{key}/{document}"):
                    entry.zarr = kind
                    break
        entries[name] = entry

    await store._for_each(names, look)
    return [entries[name] for name in names]


def render_level(where: str, entries: list[PlainEntry]) -> list[str]:

    lines = [f"{where}: no Zarr group or array here; it holds:"]
    for entry in entries:
        if entry.size is not None:
            lines.append(f"{entry.name}  {human_size(entry.size)}")
        else:
            lines.append(f"{entry.name}/" + (f"  {entry.zarr}" if entry.zarr else ""))
    return lines
