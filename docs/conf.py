"""The documentation site: Sphinx, with MyST for the Markdown pages and autodoc for the API.

Sphinx rather than MkDocs: its configuration can live in ``docs/`` beside the pages (the top of
the repository holds only what it holds), so the pages stay where the tests, the README and the
other branches expect them (``docs/*.md``, run by ``tests/docs/test_docs.py``); MkDocs needs its pages
in a folder below its configuration. Autodoc with napoleon reads the numpy-style docstrings as
they are. Built with warnings as errors by ``python3 tests/dev.py docs`` (CI runs it after lint).
"""

project = "zarr_anyio"
author = "zarr_anyio developers"
copyright = "zarr_anyio developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

myst_heading_anchors = 3
# The glossary is a definition list.
myst_enable_extensions = ["deflist"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
# The stores' docstrings mention zarr's and anyio's names in `backticks` as plain text.
default_role = None

html_theme = "furo"
html_title = "zarr_anyio"
