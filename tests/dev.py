"""Set up a virtual environment and run the project's jobs in it; needs only Python >= 3.11.

    python3 tests/dev.py demo     # install, then run the demo (zarr writes, trio reads back)
    python3 tests/dev.py test     # install, then run the whole test suite
    python3 tests/dev.py lint     # install, then ruff and mypy --strict
    python3 tests/dev.py bench    # install, then run the benchmarks

The environment lives in ``.venv-<python version>`` at the top of the checkout and is reinstalled
when ``pyproject.toml`` changes. Extra arguments go to the tool (pytest, the benchmark script).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
VENV = TOP / f".venv-{sys.version_info.major}.{sys.version_info.minor}"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
PYTHON = BIN / "python"


def _ensure_venv() -> None:
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((TOP / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"creating {VENV.name} with {sys.executable}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{TOP}[test]"], check=True)
    stamp.write_text(wanted)


def _run(*command: str) -> int:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=TOP).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "lint", "bench"}:
        print(__doc__)
        return 2
    job, extra = argv[0], argv[1:]
    _ensure_venv()
    py = str(PYTHON)
    if job == "demo":
        return _run(py, "-m", "zarr_anyio.cli", "demo", *extra)
    if job == "test":
        versions = "; ".join(
            f"print('{name}', importlib.metadata.version('{name}'))"
            for name in ("zarr", "anyio", "trio", "numpy")
        )
        _run(py, "-c", f"import importlib.metadata; {versions}")
        return _run(py, "-m", "pytest", *extra)
    if job == "bench":
        return _run(py, "benchmarks/run.py", *extra) or _run(py, "benchmarks/remote.py", *extra)
    for command in (
        (py, "-m", "ruff", "check", "zarr_anyio", "tests", "benchmarks"),
        (py, "-m", "ruff", "format", "--check", "zarr_anyio", "tests", "benchmarks"),
        (py, "-m", "mypy", "--strict", "zarr_anyio"),
    ):
        if code := _run(*command):
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
