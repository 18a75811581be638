"""How many hops a read from a BlockingStore runs at once: small chunks one hop at a time while
each costs little, parallel hops as soon as a batch shows that its chunks take their time."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import zarr
import zarr.codecs

import zarr_anyio
import zarr_anyio.api as za
from support.arrays import OURS, ZARRS, pipeline
from zarr_anyio.arrays._pipeline_codecs import SyncChain


class _SlowDecodes:
    """Decodes counted while they run, each waiting a while for another to run with it (so
    that ``most`` says whether two hops decoded at once, not how threads happened to run)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self._changed = threading.Condition()

    def enter(self) -> None:
        with self._changed:
            self.now += 1
            self.most = max(self.most, self.now)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.now >= 2, timeout=0.05)

    def leave(self) -> None:
        with self._changed:
            self.now -= 1
            self._changed.notify_all()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_small_chunks_slow_to_decode_are_decoded_in_parallel_hops(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their reads are quick (the page cache): the hops once spread only on slow reads, and
    # these chunks, however long their decoding took, were decoded one hop at a time.
    store = zarr_anyio.LocalStore(tmp_path / "a")
    values = np.arange(16 * 256, dtype="f4").reshape(16, 256)
    with pipeline(ZARRS):
        zarr.create_array(
            store,
            shape=values.shape,
            chunks=(1, 256),  # 16 chunks of 1 KiB
            dtype="f4",
            compressors=zarr.codecs.GzipCodec(level=1),
        )[:] = values
    decodes = _SlowDecodes()
    real = SyncChain.decode

    def slow_decode(self: SyncChain, *args: Any) -> Any:
        decodes.enter()
        try:
            return real(self, *args)
        finally:
            decodes.leave()

    monkeypatch.setattr(SyncChain, "decode", slow_decode)

    async def read() -> Any:
        with zarr.config.set({"codec_pipeline.path": OURS}):
            arr = await za.open_array(store=store, mode="r")
        return await arr.getitem(slice(None))

    np.testing.assert_array_equal(anyio.run(read, backend=backend), values)
    assert decodes.most >= 2
