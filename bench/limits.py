"""The limits the variants are held against, measured in the same run: the
database (``pgbench`` running the task's transaction), the broker (kombu
alone, with no database) and proj's relay with its fast path off."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu import Connection, Consumer, Producer, Queue
from sqlalchemy import Engine, delete, insert, make_url

from proj.celery import make_celery
from proj.config import load_settings
from proj.jobs import Jobs
from proj.jobs.models import Job, State
from proj.jobs.publisher import Confirms
from proj.jobs.relay import make_relay

RELAY_WARMUP = 500
"""Jobs the relay publishes before it is timed."""
PGBENCH_SCRIPT = """\\set id random(1, 1000)
BEGIN;
SELECT id, touches, first_touched_at FROM bench_users WHERE id = :id;
UPDATE bench_users SET touches = touches + 1, touched_at = now() WHERE id = :id;
COMMIT;
"""


def pgbench_tps(database_url: str, folder: Path, seconds: int) -> float:
    """Transactions a second of the task's own transaction, run by ``pgbench``
    with 2 clients (no Celery, no Python): the database's limit here."""
    url = make_url(database_url)
    script = folder / "touch.sql"
    script.write_text(PGBENCH_SCRIPT)
    done = subprocess.run(
        [
            "pgbench",
            "-n",
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            str(seconds),
            "-f",
            str(script),
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or "postgres",
            url.database or "postgres",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if found is None:
        raise RuntimeError(f"pgbench printed no tps:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


def relay_rate(env: dict[str, str], count: int) -> float:
    """Jobs a second the relay publishes (``Relay.relay_once`` until nothing is
    owed), with the fast path off, once warm: a first batch, not timed, pays
    for the connections and the statements' compilation, as a relay's first
    batch after it starts does."""
    settings = load_settings({**env, "PROJ_OUTBOX_FAST_PATH": "0"})
    celery_app = make_celery(settings)
    engine = Jobs.of(celery_app).engine
    queue = f"bench-relay-{uuid.uuid4().hex[:8]}"
    outbox = make_relay(celery_app)
    owed = _owe(engine, RELAY_WARMUP, queue)
    while outbox.relay_once():
        pass
    owed += _owe(engine, count, queue)
    started = time.perf_counter()
    while outbox.relay_once():
        pass
    seconds = time.perf_counter() - started
    with engine.begin() as connection:
        connection.execute(delete(Job).where(Job.id.in_(owed)))
    with celery_app.connection_for_write() as connection:
        Queue(queue, channel=connection.default_channel).delete()
    outbox.engine.dispose()
    engine.dispose()
    return count / seconds


def _owe(engine: Engine, count: int, queue: str) -> list[str]:
    """Write ``count`` queued jobs for ``queue`` that the relay owes; their ids."""
    rows = [
        {
            "id": str(uuid.uuid4()),
            "name": "bench.touch",
            "args": [0, 0.0],
            "kwargs": {},
            "options": {"queue": queue},
            "state": State.QUEUED,
            "attempts": 0,
            "max_attempts": 1,
        }
        for _ in range(count)
    ]
    with engine.begin() as connection:
        connection.execute(insert(Job), rows)
    return [str(row["id"]) for row in rows]


@dataclass
class BrokerRates:
    """Messages a second through kombu alone."""

    publish: float
    """``Producer.publish`` in a loop, no confirms: the broker's limit."""
    consume: float
    confirmed: float | None
    """Publishing with RabbitMQ's confirms, all awaited together at the end
    (as the relay awaits a batch's); None on brokers without confirms."""


def raw_broker(broker_url: str, count: int) -> BrokerRates:
    """Publish ``count`` messages, consume them, and (on RabbitMQ) publish
    ``count`` more with confirms. Messages go through the default exchange,
    straight to the queue, as Celery sends a task to a direct queue (on Redis
    a named exchange would cost a lookup a message)."""
    queue = Queue(f"bench-raw-{uuid.uuid4().hex[:8]}")
    body = {"args": [1, time.time()], "kwargs": {}}
    with Connection(broker_url) as connection:
        queue(connection.default_channel).declare()
        producer = Producer(connection.default_channel, serializer="json")
        started = time.perf_counter()
        for _ in range(count):
            producer.publish(body, routing_key=queue.name)
        publish = count / (time.perf_counter() - started)
        received = 0

        def on_message(_: object, message: Any) -> None:
            nonlocal received
            received += 1
            message.ack()

        started = time.perf_counter()
        with Consumer(
            connection.default_channel, [queue], callbacks=[on_message], accept=["json"]
        ) as consumer:
            consumer.qos(prefetch_count=100)
            while received < count:
                connection.drain_events(timeout=10)
        consume = count / (time.perf_counter() - started)
        confirmed = None
        if connection.transport.driver_type == "amqp":
            confirmed = count / confirmed_publish_seconds(connection, queue.name, body, count)
        queue(connection.default_channel).delete()
    return BrokerRates(publish, consume, confirmed)


def confirmed_publish_seconds(
    connection: Connection, queue_name: str, body: object, count: int
) -> float:
    """Seconds to publish ``count`` messages on a channel in confirm mode and
    have RabbitMQ confirm them all (awaited together, as proj's relay does)."""
    channel: Any = connection.channel()
    try:
        confirms = Confirms(channel)
        producer = Producer(channel, serializer="json")
        started = time.perf_counter()
        for number in range(count):
            producer.publish(body, routing_key=queue_name)
            confirms.sent(str(number))
        refused = confirms.wait()
        seconds = time.perf_counter() - started
        if refused:
            raise RuntimeError(f"RabbitMQ refused {len(refused)} messages of the raw publish")
        return seconds
    finally:
        channel.close()
