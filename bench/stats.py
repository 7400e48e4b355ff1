"""Counting database work in the benchmark's processes: SQL statements and
round trips, written per process to ``$BENCH_STATS_DIR`` when it stops.

A round trip is a statement (several sent as one query count once), a
``BEGIN`` (psycopg2 sends it on its own before a transaction's first
statement; none on an autocommit connection), a ``COMMIT`` or a ``ROLLBACK``."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from celery.signals import worker_process_shutdown, worker_shutdown
from sqlalchemy import Connection, Engine, event

counts: Counter[str] = Counter()


def _statement(*_: Any, **__: Any) -> None:
    counts["statements"] += 1
    counts["round_trips"] += 1


def _transactional(connection: Connection) -> None:
    autocommit = connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    # proj.db.autocommit switches psycopg2's own autocommit instead.
    if not autocommit and not getattr(connection.connection.driver_connection, "autocommit", False):
        counts["round_trips"] += 1


def count_database_work() -> None:
    """Count every engine's statements and round trips in this process."""
    if not event.contains(Engine, "before_cursor_execute", _statement):
        event.listen(Engine, "before_cursor_execute", _statement)
        for name in ("begin", "commit", "rollback"):
            event.listen(Engine, name, _transactional)


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
