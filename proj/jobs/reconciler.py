"""The reconciler: proj's own periodic work on the job ledger (a beat entry
``Jobs`` adds, every ``PROJ_RECONCILE_INTERVAL`` seconds): send again what the
broker lost, take back what a dead worker held."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, Select, func, literal, select
from sqlalchemy.orm import Session

from proj.jobs import context, heartbeat, ledger
from proj.jobs.clock import utcnow
from proj.jobs.models import CLAIMABLE, Job, State
from proj.jobs.registry import jobs_of

logger = logging.getLogger(__name__)


def empty_queues(celery_app: Celery, queues: Iterable[str]) -> set[str]:
    """Those of ``queues`` that hold no message ready for delivery (a queue
    the broker does not have, as Redis has none once its list is empty, is
    empty), asked on one connection (none if no queue is named)."""
    names, empty = sorted(set(queues)), set[str]()
    if not names:
        return empty
    with celery_app.connection_for_read() as connection:
        channel: Any = connection.channel()
        try:
            for queue in names:
                try:
                    declared = channel.queue_declare(queue=queue, passive=True)
                except connection.channel_errors:
                    empty.add(queue)
                    if not getattr(channel, "is_open", True):  # RabbitMQ closed it
                        channel = connection.channel()
                    continue
                if int(declared.message_count) == 0:
                    empty.add(queue)
        finally:
            channel.close()
    return empty


def queue_of(celery_app: Celery, name: str, options: dict[str, Any] | None) -> str:
    """The queue a job's messages go to: its own ``queue`` option, else where
    the app's routes send its task."""
    queue = (options or {}).get("queue")
    if queue:
        return str(queue)
    return str(celery_app.amqp.router.route({}, name)["queue"].name)


def active_jobs(celery_app: Celery) -> set[str] | None:
    """The ids of the tasks the live workers say they are running; None when
    the broker cannot broadcast (the embedded SQLite one), so nobody could say."""
    with celery_app.connection_for_read() as connection:
        if "fanout" not in connection.transport.implements.exchange_type:
            return None
    replies = celery_app.control.inspect(timeout=1.0).active() or {}
    return {str(task["id"]) for tasks in replies.values() for task in tasks or ()}


def abandoned(job_id: str, worker: str | None, active: set[str] | None) -> bool:
    """True when the job's run is known to be over: no live worker reports it
    running (it died, or the database was away when it tried to record how it
    ended) or, where nothing can be asked, its process on this machine has
    ended. A run on another machine that cannot be asked is presumed going on."""
    if active is not None:
        return job_id not in active
    node, _, pid = (worker or "").rpartition(":")
    if node.partition("@")[2] != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def gone_with_their_worker(
    session: Session, celery_app: Celery, running: Sequence[Any], cutoff: datetime
) -> list[str]:
    """The ids of these running jobs (``id, worker, started_at``) whose run is
    over. A worker that beats (:mod:`proj.jobs.heartbeat`) and whose last
    heartbeat is older than ``cutoff`` is gone, with all its jobs, and so is a
    job claimed before its worker's current incarnation began: no broker is
    asked for those. For the others, :func:`abandoned` decides (a live worker
    may have claimed a job whose answer it never heard)."""
    known = heartbeat.beats(session, {node_of(worker) for _, worker, _ in running})
    gone, unsure = [], []
    for job_id, worker, started_at in running:
        beat = known.get(node_of(worker))
        if beat is not None and (beat.beat_at < cutoff or started_at < beat.started_at):
            gone.append(job_id)
        else:
            unsure.append((job_id, worker))
    active = active_jobs(celery_app) if unsure else None
    return gone + [job_id for job_id, worker in unsure if abandoned(job_id, worker, active)]


def node_of(worker: str | None) -> str:
    """The worker's node name (``celery@host``) in a job's ``worker`` (``node:pid``)."""
    return (worker or "").rpartition(":")[0]


def reconcile(session: Session, celery_app: Celery, stale_after: float) -> dict[str, int]:
    """Hand the relay jobs that were lost, in ``session``'s transaction:
    :func:`resend_lost` and :func:`take_back_abandoned`, with the jobs of
    ``stale_after`` seconds ago."""
    context.scope_system(session.connection())  # every tenant's jobs
    cutoff = utcnow() - timedelta(seconds=stale_after)
    resent = resend_lost(session, celery_app, cutoff)
    gone = take_back_abandoned(session, celery_app, cutoff)
    if resent or gone:
        logger.warning("reconcile: sending again %d lost and %d abandoned jobs", resent, gone)
    return {"resent": resent, "abandoned": gone}


def resend_lost(session: Session, celery_app: Celery, cutoff: datetime) -> int:
    """Owe the broker again the ``queued`` or ``retrying`` jobs published
    before ``cutoff``, due since then, not started since, whose queue is
    empty: the broker lost them (as Redis does when it restarts without
    persistence). How many there were. ``session`` must see every tenant's
    jobs (:func:`reconcile` puts it in the system scope).

    Only the queues that hold such a job are asked, and only the jobs of
    those found empty are read: a backlog waiting in its queue costs one
    index probe, however long it is."""
    lost = _lost_before(cutoff)
    named = session.scalars(_queues_holding(*lost)).all()
    unnamed = session.execute(  # rows written before proj kept the queue
        select(Job.id, Job.name, Job.options).where(Job.queue.is_(None), *lost)
    ).all()
    routed = {job_id: queue_of(celery_app, name, options) for job_id, name, options in unnamed}
    empty = empty_queues(celery_app, {*named, *routed.values()})
    resend = [job_id for job_id, queue in routed.items() if queue in empty]
    if empty.intersection(named):
        resend += session.scalars(select(Job.id).where(Job.queue.in_(empty), *lost)).all()
    if resend:
        ledger.resend(session, resend, published_before=cutoff)
    return len(resend)


def take_back_abandoned(session: Session, celery_app: Celery, cutoff: datetime) -> int:
    """Put the ``running`` jobs started before ``cutoff`` whose worker is gone
    (see :func:`gone_with_their_worker`) back to ``retrying``, or end them
    ``failed`` if that was their last attempt. How many there were
    (``session`` as :func:`resend_lost` takes it)."""
    running = session.execute(
        select(Job.id, Job.worker, Job.started_at).where(
            Job.state == State.RUNNING, Job.started_at < cutoff
        )
    ).all()
    gone = gone_with_their_worker(session, celery_app, running, cutoff) if running else []
    if gone:
        ledger.abandon(session, gone)
    return len(gone)


def _lost_before(cutoff: datetime) -> tuple[ColumnElement[bool], ...]:
    """SQL: a waiting job published before ``cutoff`` and due since. It was
    made before it was published, so ``created_at`` bounds the index walk to
    the jobs that have waited that long."""
    return (
        Job.state.in_(CLAIMABLE),
        Job.created_at < cutoff,
        Job.published_at < cutoff,
        Job.available_at < cutoff,
    )


def _queues_holding(*conditions: ColumnElement[bool]) -> Select[str]:
    """SQL: the queues named by a job matching ``conditions``. The distinct
    queues are found one index probe each (a skip scan of
    ``ix_jobs_queue_state_created_at``, led by ``queue``), then each is asked
    whether it holds a matching job, so no queue's backlog is read."""
    first = select(func.min(Job.queue).label("queue")).cte("named", recursive=True)
    later = select(func.min(Job.queue)).where(Job.queue > first.c.queue).scalar_subquery()
    named = first.union_all(select(later).where(first.c.queue.is_not(None)))
    # A scalar subquery with its LIMIT is a probe a queue: an EXISTS may be
    # planned as a semi join that reads every matching job.
    held = select(literal(1)).where(Job.queue == named.c.queue, *conditions).limit(1)
    return select(named.c.queue).where(
        named.c.queue.is_not(None), held.scalar_subquery().is_not(None)
    )


def reconcile_jobs(task: Any) -> dict[str, Any]:
    """Periodic (``proj.reconcile_jobs``, registered by ``Jobs``): :func:`reconcile`
    with the configured threshold, in the run's session."""
    jobs = jobs_of(task.app)
    return reconcile(task.session, task.app, jobs.settings.stale_after)
