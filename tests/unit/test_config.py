"""Settings: one place, read from the environment, embedded by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from proj.celery import make_celery
from proj.config import load_settings
from proj.jobs import ConfigurationError


def test_defaults_are_embedded_under_the_data_folder(tmp_path: Path) -> None:
    settings = load_settings({"PROJ_DATA_DIR": str(tmp_path)})
    assert settings.embedded
    assert settings.database_url == f"sqlite:///{tmp_path}/proj.sqlite3"
    assert settings.result_backend == f"db+sqlite:///{tmp_path}/results.sqlite3"
    assert settings.mail_url == f"file://{tmp_path}/mail"
    conf = settings.celery_connection()
    assert conf["broker_url"] == f"sqlite:///{tmp_path}/broker.sqlite3"
    assert conf["broker_transport"] == "proj.jobs.sqlite_broker:SQLiteTransport"
    assert conf["broker_transport_options"]["polling_interval"] < 0.1


def test_servers_come_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "PROJ_DATA_DIR": str(tmp_path),
            "DATABASE_URL": "postgresql+psycopg2://u@db/app",
            "CELERY_BROKER_URL": "redis://cache:6379/0",
            "PROJ_VISIBILITY_TIMEOUT": "900",
            "PROJ_WORKER_POOL_SIZE": "3",
        }
    )
    assert not settings.embedded
    assert settings.result_backend == "db+postgresql+psycopg2://u@db/app"
    assert settings.jobs.worker_pool_size == 3
    conf = settings.celery_connection()
    assert conf["broker_url"] == "redis://cache:6379/0"
    assert "broker_transport" not in conf
    assert conf["broker_transport_options"] == {
        "visibility_timeout": 900.0,
        "priority_steps": list(range(10)),
    }


def test_every_task_has_a_hard_time_limit_unless_turned_off(tmp_path: Path) -> None:
    """``PROJ_TASK_TIME_LIMIT`` (900 s by default; 0: none) is the app's
    ``task_time_limit``, which a task's own ``time_limit`` overrides."""
    folder = {"PROJ_DATA_DIR": str(tmp_path)}
    assert load_settings(folder).celery_connection()["task_time_limit"] == 900
    off = load_settings({**folder, "PROJ_TASK_TIME_LIMIT": "0"})
    assert off.celery_connection()["task_time_limit"] is None
    celery_app = make_celery(load_settings({**folder, "PROJ_TASK_TIME_LIMIT": "120"}))
    assert celery_app.conf.task_time_limit == 120


def test_plain_delay_does_not_wait_for_rabbitmqs_confirm(tmp_path: Path) -> None:
    """Celery's own default: a plain ``delay()`` waits for no confirm (the
    ledger's paths confirm their batches themselves)."""
    settings = load_settings(
        {"PROJ_DATA_DIR": str(tmp_path), "CELERY_BROKER_URL": "amqp://guest@rabbit//"}
    )
    assert "broker_transport_options" not in settings.celery_connection()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PROJ_WEB_POOL_SIZE", "many", "PROJ_WEB_POOL_SIZE='many': expected a whole number"),
        ("PROJ_PAYMENT_LATENCY", "-1", "PROJ_PAYMENT_LATENCY='-1': expected a number, 0 or more"),
        ("PROJ_TRUSTED_PROXIES", "all", "PROJ_TRUSTED_PROXIES='all': expected a whole number"),
        (
            "PROJ_RATELIMIT_STORAGE_URI",
            "memcached://:secret@cache:11211",
            "^PROJ_RATELIMIT_STORAGE_URI: cannot count sign-in attempts in a 'memcached' store"
            "[^@]*$",
        ),
    ],
)
def test_a_bad_value_names_its_variable(tmp_path: Path, name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        load_settings({"PROJ_DATA_DIR": str(tmp_path), name: value})


@pytest.mark.parametrize(
    ("environ", "counted_in"),
    [
        ({}, "memory://"),
        ({"DATABASE_URL": "postgresql://u@db/app", "CELERY_BROKER_URL": "amqp://mq//"}, "database"),
        (
            {"DATABASE_URL": "postgresql://u@db/app", "CELERY_BROKER_URL": "redis://cache:6379/2"},
            "redis://cache:6379/2",
        ),
        (
            {"CELERY_BROKER_URL": "rediss://cache:6380/0", "PROJ_RATELIMIT_STORAGE_URI": "auto"},
            "rediss://cache:6380/0",
        ),
        (
            {"DATABASE_URL": "postgresql://u@db/app", "PROJ_RATELIMIT_STORAGE_URI": "memory://"},
            "memory://",
        ),
        ({"PROJ_RATELIMIT_STORAGE_URI": "database"}, "database"),
    ],
)
def test_sign_in_attempts_are_counted_where_every_web_process_sees_them(
    tmp_path: Path, environ: dict[str, str], counted_in: str
) -> None:
    """By default: the broker's Redis, else the database, but each process's
    memory on the embedded setup (one web process). A value set is kept."""
    settings = load_settings({"PROJ_DATA_DIR": str(tmp_path), **environ})
    assert settings.ratelimit_storage_uri == counted_in
    assert settings.trusted_proxies == 0
