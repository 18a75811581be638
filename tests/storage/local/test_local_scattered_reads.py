"""A LocalStore reading a value straight into an array of any strides (a raw chunk's place in
the result): one ``preadv`` into its rows where the system has it, a read and a copy where it
has not (the portable mode runs this file too), the same bytes either way."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import zarr_anyio
from zarr_anyio.storage import _scatter
from zarr_anyio.storage._localfs import read_file_into_array
from zarr_anyio.storage._oscalls import PORTABLE

View = Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]

# Each: the array the view is taken of, and the view (a chunk's place in a result).
VIEWS: dict[str, tuple[tuple[int, ...], str, View]] = {
    "contiguous": ((64, 512), "f4", lambda a: a[8:16]),
    "rows apart": ((64, 512), "f4", lambda a: a[8:40, 128:256]),
    "rows of exactly the least run": ((64, 512), "u1", lambda a: a[3:9, 100:356]),
    "rows too short for the kernel": ((64, 512), "f4", lambda a: a[8:40, 10:20]),
    "two outer axes": ((6, 40, 300), "f8", lambda a: a[1:5, 3:30, 10:290]),
    "inner axes contiguous together": ((5, 8, 64), "f4", lambda a: a[1:4, :, :]),
    "a reversed axis": ((64, 512), "i4", lambda a: a[40:8:-1, 64:448]),
    "columns (a transposed view)": ((64, 512), "f4", lambda a: a.T[:, 3:9]),
    "more runs than one call takes": ((3000, 128), "f8", lambda a: a[:2900, :64]),
    "a length-one axis between": ((64, 1, 512), "f4", lambda a: a[8:40, :, 64:448]),
}


def _case(name: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    shape, dtype, view = VIEWS[name]
    whole = np.full(shape, 7, dtype=dtype)
    return whole, view(whole)


def _stored(tmp_path: Path, data: bytes, key: str = "c/0") -> Path:
    path = tmp_path / "root" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return tmp_path / "root"


def _values(view: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(len(view.shape) * view.size)
    values: np.ndarray[Any, Any] = rng.integers(10, 100, size=view.shape).astype(view.dtype)
    return values


@pytest.mark.parametrize("name", list(VIEWS))
def test_a_value_lands_in_its_view_and_nowhere_else(tmp_path: Path, name: str) -> None:
    whole, view = _case(name)
    values = _values(view)
    root = _stored(tmp_path, values.tobytes())
    assert read_file_into_array(str(root), "c/0", view) == values.nbytes
    np.testing.assert_array_equal(view, values)
    # The values are never 7, what the rest of the array holds: none was written outside.
    assert np.count_nonzero(whole != 7) == view.size


@pytest.mark.parametrize("name", ["rows apart", "two outer axes", "more runs than one call takes"])
@pytest.mark.parametrize("change", [-1, 1, -4096])
def test_a_value_of_another_length_is_given_as_bytes(
    tmp_path: Path, name: str, change: int
) -> None:
    whole, view = _case(name)
    data = _values(view).tobytes()
    data = data + b"x" * change if change > 0 else data[:change]
    root = _stored(tmp_path, data)
    before = whole.copy()
    got = read_file_into_array(str(root), "c/0", view)
    assert not isinstance(got, int)
    assert got is not None
    assert bytes(got) == data
    np.testing.assert_array_equal(whole, before)  # nothing written into the result


def test_no_value_is_none(tmp_path: Path) -> None:
    _, view = _case("rows apart")
    (tmp_path / "root").mkdir()
    assert read_file_into_array(str(tmp_path / "root"), "c/0", view) is None
    assert read_file_into_array(str(tmp_path / "gone"), "c/0", view) is None
    (tmp_path / "root" / "c" / "0").mkdir(parents=True)  # a folder is no value
    assert read_file_into_array(str(tmp_path / "root"), "c/0", view) is None


@pytest.mark.parametrize("name", ["rows apart", "more runs than one call takes"])
def test_a_file_shorter_than_the_view_stops_the_kernel_read_short(
    tmp_path: Path, name: str
) -> None:
    # What a value cut short after it was measured looks like to the read itself: fewer
    # bytes, so the caller reads the file again as it is.
    if PORTABLE:
        assert _scatter.read_scattered is None  # the portable mode reads and copies
        return
    assert _scatter.read_scattered is not None
    _, view = _case(name)
    values = _values(view)
    half = values.nbytes // 2 + 3
    root = _stored(tmp_path, values.tobytes()[:half])
    fd = os.open(root / "c" / "0", os.O_RDONLY)
    try:
        assert _scatter.read_scattered(fd, view, 0) == half
    finally:
        os.close(fd)
    np.testing.assert_array_equal(
        view.reshape(-1)[: half // view.itemsize], values.reshape(-1)[: half // view.itemsize]
    )


def test_the_kernel_takes_the_rows_where_the_system_has_preadv() -> None:
    # Linux has it: only the portable mode goes without.
    assert (_scatter.read_scattered is None) == PORTABLE
    _, view = _case("rows apart")
    found = _scatter.runs_of(view)
    assert found is not None
    iovecs, run = found
    assert run == 128 * 4
    assert len(iovecs) == 32
    assert iovecs[1, 0] - iovecs[0, 0] == 512 * 4
    assert _scatter.runs_of(_case("rows too short for the kernel")[1]) is None


def test_a_batch_of_reads_opens_the_root_once_and_closes_it(tmp_path: Path) -> None:
    store = zarr_anyio.LocalStore(tmp_path / "root")
    _, view = _case("rows apart")
    values = _values(view)
    _stored(tmp_path, values.tobytes(), "c/0")
    _stored(tmp_path, b"whole value", "c/1")
    fds = len(os.listdir("/proc/self/fd"))
    reads = store._read_many_blocking(
        [("c/0", view), ("c/1", None), ("c/2", None), ("c/2", view), ("c/1", view)]
    )
    try:
        assert next(reads) == values.nbytes
        np.testing.assert_array_equal(view, values)
        assert bytes(next(reads)) == b"whole value"  # type: ignore[arg-type]
        assert next(reads) is None
        assert next(reads) is None
        assert bytes(next(reads)) == b"whole value"  # type: ignore[arg-type]
        # Left open while the batch is read: the root's handle.
        assert len(os.listdir("/proc/self/fd")) == fds + (0 if PORTABLE else 1)
    finally:
        reads.close()
    assert len(os.listdir("/proc/self/fd")) == fds
