"""Zarr's arrays and groups from any anyio backend: what `zarr_anyio.api` hands out.

- `_run`: running zarr's asyncio coroutines from asyncio (the caller's loop) or trio (the
  bridge's loop), each API call ending only when every store operation it made has ended;
- `_compat`: what differs between the zarr releases we support;
- `_nodes`: `AsyncArray` and `AsyncGroup`, zarr's classes forwarded with awaitable methods;
- `_blocks`: `AsyncArray.iter_blocks`, an array chunk by chunk in bounded memory;
- `_pipeline` (with `_pipeline_codecs`): `AnyioCodecPipeline`, zarr's codec pipeline of ours:
  chunk reads batched into worker threads under the store's limit, decoding spread over cores.
"""

from ._blocks import Block
from ._nodes import AsyncArray, AsyncGroup
from ._pipeline import AnyioCodecPipeline

__all__ = ["AnyioCodecPipeline", "AsyncArray", "AsyncGroup", "Block"]
