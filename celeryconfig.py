"""Celery's settings for proj (lowercase, as Celery expects).

Where the broker and the results live comes from the environment through
``proj.config``; what is here is the policy proj's guarantees rest on.
"""

from __future__ import annotations

from datetime import timedelta

from proj.config import load_settings

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
# One message at a time a process: a long task does not hold others hostage.
worker_prefetch_multiplier = 1

# A killed child's result is not coming: give up waiting for it sooner than
# Celery's 10 s (the ledger makes a late result harmless either way).
worker_lost_wait = 2

task_track_started = True
result_extended = True
broker_connection_retry_on_startup = True
broker_connection_timeout = 4
timezone = "UTC"
enable_utc = True

# Record messages that cannot be decoded instead of dropping them.
worker_consumer = "proj.deadletter:RecordingConsumer"

# Each periodic run is sent once per schedule slot, even by two beats at once.
beat_scheduler = "proj.beat:LedgerScheduler"
beat_schedule = {
    "reconcile-jobs": {
        "task": "proj.reconcile_jobs",
        "schedule": timedelta(seconds=_settings.reconcile_interval),
    },
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
