"""Sphinx configuration of proj's documentation site.

Build it with ``python -m sphinx docs docs/_build/html`` (the tests build it
with ``-W --keep-going``: any warning is an error, an unresolved
cross-reference included).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

project = "proj"
author = "proj's authors"
copyright = "proj's authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx_click",
    # Every local extension in _ext/ (the settings table, and whatever lands there).
    *sorted(path.stem for path in (HERE / "_ext").glob("*.py") if not path.stem.startswith("_")),
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "furo"
html_title = "proj"
html_static_path: list[str] = []

# Every cross-reference must resolve (proj_references follows each module's
# imports; another project's objects are shown unlinked, as the build runs
# offline, without intersphinx).
nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
# Our docstrings only: a base class's (SQLAlchemy's, Celery's) is written for its own site.
autodoc_inherit_docstrings = False
