"""Every ```python block of the docs and the README runs, so the examples cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from servers import HTTPServer, S3Server

TOP = Path(__file__).resolve().parent.parent
PAGES = sorted([TOP / "README.md", *(TOP / "docs").glob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_docs_have_examples() -> None:
    assert sum(len(BLOCK.findall(page.read_text())) for page in PAGES) >= 5


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
    namespace: dict[str, object] = {
        "__name__": "__docs__",
        "S3_ENDPOINT": s3_server.endpoint,
        "BUCKET": s3_server.new_bucket(),
        "HTTP_URL": http_server.url,
    }
    for number, block in enumerate(BLOCK.findall(page.read_text()), start=1):
        code = compile(block, f"{page.name}, python block {number}", "exec")
        exec(code, namespace)
