"""The code passes its linters and mypy strict, as STYLE.md asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "proj", "tests", "bench", "docs", "celeryconfig.py"],
        ["ruff", "format", "--check", "proj", "tests", "bench", "docs", "celeryconfig.py"],
        ["mypy", "proj", "celeryconfig.py"],
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_checker_passes(command: list[str]) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
