"""What is in a store: the tree behind ``zarr-anyio ls`` and the node behind ``zarr-anyio info``.

zarr-python reads the metadata (its own rules for v2 and v3, consolidated metadata when there is
some), in a worker thread since its blocking API runs on a loop of its own. Stored sizes come
from one paged listing of the node (`zarr_anyio.storage._listing`), each key's size added to
every node above it:
zarr's own ``info_complete()`` asks the store for the size of every key, which on S3 is a HEAD
request per chunk where a listing gives a thousand sizes per request.
"""

from __future__ import annotations

import contextlib
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import anyio
import zarr

from zarr_anyio.storage._base import AnyioStore
from zarr_anyio.storage._listing import list_node

from .copy import is_metadata
from .progress import tqdm

__all__ = ["Node", "describe", "human_size", "render_info", "render_tree"]


def human_size(size: int) -> str:
    text: str = tqdm().format_sizeof(size, "B", 1024)
    return text


@dataclass
class Node:
    """One group or array, with what is stored under it."""

    path: str
    node_type: str
    zarr_format: int
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    chunks: tuple[int, ...] | None = None
    shards: tuple[int, ...] | None = None
    codecs: list[str] | None = None
    chunks_possible: int | None = None
    chunks_present: int = 0
    stored_bytes: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)
    zarr_info: str = ""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path) or "/"

    def as_dict(self, *, children: bool = True) -> dict[str, Any]:
        found: dict[str, Any] = {
            "path": self.path,
            "node_type": self.node_type,
            "zarr_format": self.zarr_format,
            "stored_bytes": self.stored_bytes,
        }
        if self.node_type == "array":
            found.update(
                shape=self.shape,
                dtype=self.dtype,
                chunks=self.chunks,
                shards=self.shards,
                codecs=self.codecs,
                chunks_present=self.chunks_present,
                chunks_possible=self.chunks_possible,
            )
        if children:
            if self.node_type == "group":
                found["members"] = [child.as_dict() for child in self.children]
        else:
            found["attributes"] = self.attributes
        return found


def _codec_name(codec: Any) -> str:
    inner = getattr(codec, "codecs", None)
    codec_id = getattr(codec, "codec_id", None)
    if codec_id is not None:  # numcodecs (zarr v2)
        return str(codec_id)
    name = str(codec.to_dict()["name"]) if hasattr(codec, "to_dict") else type(codec).__name__
    if inner:
        return f"{name}({', '.join(_codec_name(c) for c in inner)})"
    return name


def _codecs(array: zarr.Array[Any]) -> list[str]:
    metadata: Any = array.metadata
    if array.metadata.zarr_format == 2:
        found = [_codec_name(c) for c in metadata.filters or ()]
        if metadata.compressor is not None:
            found.append(_codec_name(metadata.compressor))
        return found
    return [_codec_name(c) for c in metadata.codecs]


def _node_of(path: str, item: zarr.Array[Any] | zarr.Group) -> Node:
    if isinstance(item, zarr.Group):
        return Node(path=path, node_type="group", zarr_format=item.metadata.zarr_format)
    chunks = tuple(item.chunks)
    shards = item.shards
    grid = shards or chunks
    return Node(
        path=path,
        node_type="array",
        zarr_format=item.metadata.zarr_format,
        shape=tuple(item.shape),
        dtype=str(item.dtype),
        chunks=chunks,
        shards=shards,
        codecs=_codecs(item),
        chunks_possible=math.prod(
            math.ceil(s / c) if c else 1 for s, c in zip(item.shape, grid, strict=True)
        ),
    )


def _read_tree(store: AnyioStore, path: str, depth: int | None, detail: bool) -> Node:
    """The node at ``path`` and its members down to ``depth`` levels (blocking: zarr's API)."""
    item = zarr.open(store=store, path=path, mode="r")
    root = _node_of(path, item)
    if detail:
        root.zarr_info = repr(item.info)
        root.attributes = item.attrs.asdict()
    if isinstance(item, zarr.Group) and depth != 0:
        nodes = {path: root}
        members = item.members(max_depth=None if depth is None else depth - 1)
        for name, member in sorted(members, key=lambda pair: pair[0]):
            full = posixpath.join(path, name) if path else name
            node = nodes[full] = _node_of(full, member)
            nodes[posixpath.dirname(full)].children.append(node)
    return root


async def _add_sizes(store: AnyioStore, root: Node) -> None:
    nodes: dict[str, Node] = {}
    pending = [root]
    while pending:
        node = pending.pop()
        nodes[node.path] = node
        pending.extend(node.children)
    async with contextlib.aclosing(list_node(store, root.path)) as pages:
        async for page in pages:
            for key, size in page:
                folder = posixpath.dirname(key)
                owner: Node | None = None
                # Every node above the key holds its bytes; the nearest one owns the key.
                while True:
                    above = nodes.get(folder)
                    if above is not None:
                        owner = owner or above
                        above.stored_bytes += size or 0
                    if folder in ("", root.path):
                        break
                    folder = posixpath.dirname(folder)
                if owner is not None and owner.node_type == "array" and not is_metadata(key):
                    owner.chunks_present += 1


async def describe(
    store: AnyioStore, path: str = "", depth: int | None = None, *, detail: bool = False
) -> Node:
    """The node at ``path`` with its members (``depth`` levels; ``None``: all) and sizes.

    Raises ``FileNotFoundError`` if there is no Zarr node at ``path``.
    """
    path = path.strip("/")
    try:
        root = await anyio.to_thread.run_sync(_read_tree, store, path, depth, detail)
    except (FileNotFoundError, KeyError) as error:
        where = f"at {path!r}" if path else "at the root"
        raise FileNotFoundError(f"no Zarr group or array {where} ({error})") from None
    await _add_sizes(store, root)
    return root


def _summary(node: Node) -> str:
    stored = human_size(node.stored_bytes)
    if node.node_type == "group":
        count = len(node.children)
        return f"group  v{node.zarr_format}  {count} member{'' if count == 1 else 's'}  {stored}"
    parts = [
        f"array  v{node.zarr_format}",
        f"{node.dtype}",
        f"shape {node.shape}",
        f"chunks {node.chunks}",
    ]
    if node.shards is not None:
        parts.append(f"shards {node.shards}")
    parts.append(f"codecs [{', '.join(node.codecs or [])}]")
    unit = "shards" if node.shards is not None else "chunks"
    parts.append(f"{stored} in {node.chunks_present}/{node.chunks_possible} {unit}")
    return "  ".join(parts)


def render_tree(root: Node) -> list[str]:
    """The tree as lines of text, ``├──``-style, one node a line."""
    lines = [f"{root.path or '/'}  {_summary(root)}"]

    def walk(node: Node, indent: str) -> None:
        for number, child in enumerate(node.children):
            last = number == len(node.children) - 1
            lines.append(f"{indent}{'└── ' if last else '├── '}{child.name}  {_summary(child)}")
            walk(child, indent + ("    " if last else "│   "))

    walk(root, "")
    return lines


def render_info(node: Node) -> list[str]:
    """zarr's own info for the node, and what is stored under it."""
    lines = node.zarr_info.splitlines()
    width = 19 if node.node_type == "array" else 12
    lines.append(f"{'Path':{width}}: {node.path or '/'}")
    lines.append(f"{'Stored':{width}}: {node.stored_bytes} ({human_size(node.stored_bytes)})")
    if node.node_type == "array":
        lines.append(f"{'Codecs':{width}}: {', '.join(node.codecs or [])}")
        unit = "Shards present" if node.shards is not None else "Chunks present"
        lines.append(f"{unit:{width}}: {node.chunks_present} of {node.chunks_possible}")
    if node.attributes:
        lines.append(f"{'Attributes':{width}}: {sorted(node.attributes)}")
    return lines
