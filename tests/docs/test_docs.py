"""Every ```python and ```console block of the docs and the README runs, as a reader would run
it, so the examples cannot rot.

A page's python blocks are a script, run as a file by a fresh interpreter (``python page.py``)
in a temporary folder (a page that goes back to python after a console block starts a second
script there); a block that starts with ``# name.py`` is a file of its own, written there first
(so the scripts can import it) and run by itself too. Nothing is given to them but the
environment a reader would set, so a missing import, a name another page defines or a missing
``if __name__ == "__main__":`` guard fails here as it would for the reader. The remote examples
find the loopback servers the tests start through the environment (``S3_ENDPOINT``, ``BUCKET``,
``HTTP_URL``, and credentials for moto), as they would find a real service. Console blocks run
in their place in the page, in the same folder, line by line in bash: ``$ command`` runs the command
(``zarr-anyio`` is the console script installed beside this Python); it must exit 0, and the
lines shown under it must appear in what it printed (stdout and stderr), in order, with every
number taken as any number, a size in any unit (sizes, times and counts vary from machine to
machine). A line ``...`` stands for any lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import TOP
from support.servers import HTTPServer, S3Server

PAGES = sorted([TOP / "README.md", *(TOP / "docs").glob("*.md")])
BLOCK = re.compile(r"^```(python|console)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A block that begins with a comment naming a file (``# cluster.py``) is that file, run by itself;
# the page's other python blocks are one script, ``page.py``.
SCRIPT_NAME = re.compile(r"# ([\w-]+\.py)\n")
# A number with its unit of bytes, if it has one: a copy stopped early under load copied only
# metadata, "(568B)" where the page shows "(325kB)".
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[kMGT]i?B\b|B\b)?")
TEST_FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def test_the_docs_have_examples() -> None:
    assert sum(len(BLOCK.findall(page.read_text())) for page in PAGES) >= 5


def test_every_test_file_the_docs_name_exists() -> None:
    # The guarantees page points at the tests that keep each promise: none may point at nothing.
    named = {name for page in PAGES for name in TEST_FILE.findall(page.read_text())}
    assert len(named) >= 20
    assert sorted(name for name in named if not (TOP / name).is_file()) == []


def _normal(line: str) -> str:
    return " ".join(NUMBER.sub("N", line).split())


def _commands(block: str) -> list[tuple[str, list[str]]]:
    commands: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands and line.strip() and line.strip() != "...":
            commands[-1][1].append(line)
    return commands


def run_console(block: str, where: str, env: dict[str, str], folder: Path) -> None:
    for command, shown in _commands(block):
        result = subprocess.run(
            ["bash", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=folder,
            timeout=120,
        )
        printed = result.stdout
        assert result.returncode == 0, f"{where}: `{command}` failed:\n{printed}"
        lines = iter(_normal(line) for line in printed.splitlines())
        for expected in shown:
            wanted = _normal(expected)
            assert any(line == wanted for line in lines), (
                f"{where}: `{command}` did not print {expected!r} (in order) but:\n{printed}"
            )


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_examples_run(
    page: Path, tmp_path: Path, s3_server: S3Server, http_server: HTTPServer
) -> None:
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("AWS_")},
        # The pages' remote examples read where the servers are from the environment.
        "S3_ENDPOINT": s3_server.endpoint,
        "BUCKET": s3_server.new_bucket(),
        "HTTP_URL": http_server.url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # The checkout, not the installed copy, is what the examples import.
        "PYTHONPATH": str(TOP),
        # moto takes any credentials; real ones come from the environment the same way.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    blocks = BLOCK.findall(page.read_text())
    # Files the page names first (the page's scripts may import them), each run by itself too: a
    # module or a test file must stand alone. The other python blocks are scripts, run in the
    # page's order with its console blocks: the python blocks up to a console block are one
    # script, and those after it another (a reader back from the shell starts afresh, so a later
    # script opens again what it uses).
    files = [name for kind, block in blocks if kind == "python" for name in _named(block)]
    for kind, block in blocks:
        for name in _named(block) if kind == "python" else []:
            (tmp_path / name).write_text(block)
    for name in files:
        _run_script(page, name, env, tmp_path)
    script: list[str] = []
    scripts = 0

    def run_pending() -> None:
        nonlocal script, scripts
        if script:
            scripts += 1
            name = "page.py" if scripts == 1 else f"page-{scripts}.py"
            (tmp_path / name).write_text("\n\n".join(script))
            _run_script(page, name, env, tmp_path)
            script = []

    for number, (kind, block) in enumerate(blocks, start=1):
        if kind == "python" and not _named(block):
            script.append(block)
        elif kind == "console":
            run_pending()
            run_console(block, f"{page.name}, console block {number}", env, tmp_path)
    run_pending()


def _named(block: str) -> list[str]:
    named = SCRIPT_NAME.match(block)
    return [named.group(1)] if named else []


def _run_script(page: Path, name: str, env: dict[str, str], folder: Path) -> None:
    result = subprocess.run(
        [sys.executable, name],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{page.name}: {name} failed:\n{result.stderr}"
