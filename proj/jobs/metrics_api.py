"""``GET /metrics``: proj.jobs's metrics in Prometheus's text format, for
Prometheus to scrape. A blueprint to mount once ``jobs.init_app(flask_app,
db)`` has run::

    flask_app.register_blueprint(proj.jobs.metrics_api.blueprint, url_prefix="/metrics")

It needs an API token as the job API does: a viewer's is enough, made
without a tenant (it counts every tenant's jobs; a tenant's token is
refused). Prometheus sends it with ``authorization: credentials_file``.
It answers the counters and histograms of :mod:`proj.jobs.metrics` (every
process's, in multiprocess mode) and gauges read from the ledger at each
scrape:

==========================================  =====  ==================================
``proj_jobs``                               gauge  ``state``: queued, running, retrying
``proj_jobs_waiting``                       gauge  ``queue``: queued and retrying jobs
``proj_outbox_owed``                        gauge  jobs due whose message the broker lacks
``proj_outbox_oldest_owed_age_seconds``     gauge  since the earliest the relay owes fell due
``proj_ledger_up``                          gauge  0 when the ledger could not be read
==========================================  =====  ==================================

The ledger's queries are the console's (:mod:`proj.jobs.console.figures`):
jobs waiting or running through the ``(state, created_at)`` index, owed ones
through the relay's partial index. Finished jobs are not counted here: they
are most of the ledger (kept ``PROJ_RETENTION_DAYS``), and counting them
would read a whole index at every scrape; ``proj_jobs_finished_total`` has
their rate. Every configured or routed queue shows, at 0 when nothing waits
in it. When the ledger cannot be read, its other gauges are left out and the
counters are answered still.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from celery import Celery
from flask import Blueprint, Response, current_app, g
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from proj.jobs import context, metrics
from proj.jobs.auth import request_session, require_token
from proj.jobs.clock import utcnow
from proj.jobs.console.figures import relay_debt
from proj.jobs.console.filters import Queues, named_queue
from proj.jobs.extension import EXTENSION_KEY, Jobs
from proj.jobs.http import json_error
from proj.jobs.models import CLAIMABLE, Job, State

logger = logging.getLogger(__name__)

blueprint = Blueprint("metrics", __name__)
"""``GET /metrics``: mount it with ``flask_app.register_blueprint(blueprint)``."""
require_token(blueprint)

UNFINISHED = (State.QUEUED, State.RUNNING, State.RETRYING)
"""The states the ``proj_jobs`` gauge counts."""


@dataclass(frozen=True)
class LedgerFigures:
    """What the ledger holds at :attr:`at`, as the gauges report it."""

    at: datetime
    """When the ledger was read."""
    by_state: dict[str, int]
    """Unfinished state → jobs (every one of :data:`UNFINISHED`)."""
    waiting: dict[str, int]
    """Queue → jobs queued or retrying (every known queue)."""
    owed: int
    """Jobs due whose message the broker has not taken yet."""
    oldest_owed: datetime | None
    """When the earliest of those the relay should have sent fell due
    (:func:`~proj.jobs.console.figures.relay_debt`)."""

    @property
    def oldest_owed_age(self) -> float:
        """Seconds since the earliest owed job fell due (0: none is)."""
        if self.oldest_owed is None:
            return 0.0
        return max(0.0, (self.at - self.oldest_owed).total_seconds())


def ledger_figures(session: Session, celery_app: Celery) -> LedgerFigures:
    """The gauges' figures, read in ``session`` (three cheap queries' worth)."""
    at = utcnow()
    queues = Queues(celery_app)
    by_state: Counter[str] = Counter({str(state): 0 for state in UNFINISHED})
    waiting: Counter[str] = Counter({queue: 0 for queue in queues.names()})
    named = named_queue()
    rows = session.execute(
        select(Job.name, named, Job.state, func.count())
        .where(Job.state.in_(UNFINISHED))
        .group_by(Job.name, named, Job.state)
    )
    for name, queue, state, count in rows:
        by_state[str(state)] += int(count)
        if state in CLAIMABLE:
            waiting[queues.of(name, queue)] += int(count)
    owed, oldest = relay_debt(session, at)
    return LedgerFigures(at, dict(by_state), dict(sorted(waiting.items())), owed, oldest)


def gauges(figures: LedgerFigures | None) -> list[Metric]:
    """The ledger's gauges for ``figures`` (None: the ledger could not be read)."""
    up = GaugeMetricFamily("proj_ledger_up", "1 if this scrape could read the job ledger.")
    up.add_metric([], 0 if figures is None else 1)
    if figures is None:
        return [up]
    jobs = GaugeMetricFamily("proj_jobs", "Jobs waiting or running, by state.", labels=["state"])
    for state, count in figures.by_state.items():
        jobs.add_metric([state], count)
    waiting = GaugeMetricFamily(
        "proj_jobs_waiting", "Jobs queued or retrying, by queue.", labels=["queue"]
    )
    for queue, count in figures.waiting.items():
        waiting.add_metric([queue], count)
    owed = GaugeMetricFamily(
        "proj_outbox_owed", "Jobs waiting whose message the broker has not taken yet."
    )
    owed.add_metric([], figures.owed)
    age = GaugeMetricFamily(
        "proj_outbox_oldest_owed_age_seconds",
        "Seconds since the oldest owed job was created (0: none owed).",
    )
    age.add_metric([], figures.oldest_owed_age)
    return [up, jobs, waiting, owed, age]


class Scrape:
    """One scrape's collector: the counted metrics, then the ledger's gauges."""

    def __init__(self, counted: Collector, ledger: list[Metric]) -> None:
        self.counted, self.ledger = counted, ledger

    def collect(self) -> Iterator[Metric]:
        yield from self.counted.collect()
        yield from self.ledger


@blueprint.get("")
def scrape() -> Response | tuple[Response, int]:
    """The metrics, in Prometheus's text format (0.0.4); 403 for a tenant's
    token (they count every tenant's jobs)."""
    if g.proj_token.tenant is not None:
        message = "metrics count every tenant's jobs: use a token made without a tenant"
        return json_error(403, "forbidden", message)
    jobs: Jobs = current_app.extensions[EXTENSION_KEY]
    session = request_session()
    figures: LedgerFigures | None
    try:
        context.scope_system(session.connection())  # every tenant's jobs
        figures = ledger_figures(session, jobs.celery_app)
    except SQLAlchemyError as exc:
        session.rollback()
        logger.warning("metrics: the job ledger could not be read (%s)", exc)
        figures = None
    body = generate_latest(Scrape(metrics.counted(), gauges(figures)))
    return Response(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)
