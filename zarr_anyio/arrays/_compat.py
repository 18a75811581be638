"""What differs between the zarr releases we support (3.1.0 to 3.4.x), in one place."""

from __future__ import annotations

from typing import Any

try:
    from zarr.errors import VindexInvalidSelectionError
except ImportError:  # zarr < 3.1.1
    from zarr.core.indexing import (  # type: ignore[attr-defined,no-redef,unused-ignore]
        VindexInvalidSelectionError,
    )

__all__ = ["VindexInvalidSelectionError", "chunk_grid"]


def chunk_grid(array: Any) -> Any:
    """The array's grid of stored chunks (shards, if sharded): zarr 3.4 keeps it on the array,
    zarr 3.1 in the metadata."""
    grid = getattr(array, "_chunk_grid", None)
    return grid if grid is not None else array.metadata.chunk_grid
