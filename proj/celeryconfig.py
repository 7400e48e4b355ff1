"""Celery's settings for proj (lowercase, as Celery expects), loaded by
:func:`proj.celery.make_celery` with ``config_from_object("proj.celeryconfig")``.

Where the broker and the results live comes from the environment through
``proj.config``; what is here is the policy proj's guarantees rest on.
"""

from __future__ import annotations

from datetime import timedelta

from kombu import Exchange, Queue

from proj.config import load_settings
from proj.jobs import MAX_PRIORITY

_settings = load_settings()

# Only JSON crosses the queue: a pickled message could run anything.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# A message is acknowledged after its task ends, and goes back to the queue if
# the process running it dies, so a killed worker loses nothing.
task_acks_late = True
task_reject_on_worker_lost = True
# Prefetched messages are unacknowledged too (back to the queue if the worker
# dies), and the prefork pool gives a message only to an idle child. Celery's
# 4 a process keeps the children fed between one task's end and the next
# delivery: prefetching 1 cost short tasks ~13% of their throughput (bench/).
worker_prefetch_multiplier = 4
# Long tasks have a queue of their own. A plain `celery -A proj worker`
# consumes both; give the long one workers of its own started with
# `-Q long --prefetch-multiplier 1`, so a report never holds messages another
# worker could run (docker-compose.yml's worker-long).
# Each queue has a routing key of its own: a queue declared without one would
# be bound with the default key and receive a copy of every default message.
# Priorities 0-9 are honoured: RabbitMQ queues are declared as priority
# queues (a higher number first; on Redis, proj.config sets ten priority
# lists, read from 0 up), and the relay publishes in the same order. A queue
# declared before without priorities must be drained and deleted first
# (RabbitMQ refuses to declare it again with other arguments): see
# docs/howto/upgrading.rst.
task_queue_max_priority = MAX_PRIORITY
task_default_queue = "celery"
task_queues = [Queue(name, Exchange("celery"), routing_key=name) for name in ("celery", "long")]
task_routes = {
    "proj.tasks.generate_report": {"queue": "long"},
    "proj.tasks.send_digest": {"queue": "long"},
}

# A killed child's result is not coming: give up waiting for it sooner than
# Celery's 10 s (the ledger makes a late result harmless either way).
worker_lost_wait = 2

# Results are stored only for tasks that ask (`@app.task(ignore_result=False)`):
# a result nobody reads costs a database write a task, and a STARTED write
# before each run on top (`task_track_started`). A job enqueued with
# delay_on_commit keeps its state and result in its ledger row either way.
# Stored results leave the arguments out (`result_extended` off).
task_ignore_result = True
task_track_started = False
result_extended = False
broker_connection_retry_on_startup = True
broker_connection_timeout = 4
timezone = "UTC"
enable_utc = True

# proj.jobs makes its own consumer (undecodable messages become failed jobs)
# and beat scheduler (one run per schedule slot, even from two beats) the
# app's, and adds its reconciler to the schedule.
beat_schedule = {
    "cleanup-expired": {
        "task": "proj.tasks.cleanup_expired",
        "schedule": timedelta(seconds=_settings.cleanup_interval),
    },
    "send-digest": {
        "task": "proj.tasks.send_digest",
        "schedule": timedelta(seconds=_settings.digest_interval),
    },
}
beat_schedule_filename = str(_settings.data_dir / "celerybeat-schedule")
