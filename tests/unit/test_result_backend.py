"""Celery's database result backend gets the driver proj ships, as the
ledger's URL does (``db+postgresql://`` would otherwise load psycopg 3)."""

from __future__ import annotations

import pytest
from celery import Celery

from proj.jobs import Jobs


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("db+postgresql://u@db/app", "db+postgresql+psycopg2://u@db/app"),
        ("db+postgres://u@db/app", "db+postgresql+psycopg2://u@db/app"),
        ("redis://cache:6379/1", "redis://cache:6379/1"),
    ],
)
@pytest.mark.parametrize("where", ["setting", "variable"])
def test_a_database_result_backend_uses_the_driver_proj_ships(
    monkeypatch: pytest.MonkeyPatch, where: str, given: str, used: str
) -> None:
    """As Celery's docs write it, in its setting or in ``CELERY_RESULT_BACKEND``
    (which Celery reads first, without loading its settings)."""
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    celery_app = Celery("adopter", set_as_current=False)
    if where == "setting":
        celery_app.config_from_object({"result_backend": given})
    else:
        monkeypatch.setenv("CELERY_RESULT_BACKEND", given)
    Jobs(celery_app, database_url="sqlite://")
    assert celery_app.conf.result_backend == used
