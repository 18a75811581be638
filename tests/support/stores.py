"""Stores filled with keys for a test."""

from __future__ import annotations

from zarr.core.buffer import cpu

from zarr_anyio import AnyioStore

__all__ = ["fill_keys"]


async def fill_keys(store: AnyioStore, count: int) -> list[str]:
    """``count`` keys ``c/0``, ``c/1``, ... of 64 bytes each, written to ``store``."""
    keys = [f"c/{i}" for i in range(count)]
    await store.set_many((key, cpu.Buffer.from_bytes(b"x" * 64)) for key in keys)
    return keys
