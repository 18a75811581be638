"""Set up a virtual environment and run the project's jobs in it; needs only Python >= 3.11.

    python3 tests/dev.py demo     # install, then run the demo (zarr writes, trio reads back)
    python3 tests/dev.py test     # install, then run the whole test suite
    python3 tests/dev.py lint     # install, then ruff and mypy --strict
    python3 tests/dev.py bench    # install, then run the benchmarks
    python3 tests/dev.py docs     # install, then build the documentation site (warnings fail)
    python3 tests/dev.py setup    # install only

    python3 tests/dev.py test --oldest-zarr   # the same, with the oldest zarr pyproject allows
    python3 tests/dev.py test --portable      # the local and zip stores' tests, with none of
                                              # the optional OS calls (ZARR_ANYIO_PORTABLE=1):
                                              # the paths macOS and Windows take, run on Linux

The environment lives in ``.venv-<python version>`` (``.venv-<python version>-zarr<version>``
with ``--oldest-zarr``) at the top of the checkout and is reinstalled when ``pyproject.toml``
changes. Other extra arguments go to the tool (pytest, the benchmark script). The tests run on a
worker per CPU (pytest-xdist's ``-n auto``) unless the arguments choose (``-n 1``,
``-p no:xdist``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _oldest_zarr() -> str:
    """The zarr release that pyproject.toml's ``zarr>=X`` names: the oldest we support."""
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        floor = re.fullmatch(r"zarr\s*>=\s*([0-9][\w.]*)", requirement.strip())
        if floor:
            return floor.group(1)
    raise SystemExit("pyproject.toml names no 'zarr>=' requirement")


def _ensure_venv(pins: list[str]) -> Path:
    """The environment for these pins, made or brought up to date; gives its python."""
    suffix = "".join(f"-{pin.replace('==', '')}" for pin in pins)
    venv_dir = TOP / f".venv-{PYTHON_VERSION}{suffix}"
    python = venv_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    stamp = venv_dir / ".installed"
    wanted = hashlib.sha256((TOP / "pyproject.toml").read_bytes() + str(pins).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        print(f"creating {venv_dir.name} with {sys.executable}", flush=True)
        venv.create(venv_dir, with_pip=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{TOP}[test,bench,docs]", *pins], check=True)
    stamp.write_text(wanted)
    return python


def _run(*command: str, env: dict[str, str] | None = None) -> int:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=TOP, env=env).returncode


# The stores that make file-system calls, and every store suite that runs them (zarr's
# StoreTests, ours, the state machines, attacks and fuzzing): what the portable mode changes.
PORTABLE_TESTS = ["tests/storage", "--ignore=tests/storage/remote", "-k", "local or zip"]


def _workers(extra: list[str]) -> list[str]:
    """pytest-xdist's options: a worker per CPU unless the caller chose (``-n``, ``-p no:xdist``).

    The suite is bound by the CPU (its user and system time was 90% of its wall time in one
    process), so a worker per CPU halves it on two cores: 28 minutes, 13 with two workers.
    ``worksteal``: the slow tests (whole copies, dask clusters) do not leave one worker idle
    behind another's queue."""
    chosen = {"-n", "--numprocesses", "no:xdist", "--dist"}
    if any(arg in chosen or arg.startswith(("-n", "--numprocesses=")) for arg in extra):
        return []
    return ["-n", "auto", "--dist", "worksteal"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"setup", "demo", "test", "lint", "bench", "docs"}:
        print(__doc__)
        return 2
    job, extra = argv[0], argv[1:]
    pins: list[str] = []
    if "--oldest-zarr" in extra:
        extra.remove("--oldest-zarr")
        pins.append(f"zarr=={_oldest_zarr()}")
    env = None
    if job == "test" and "--portable" in extra:
        extra.remove("--portable")
        env = {**os.environ, "ZARR_ANYIO_PORTABLE": "1"}
        extra = [*PORTABLE_TESTS, *extra]
    py = str(_ensure_venv(pins))
    if job == "setup":
        return 0
    if job == "demo":
        return _run(py, "-m", "zarr_anyio.cli", "demo", *extra)
    if job == "test":
        versions = "; ".join(
            f"print('{name}', importlib.metadata.version('{name}'))"
            for name in ("zarr", "anyio", "trio", "numpy")
        )
        _run(py, "-c", f"import importlib.metadata; {versions}")
        # The suites start hundreds of Python processes (the command, spawned workers, dask's);
        # compiled once here, they do not compile the package again each (a quarter of a
        # second apiece where PYTHONDONTWRITEBYTECODE is set, as it is in many containers).
        _run(py, "-m", "compileall", "-q", "zarr_anyio", "tests", "benchmarks")
        return _run(py, "-m", "pytest", *_workers(extra), *extra, env=env)
    if job == "docs":
        # Into a temporary folder unless one is named: the site is built to be checked here.
        out = extra[0] if extra else tempfile.mkdtemp(prefix="zarr-anyio-docs-")
        code = _run(py, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", out)
        if not code:
            print(f"built {out}/index.html", flush=True)
        return code
    if job == "bench":
        return (
            _run(py, "benchmarks/run.py", *extra)
            or _run(py, "benchmarks/remote.py", *extra)
            or _run(py, "benchmarks/api.py", *extra)
        )
    for command in (
        (py, "-m", "ruff", "check", "zarr_anyio", "tests", "benchmarks"),
        (py, "-m", "ruff", "format", "--check", "zarr_anyio", "tests", "benchmarks"),
        (py, "-m", "mypy", "--strict", "zarr_anyio", "tests", "benchmarks"),
    ):
        if code := _run(*command):
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
