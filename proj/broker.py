"""The embedded broker: kombu's SQLAlchemy transport, tuned for a SQLite file.

kombu passes every transport option to ``create_engine``, so its polling
interval (1 s by default, far too slow for a first look) cannot be set from
Celery's settings; this subclass takes ``polling_interval`` from the options and
builds the engine itself: write-ahead logging so web, worker and beat can share
the file, a generous lock timeout, and one engine a process, so a forked worker
child never polls through its parent's connection.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.transport.sqlalchemy.models import metadata
from sqlalchemy import create_engine, orm

from proj.db import make_sqlite_folder, prepare_engine

_engines: dict[tuple[str, int], tuple[Any, Any]] = {}
_lock = threading.Lock()


class SQLiteChannel(kombu_sqlalchemy.Channel):
    """A channel whose engine is made by proj, per process."""

    def _open(self) -> tuple[Any, Any]:
        client: Any = self.connection.client
        key = (str(client.hostname), os.getpid())
        with _lock:
            if key not in _engines:
                make_sqlite_folder(key[0])
                engine = create_engine(key[0], connect_args={"timeout": 30})
                prepare_engine(engine, role="broker")
                metadata.create_all(engine)
                _engines[key] = engine, orm.sessionmaker(bind=engine)
            return _engines[key]


class SQLiteTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport with :class:`SQLiteChannel`."""

    Channel = SQLiteChannel
    polling_interval = 0.02
