"""The relay against kombu publishing the same message:
``python -m bench.relay_message [--jobs 5000] [--rounds 3] [--stacks pg-rabbit,pg-redis]``.

On each stack, round by round, the relay publishes ``--jobs`` owed jobs
(``Relay.relay_once`` until nothing is owed, warm, marking each published,
as :func:`bench.limits.relay_rate` measures it), and kombu alone publishes
the same number of full Celery task messages: each built beforehand (not
timed) by Celery's own ``amqp.create_task_message`` for the task, arguments
and queue the relay's jobs have, then sent with its headers and properties
on one producer, with confirms on RabbitMQ (awaited together, as the relay
awaits a batch's). Prints the median rates and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection, Producer, Queue

from bench.limits import relay_rate
from bench.run import prepared
from proj.celery import make_celery
from proj.jobs.publisher import Confirms
from tests import stacks


def kombu_rate(celery_app: Celery, count: int) -> float:
    """Full task messages a second through kombu alone (see the module)."""
    queue = Queue(f"bench-kombu-{uuid.uuid4().hex[:8]}")
    messages = [
        celery_app.amqp.create_task_message(str(uuid.uuid4()), "bench.touch", [0, 0.0], {})
        for _ in range(count)
    ]
    with Connection(celery_app.conf.broker_url) as connection:
        queue(connection.default_channel).declare()
        channel: Any = connection.channel()
        confirms = Confirms(channel) if connection.transport.driver_type == "amqp" else None
        producer = Producer(channel, serializer="json")
        started = time.perf_counter()
        for number, message in enumerate(messages):
            producer.publish(
                message.body,
                routing_key=queue.name,
                headers=message.headers,
                **message.properties,
            )
            if confirms is not None:
                confirms.sent(str(number))
        if confirms is not None and confirms.wait():
            raise RuntimeError("RabbitMQ refused messages of the kombu publish")
        seconds = time.perf_counter() - started
        channel.close()
        queue(connection.default_channel).delete()
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stacks", default="pg-rabbit,pg-redis")
    options = parser.parse_args()
    print(
        f"`python -m bench.relay_message --jobs {options.jobs} --rounds {options.rounds} "
        f"--stacks {options.stacks}`\n\n"
        "| stack | relay jobs/s | kombu, same message /s | relay ÷ kombu |\n|---|---|---|---|"
    )
    for stack in options.stacks.split(","):
        with tempfile.TemporaryDirectory() as name, stacks.stack(stack, Path(name)) as made:
            settings, env, engine = prepared(made)
            celery_app = make_celery(settings)
            relay, kombu = [], []
            for _ in range(options.rounds):
                relay.append(relay_rate(env, options.jobs))
                kombu.append(kombu_rate(celery_app, options.jobs))
            engine.dispose()
        ours, theirs = statistics.median(relay), statistics.median(kombu)
        print(f"| {stack} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
