"""Every ```python and ```console block of the docs and the README runs, so the examples cannot
rot.

A page's blocks run in order in one temporary folder: python blocks in one namespace, console
blocks line by line in bash. In a console block, ``$ command`` runs the command (``zarr-anyio``
is the console script installed beside this Python); it must exit 0, and the lines shown under
it must appear in what it printed (stdout and stderr), in order, with every number taken as any
number (sizes, times and counts vary from machine to machine). A line ``...`` stands for any
lines.
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
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def test_the_docs_have_examples() -> None:
    assert sum(len(BLOCK.findall(page.read_text())) for page in PAGES) >= 5


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


def run_console(block: str, where: str, env: dict[str, str]) -> None:
    for command, shown in _commands(block):
        result = subprocess.run(
            ["bash", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
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
    page: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    http_server: HTTPServer,
) -> None:
    monkeypatch.chdir(tmp_path)
    # The pages' remote examples talk to the loopback servers under these names.
    servers = {
        "S3_ENDPOINT": s3_server.endpoint,
        "BUCKET": s3_server.new_bucket(),
        "HTTP_URL": http_server.url,
    }
    namespace: dict[str, object] = {"__name__": "__docs__", **servers}
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("AWS_")},
        **servers,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # moto takes any credentials; real ones come from the environment the same way.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for number, (kind, block) in enumerate(BLOCK.findall(page.read_text()), start=1):
        where = f"{page.name}, {kind} block {number}"
        if kind == "console":
            run_console(block, where, env)
        else:
            exec(compile(block, where, "exec"), namespace)
