"""Fixtures for the end-to-end tier: the real ``celery``, ``flask`` and ``proj``
commands as subprocesses, each stopped when its test ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from subprocesses import Commands


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[Commands]:
    """Start commands in a test; all are stopped when it ends."""
    running = Commands(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()
