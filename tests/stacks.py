"""Throwaway stacks for tests and benchmarks, on real servers.

A stack is where proj's database, broker and results live:

- ``pg-rabbit``: a new PostgreSQL database and a new RabbitMQ vhost;
- ``pg-redis``: a new PostgreSQL database and a Redis database of its own;
- ``sqlite``: the embedded setup in the data folder given.

Everything made is removed when the block ends, so runs never see each
other's data. RabbitMQ vhosts are made with ``rabbitmqctl`` (run as a user
that may).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import redis

POSTGRES = ("127.0.0.1", 5432, "postgres")
RABBITMQ = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
STACKS = ("pg-rabbit", "pg-redis", "sqlite")
NEEDS = {
    "pg-rabbit": {"PostgreSQL": POSTGRES[:2], "RabbitMQ": RABBITMQ},
    "pg-redis": {"PostgreSQL": POSTGRES[:2], "Redis": REDIS},
    "sqlite": {},
    "postgres": {"PostgreSQL": POSTGRES[:2]},
}


def missing_services(name: str) -> str | None:
    """What stack ``name`` needs that does not answer, or None."""
    down = [
        f"{what} at {host}:{port}"
        for what, (host, port) in NEEDS[name].items()
        if not _reachable(str(host), int(port))
    ]
    return ", ".join(down) + " not reachable" if down else None


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@contextmanager
def stack(name: str, data_dir: Path) -> Iterator[dict[str, str]]:
    """The environment of a new stack ``name`` (removed when the block ends)."""
    env = {"PROJ_DATA_DIR": str(data_dir), "SECRET_KEY": secrets.token_urlsafe(32)}
    with ExitStack() as made:
        if name != "sqlite":
            database_url = made.enter_context(postgres_database())
            broker = rabbitmq_vhost() if name == "pg-rabbit" else redis_database()
            env.update(
                DATABASE_URL=database_url,
                CELERY_BROKER_URL=made.enter_context(broker),
                CELERY_RESULT_BACKEND=f"db+{database_url}",
            )
        yield env


@contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards:
    ``postgresql://``, naming no driver, as platforms hand URLs out."""
    host, port, user = POSTGRES
    name = f"proj_scratch_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=host, port=port, user=user, dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://{user}@{host}:{port}/{name}"
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@contextmanager
def role_database() -> Iterator[tuple[str, str]]:
    """The URLs of a new database as its two roles, as a deployment has them:
    an owner, who runs the migrations and owns the tables, and the
    application's role, which may read and write their rows and is neither
    owner, superuser nor BYPASSRLS (row-level security applies to it). The
    database and the roles are dropped afterwards."""
    host, port, superuser = POSTGRES
    suffix = uuid.uuid4().hex[:10]
    owner, app, name = f"proj_owner_{suffix}", f"proj_app_{suffix}", f"proj_scratch_{suffix}"
    admin = psycopg2.connect(host=host, port=port, user=superuser, dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            for role in (owner, app):
                cursor.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB')
            cursor.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        inside = psycopg2.connect(host=host, port=port, user=superuser, dbname=name)
        inside.autocommit = True
        with inside, inside.cursor() as cursor:
            cursor.execute(f'GRANT USAGE ON SCHEMA public TO "{app}"')
            rights = {"TABLES": "SELECT, INSERT, UPDATE, DELETE", "SEQUENCES": "USAGE, SELECT"}
            for kind, granted in rights.items():
                cursor.execute(
                    f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" '
                    f'GRANT {granted} ON {kind} TO "{app}"'
                )
        inside.close()
        try:
            yield (
                f"postgresql://{app}@{host}:{port}/{name}",
                f"postgresql://{owner}@{host}:{port}/{name}",
            )
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                for role in (app, owner):
                    cursor.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        admin.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """The broker URL of a new RabbitMQ vhost, deleted afterwards."""
    vhost = f"proj-scratch-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@contextmanager
def redis_database() -> Iterator[str]:
    """The broker URL of a Redis database (1-15) no other run holds, flushed
    before and after. A run that was killed leaves its claim to be taken over."""
    admin = redis.Redis(*REDIS)
    for number in range(1, 16):
        claim = f"proj-test:redis-db:{number}"
        holder = admin.get(claim)
        if holder is not None and not _alive(int(holder)):
            admin.delete(claim)
        if admin.set(claim, os.getpid(), nx=True, ex=6 * 3600):
            break
    else:
        raise RuntimeError("every Redis database from 1 to 15 is held by another run")
    client = redis.Redis(*REDIS, db=number)
    client.flushdb()
    try:
        yield f"redis://{REDIS[0]}:{REDIS[1]}/{number}"
    finally:
        client.flushdb()
        admin.delete(claim)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def queue_depth(celery_app: Any, queue: str = "celery") -> int:
    """Messages ready in ``queue`` on ``celery_app``'s broker (0 if the
    broker has no such queue, as Redis has none once its list is empty)."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except connection.channel_errors:
            return 0
