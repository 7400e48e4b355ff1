"""The embedded broker: kombu's SQLAlchemy transport, tuned for a SQLite file.

kombu passes every transport option to ``create_engine``, so its polling
interval (1 s by default, far too slow for a first look) cannot be set from
Celery's settings; this subclass takes ``polling_interval`` from the options and
builds the engine itself: write-ahead logging so web, worker and beat can share
the file, a generous lock timeout, and one engine a process, so a forked worker
child never polls through its parent's connection. Web, worker and beat start
together and each makes kombu's tables and queue rows if missing; one doing so
first is no error for the others.
"""

from __future__ import annotations

import os
import threading
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.transport.sqlalchemy.models import metadata
from sqlalchemy import Engine, create_engine, orm
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

from proj.jobs.engine import make_sqlite_folder, prepare_engine

_engines: dict[tuple[str, int], tuple[Any, Any]] = {}
_lock = threading.Lock()


class SQLiteChannel(kombu_sqlalchemy.Channel):
    """A channel whose engine is made by proj, per process, and whose session
    one thread uses at a time.

    kombu's channel has a single session, but a prefork worker on this
    transport uses it from two threads: its loop polls for messages while the
    pool's result thread requeues the message of a child that died. Used at
    once, the session breaks and the worker stops; so each use takes a lock.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._session_lock = threading.RLock()
        self._queue_ids: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """The queue's next message. Most polls find none: they only read,
        where kombu's own takes SQLite's write lock every poll, which holds up
        every other writer (the application's claims and commits)."""
        with self._session_lock:
            if queue not in self._queue_ids:
                self._queue_ids[queue] = self._get_or_create(queue).id
            table = self.message_cls.__tablename__
            # A connection of the pool's, back in it at once: one held would
            # keep a fork of the worker waiting (proj.jobs.sqlite_forks).
            with self._open()[0].connect() as reader:
                waiting = reader.exec_driver_sql(
                    f"SELECT 1 FROM {table} WHERE queue_id = ? AND visible = 1 LIMIT 1",  # noqa: S608 (kombu's table name)
                    (self._queue_ids[queue],),
                ).first()
            if waiting is None:
                raise Empty()
            return super()._get(queue)

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        with self._session_lock:
            super()._put(queue, payload, **kwargs)

    def _purge(self, queue: str) -> int:
        with self._session_lock:
            return int(super()._purge(queue))

    def _size(self, queue: str) -> int:
        with self._session_lock:
            return int(super()._size(queue))

    def _open(self) -> tuple[Any, Any]:
        client: Any = self.connection.client
        key = (str(client.hostname), os.getpid())
        with _lock:
            if key not in _engines:
                make_sqlite_folder(key[0])
                engine = create_engine(key[0], connect_args={"timeout": 30})
                prepare_engine(engine, role="broker")
                _create_tables(engine)
                _engines[key] = engine, orm.sessionmaker(bind=engine)
            return _engines[key]

    def _get_or_create(self, queue: str) -> Any:
        """The queue's row, made if missing; another process making it at the
        same moment is not an error."""
        with self._session_lock:
            try:
                return super()._get_or_create(queue)  # type: ignore[misc]
            except IntegrityError:
                self.session.rollback()
                query = self.session.query(self.queue_cls)
                return query.filter(self.queue_cls.name == queue).one()


def _create_tables(engine: Engine) -> None:
    # One CREATE ... IF NOT EXISTS a table: processes starting together (web,
    # worker, beat) all make the tables, and none fails because another did.
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                connection.execute(CreateIndex(index, if_not_exists=True))


class SQLiteTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport with :class:`SQLiteChannel`."""

    Channel = SQLiteChannel
    polling_interval = 0.005
