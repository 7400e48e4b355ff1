"""Counting database work in the benchmark's processes: SQL statements and
commits, written per process to ``$BENCH_STATS_DIR`` when it stops."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from celery.signals import worker_process_shutdown, worker_shutdown
from sqlalchemy import Engine, event

counts: Counter[str] = Counter()


def _statement(*_: Any, **__: Any) -> None:
    counts["statements"] += 1


def _commit(*_: Any) -> None:
    counts["commits"] += 1


def count_database_work() -> None:
    """Count every engine's statements and commits in this process."""
    if not event.contains(Engine, "before_cursor_execute", _statement):
        event.listen(Engine, "before_cursor_execute", _statement)
        event.listen(Engine, "commit", _commit)


def dump(**_: Any) -> None:
    folder = os.environ.get("BENCH_STATS_DIR")
    if folder:
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(counts))


def count_in_worker() -> None:
    """In a worker: count, and write the counts out as each process stops."""
    if os.environ.get("BENCH_STATS_DIR"):
        count_database_work()
        worker_process_shutdown.connect(dump, weak=False)
        worker_shutdown.connect(dump, weak=False)


def collected(folder: Path) -> Counter[str]:
    """The counts every process wrote to ``folder``, summed (and removed)."""
    total: Counter[str] = Counter()
    for path in folder.glob("*.json"):
        total.update(json.loads(path.read_text()))
        path.unlink()
    return total
