"""A base install (no extras) names the extra to install, for every remote scheme and for trio.

Each test runs a real interpreter in which the packages the extras bring cannot be imported
(`support.missing`), as after ``pip install zarr-anyio``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.missing import BASE_INSTALL_LACKS, run_without

URLS = {
    "s3://bucket/data.zarr": "s3",
    "gs://bucket/data.zarr": "gcs",
    "az://container/data.zarr": "azure",
    "abfs://container/data.zarr": "azure",
    "http://127.0.0.1:9/data.zarr": "http",
    "https://example.org/data.zarr": "http",
    "simplecache::s3://bucket/data.zarr": "s3",
}

TRY_EACH = """
import json, sys
import zarr_anyio

errors = {}
for url in json.loads(sys.argv[1]):
    for name, open_ in [
        ("open_store", lambda: zarr_anyio.open_store(url)),
        ("from_url", lambda: zarr_anyio.FsspecStore.from_url(url)),
        ("obstore", lambda: zarr_anyio.open_store(url, backend="obstore")),
    ]:
        try:
            open_()
        except Exception as error:
            errors[f"{name} {url}"] = f"{type(error).__name__}: {error}"
        else:
            errors[f"{name} {url}"] = "opened"
print(json.dumps(errors))
"""


@pytest.mark.parametrize(
    "missing",
    [BASE_INSTALL_LACKS, ("s3fs", "gcsfs", "adlfs", "aiohttp", "obstore")],
    ids=["base-install", "fsspec-without-its-backends"],
)
def test_a_url_without_its_extra_names_the_extra(missing: tuple[str, ...], tmp_path: Path) -> None:
    result = run_without(missing, ["-c", TRY_EACH, json.dumps(list(URLS))], tmp_path)
    assert result.returncode == 0, result.stderr
    errors = json.loads(result.stdout)
    for url, extra in URLS.items():
        for name in ("open_store", "from_url"):
            error = errors[f"{name} {url}"]
            assert error.startswith("ModuleNotFoundError: "), error
            assert error.endswith(f"not installed: pip install 'zarr-anyio[{extra}]'"), error
            assert "\n" not in error
        if "::" not in url:
            assert errors[f"obstore {url}"] == (
                f"ModuleNotFoundError: {url!r} with backend='obstore' needs obstore, which is "
                "not installed: pip install 'zarr-anyio[obstore]'"
            )


def test_an_unknown_scheme_is_still_unknown_on_a_base_install(tmp_path: Path) -> None:
    code = "import zarr_anyio; zarr_anyio.open_store('nosuch://x')"
    result = run_without(BASE_INSTALL_LACKS, ["-c", code], tmp_path)
    assert "ValueError: no zarr_anyio store for the scheme 'nosuch'" in result.stderr
    assert "fsspec, which knows others, is not installed" in result.stderr


def test_the_demo_runs_under_asyncio_on_a_base_install(tmp_path: Path) -> None:
    result = run_without(BASE_INSTALL_LACKS, ["-m", "zarr_anyio.cli", "demo"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "trio is not installed (pip install 'zarr-anyio[trio]'): reading back under asyncio"
    )
    assert "under asyncio with fetch_many" in lines[2]
    assert lines[-1] == "all 64 chunks match the array zarr wrote"


def test_the_demo_under_trio_names_the_extra_before_writing(tmp_path: Path) -> None:
    args = ["-m", "zarr_anyio.cli", "demo", str(tmp_path / "out"), "--backend", "trio"]
    result = run_without(BASE_INSTALL_LACKS, args, tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "zarr-anyio: error: --backend trio needs trio, which is not installed: "
        "pip install 'zarr-anyio[trio]'\n"
    )
    assert not (tmp_path / "out").exists()


def test_the_custom_store_harness_names_the_trio_extra(tmp_path: Path) -> None:
    (tmp_path / "test_memory.py").write_text(
        "import pytest\n"
        "from zarr_anyio import MemoryStore\n"
        "from zarr_anyio.testing import AnyioStoreTests\n"
        "class TestMemory(AnyioStoreTests[MemoryStore]):\n"
        "    store_cls = MemoryStore\n"
        "    @pytest.fixture\n"
        "    def store_kwargs(self):\n"
        "        return {}\n"
    )
    args = ["-m", "pytest", "-p", "anyio", "-p", "no:cacheprovider", "-k", "test_get and trio"]
    result = run_without(BASE_INSTALL_LACKS, [*args, "test_memory.py"], tmp_path)
    assert result.returncode == 1, result.stdout
    assert (
        "ModuleNotFoundError: zarr_anyio.testing under trio needs trio, which is not "
        "installed: pip install 'zarr-anyio[trio]'"
    ) in result.stdout
