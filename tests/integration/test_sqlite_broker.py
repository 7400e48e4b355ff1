"""The embedded broker (kombu's SQLAlchemy transport on a SQLite file): a poll
that finds nothing only reads, so it never waits for, nor holds, the write
lock the application's own writes need."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection

TRANSPORT = "proj.jobs.sqlite_broker:SQLiteTransport"


def test_an_empty_poll_reads_without_the_write_lock(tmp_path: Path) -> None:
    """While another process holds SQLite's write lock, a poll of an empty
    queue answers at once (kombu's own poll would wait for the lock, up to
    its 30 s timeout); a message put once the lock is free is taken once."""
    path = tmp_path / "broker.sqlite3"
    with Connection(f"sqlite:///{path}", transport=TRANSPORT) as connection:
        channel = connection.default_channel
        channel.queue_declare("jobs")
        with pytest.raises(Empty):
            channel._get("jobs")  # makes the queue's row
        writer = sqlite3.connect(path, isolation_level=None, timeout=0)
        writer.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(Empty):
                channel._get("jobs")
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        channel._put("jobs", {"body": "hello"})
        assert channel._get("jobs") == {"body": "hello"}
        with pytest.raises(Empty):
            channel._get("jobs")
