"""What differs between the zarr releases we support (3.1.0 to 3.4.x), in one place."""

from __future__ import annotations

from typing import Any

try:
    from zarr.errors import VindexInvalidSelectionError
except ImportError:  # zarr < 3.1.1
    from zarr.core.indexing import (  # type: ignore[attr-defined,no-redef,unused-ignore]
        VindexInvalidSelectionError,
    )

__all__ = ["VindexInvalidSelectionError", "chunk_grid", "index_at_start", "inner_chunk_grid"]


def chunk_grid(array: Any) -> Any:
    """The array's grid of stored chunks (shards, if sharded): zarr 3.4 keeps it on the array,
    zarr 3.1 in the metadata."""
    grid = getattr(array, "_chunk_grid", None)
    return grid if grid is not None else array.metadata.chunk_grid


def inner_chunk_grid(shard_shape: tuple[int, ...], chunk_shape: tuple[int, ...]) -> Any:
    """The regular grid of a shard's inner chunks, for zarr's indexers: zarr 3.4 builds it from
    the sizes, zarr 3.1 has a class for regular grids."""
    from zarr.core import chunk_grids

    from_sizes = getattr(chunk_grids.ChunkGrid, "from_sizes", None)
    if from_sizes is not None:
        return from_sizes(shard_shape, chunk_shape)
    return chunk_grids.RegularChunkGrid(chunk_shape=chunk_shape)


def index_at_start(codec: Any) -> bool:
    """Whether a sharding codec puts its index before the chunks: an enum up to zarr 3.3, a
    string from zarr 3.4."""
    location = codec.index_location
    return bool(getattr(location, "value", location) == "start")
