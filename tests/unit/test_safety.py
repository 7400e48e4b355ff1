"""Configurations proj refuses: pickle, and time limits or plain countdowns past
what the broker lets a message wait unacknowledged (Redis's visibility timeout,
RabbitMQ's consumer timeout)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery

from proj.celery import make_celery
from proj.config import load_settings
from proj.jobs import ConfigurationError
from proj.jobs.checks import check_configuration, check_countdown


def app_for(
    tmp_path: Path,
    broker: str,
    timeout: str = "7200",
    consumer_timeout: str = "1800",
    time_limit: str = "0",
) -> Celery:
    env = {
        "PROJ_DATA_DIR": str(tmp_path),
        "CELERY_BROKER_URL": broker,
        "PROJ_VISIBILITY_TIMEOUT": timeout,
        "PROJ_RABBITMQ_CONSUMER_TIMEOUT": consumer_timeout,
        "PROJ_TASK_TIME_LIMIT": time_limit,
    }
    return make_celery(load_settings(env))


def test_retry_backoffs_longer_than_the_redis_timeout_start(tmp_path: Path) -> None:
    """A ledger job's retry waits as its row, whatever its length: the
    reference application's 600 s backoffs start under a 60 s visibility
    timeout; a plain task's retry that long is refused where it is made."""
    celery_app = app_for(tmp_path, "redis://127.0.0.1:6379/0", timeout="60")
    check_configuration(celery_app)
    with pytest.raises(ConfigurationError, match="apply_async_on_commit"):
        check_countdown(celery_app, {"countdown": 600})


def test_redis_timeout_longer_than_every_countdown_is_accepted(tmp_path: Path) -> None:
    check_configuration(app_for(tmp_path, "redis://127.0.0.1:6379/0", timeout="7200"))


def test_pickle_is_refused(tmp_path: Path) -> None:
    celery_app = app_for(tmp_path, "amqp://guest@127.0.0.1//")
    celery_app.conf.accept_content = ["json", "pickle"]
    with pytest.raises(ConfigurationError, match="JSON only"):
        check_configuration(celery_app)


def test_countdown_and_eta_past_the_visibility_timeout_are_refused(tmp_path: Path) -> None:
    celery_app = app_for(tmp_path, "redis://127.0.0.1:6379/0", timeout="100")
    check_countdown(celery_app, {"countdown": 99})
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        check_countdown(celery_app, {"countdown": 100})
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        check_countdown(celery_app, {"eta": datetime.now(UTC) + timedelta(seconds=500)})


def test_rabbitmq_consumer_timeout_bounds_countdowns_and_time_limits(tmp_path: Path) -> None:
    """RabbitMQ closes a channel holding a message unacknowledged past its
    consumer timeout: hard time limits, and plain tasks' countdowns, must
    stay under it (``PROJ_RABBITMQ_CONSUMER_TIMEOUT``, RabbitMQ's 30 minutes
    by default; 0 turns the check off)."""
    check_configuration(app_for(tmp_path, "amqp://guest@127.0.0.1//"))
    short = app_for(tmp_path, "amqp://guest@127.0.0.1//", consumer_timeout="60")
    short.conf.task_time_limit = 60
    with pytest.raises(ConfigurationError, match="consumer_timeout"):
        check_configuration(short)
    with pytest.raises(ConfigurationError, match="consumer_timeout"):
        check_countdown(short, {"countdown": 60})
    check_countdown(short, {"countdown": 59})
    generous = app_for(tmp_path, "amqp://guest@127.0.0.1//", consumer_timeout="3600")
    generous.conf.task_time_limit = 3600
    with pytest.raises(ConfigurationError, match="hard time limit"):
        check_configuration(generous)


def test_other_brokers_take_any_countdown(tmp_path: Path) -> None:
    celery_app = app_for(tmp_path, "amqp://guest@127.0.0.1//", consumer_timeout="0")
    check_countdown(celery_app, {"countdown": 10**6})
    embedded = app_for(tmp_path, "sqla+sqlite:///" + str(tmp_path / "broker.sqlite3"))
    check_countdown(embedded, {"countdown": 10**6})
