"""The documentation site builds with every warning an error (an unresolved
cross-reference included), and README's example is the tutorial's code,
which ``tests/integration/test_tutorial.py`` runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from doc_examples import DOCS, ROOT, tutorial_shop


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    command = ["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")]
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-20_000:]
    assert (tmp_path / "html" / "index.html").exists()


def test_readme_example_is_the_tutorials_code() -> None:
    """Every line of README's Python example is a line of the tutorial's
    ``shop.py``, so it runs as README shows it."""
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    assert examples, "README shows a Python example"
    shop = {line.strip() for line in tutorial_shop().splitlines()}
    for example in examples:
        for line in example.splitlines():
            if line.strip() and line.strip() != "...":
                assert line.strip() in shop, f"README's {line.strip()!r} is not in the tutorial"


def test_readme_links_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python -m sphinx docs docs/_build/html" in readme
    assert len(readme.splitlines()) < 120, "README stays a quickstart: the rest is in docs/"
