"""``zarr_anyio.api``'s functions are written out: real coroutine functions, typed, with our
docstrings, and in step with the installed zarr's ``zarr.api.asynchronous`` (a parameter zarr
adds fails here, not in a user's program)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.api.asynchronous

import zarr_anyio
import zarr_anyio.api as za
from support import TOP

pytestmark = pytest.mark.anyio

# Declared by zarr, not implemented there.
NOT_IMPLEMENTED = {"copy", "copy_all", "copy_store"}
NAMES = sorted(
    {*zarr.api.asynchronous.__all__, "create_group"} - NOT_IMPLEMENTED,
)
# Parameters that one supported zarr version has and another lacks (zarr 3.4 dropped
# zarr_version and added the others): ours has them all, each defaulting to None.
OTHER_VERSIONS = {"zarr_version", "zarr_format", "config", "storage_options", "mode", "data"}


def ours(name: str) -> inspect.Signature:
    function = vars(za).get(name)
    assert function is not None, f"zarr_anyio.api.{name} is not written out"
    return inspect.signature(function)


def theirs(name: str) -> inspect.Signature:
    return inspect.signature(getattr(zarr.api.asynchronous, name))


@pytest.mark.parametrize("name", NAMES)
def test_every_zarr_parameter_is_ours_with_its_kind_and_default(name: str) -> None:
    mine, zarrs = ours(name).parameters, theirs(name).parameters
    for parameter in zarrs.values():
        assert parameter.name in mine, f"zarr's {name}() takes {parameter.name}=, ours does not"
        own = mine[parameter.name]
        assert own.kind is parameter.kind, (name, parameter.name)
        if parameter.default is not parameter.empty:
            assert own.default is parameter.default or own.default == parameter.default, (
                name,
                parameter.name,
            )
    for extra in set(mine) - set(zarrs):
        assert extra in OTHER_VERSIONS or mine[extra].kind is mine[extra].VAR_KEYWORD, (
            f"{name}() takes {extra}=, which no zarr we know of takes"
        )
        if extra in OTHER_VERSIONS:
            assert mine[extra].default is None
    # Positional parameters in zarr's order, so a positional call means the same.
    positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    assert [p.name for p in mine.values() if p.kind in positional] == [
        p.name for p in zarrs.values() if p.kind in positional
    ]


@pytest.mark.parametrize("name", NAMES)
def test_tools_see_coroutine_functions_with_our_docstrings(name: str) -> None:
    function = vars(za)[name]
    zarr_function = getattr(zarr.api.asynchronous, name)
    # Every one a coroutine function (zarr's tree is one only underneath its decorator), but
    # create_hierarchy, an async generator in zarr, ours a NodeIterator (nothing held open
    # between items).
    assert inspect.iscoroutinefunction(function) == (name != "create_hierarchy")
    assert inspect.isasyncgenfunction(zarr_function) == (name == "create_hierarchy")
    assert function.__module__ == "zarr_anyio.api"
    doc = inspect.getdoc(function) or ""
    assert "Example::" in doc
    assert doc != inspect.getdoc(zarr_function)
    assert ours(name).return_annotation != inspect.Signature.empty


async def test_a_parameter_this_zarr_lacks_is_refused_when_given(tmp_path: Path) -> None:
    lacking = [
        key
        for key in ours("open_array").parameters
        if key not in theirs("open_array").parameters and key != "kwargs"
    ]
    assert lacking  # zarr_version on zarr 3.4, config on zarr 3.1
    for key in lacking:
        with pytest.raises(TypeError, match=f"open_array\\(\\) got {key}=, which zarr"):
            await za.open_array(store=str(tmp_path / "a.zarr"), **{key: 3})  # type: ignore[arg-type]
    # Left at its default, it is not passed on: the call works on every version.
    made = await za.create_array(str(tmp_path / "b.zarr"), shape=(2,), dtype="i1")
    opened = await za.open_array(store=str(tmp_path / "b.zarr"), mode="r")
    assert opened.shape == made.shape == (2,)


async def test_positional_and_variadic_arguments_reach_zarr(tmp_path: Path) -> None:
    path = str(tmp_path / "saved.zarr")
    await za.save(path, np.arange(3), np.ones(2))  # save(store, *args): a group of arr_0, arr_1
    saved = await za.open_group(path, mode="r")
    assert sorted([name async for name, _ in saved.members()]) == ["arr_0", "arr_1"]
    full = await za.full((4,), 7, store=str(tmp_path / "full.zarr"), dtype="i4")
    assert (await full.getitem(slice(None))).tolist() == [7] * 4
    assert isinstance(full.store, zarr_anyio.LocalStore)


USER_FILE = """
import zarr_anyio.api as za


async def main() -> None:
    wrong = await za.open_array("a.zarr", "r")
    right = await za.open_array(store="a.zarr", mode="r")
    reveal_type(right)
"""


def test_mypy_checks_a_users_calls(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_FILE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "user.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(TOP)},
        timeout=600,
        check=False,
    )
    # As for zarr's own open_array (store= and the rest are keyword-only): the wrong call is
    # reported, the right one is not, and what it gives is known.
    lines = result.stdout.splitlines()
    assert 'user.py:6: error: Too many positional arguments for "open_array"  [call-arg]' in lines
    assert not [line for line in lines if line.startswith("user.py:7:")], result.stdout
    assert lines[-1] == 'user.py:8: note: Revealed type is "zarr_anyio.arrays._nodes.AsyncArray"'


def test_help_shows_our_signature_and_docstring() -> None:
    text = inspect.getdoc(za.open_array) or ""
    assert "zarr_anyio.open_store" in text
    signature = str(inspect.signature(za.open_array))
    assert signature.startswith("(*, store: 'StoreLike | None' = None, ")
    assert signature.endswith("-> 'AsyncArray'")


def test_every_function_is_exported() -> None:
    assert set(NAMES) <= set(za.__all__)
