"""The worker's side of a job: one run in its unit of work, the ledger claim
before it, and the recording of how it ended.

A run gets a session of its own (the installation's ``session`` resolves to
it). When the run returns, the session commits before Celery reports success;
when it raises (retry, ignore and reject included) it rolls back; either way
it is removed, so the connection is back in the pool before the next message.

A job enqueued with ``delay_on_commit`` has a ledger row: its run first claims
the row (a delivery of a job that already ran, was cancelled or is running
elsewhere is acknowledged and skipped; one whose queue is paused, or whose
concurrency or rate key is at its limit, is handed back to the ledger, unrun), its
body runs in the context its row keeps (not its message's header), and the
move to ``succeeded`` commits with the task's own effects. A run whose job
was taken back meanwhile (the reconciler found its worker gone, and another
run claimed the job) cannot commit: its transaction rolls back, effects
included, and its message is acknowledged
(:class:`~proj.jobs.errors.ClaimTakenBack`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from traceback import format_exception
from typing import TYPE_CHECKING, Any, NoReturn

from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery.exceptions import Ignore, Reject, Retry
from celery.worker import state as worker_state
from celery.worker.request import Request

from proj.jobs import context, ledger, outbox, publisher, revoke, time_limits
from proj.jobs.clock import due_at, utcnow
from proj.jobs.errors import ClaimTakenBack, JobCancelled
from proj.jobs.models import State
from proj.jobs.publisher import CONCURRENCY_HEADER, RATE_HEADER, job_message
from proj.jobs.registry import jobs_of
from proj.jobs.retry import TRANSIENT_ERRORS, backoff, max_attempts_of, retry_policy_of
from proj.jobs.session import in_task_run, roll_back, task_scope

if TYPE_CHECKING:
    from proj.jobs.extension import Jobs
    from proj.jobs.task import SqlAlchemyTask

logger = logging.getLogger(__name__)

_runs = itertools.count()
SESSION_KEY = "proj_session_key"
"""Where a traced run leaves its session's key on the request, for ``after_return``."""
CLAIM_BACKOFF_CAP = 60.0
"""Most seconds a delivery waits before trying again to claim its job."""
CLAIM = "proj_claim"
"""Where a run that claimed its ledger row keeps the :class:`~proj.jobs.ledger.Claim`."""


def run(task: SqlAlchemyTask, body: Callable[[], Any]) -> Any:
    """Run ``body`` (the task's own code) as one unit of work; see the module."""
    jobs = jobs_of(task.app)
    request = task.request
    # A key of its own for every run, not the task id: a message delivered
    # twice runs twice at once, and each run must have its own session.
    key = f"{request.id}/{next(_runs)}"
    traced = not request.called_directly
    claims = traced and is_ledger_job(request) and not in_task_run()
    if traced:
        setattr(request, SESSION_KEY, key)  # for after_return
    session = jobs.session
    claim: ledger.Claim | None = None
    with task_scope(key), context.restored(carried_by(request)), _running(task), jobs.run_context():
        try:
            if claims:
                claim = _claim(task)
            # A claimed job runs in the context its row keeps (its tenant
            # included), whatever a forged or mangled header says.
            with (
                context.restored(claim.context) if claim is not None else nullcontext(),
                _limited(task, jobs, claim),
            ):
                retval = body()
                _complete(task, claim, retval)
            return retval
        except BaseException as exc:
            if session.registry.has():
                roll_back(session)
            if isinstance(exc, JobCancelled) and claim is not None:
                ledger.cancelled_while_running(jobs.engine, str(request.id), claim.attempts)
                revoke.announce(task.app, [str(request.id)])
                logger.info("%s[%s]: stopped, as asked; cancelled", task.name, request.id)
                raise Ignore() from exc
            if isinstance(exc, TimeLimitExceeded) and claim is not None:
                raise Ignore() from exc  # its attempt was ended at the limit
            if isinstance(exc, ClaimTakenBack):
                logger.warning("%s[%s]: %s", task.name, request.id, exc)
                raise Ignore() from exc
            if isinstance(exc, Reject) and not getattr(exc, "requeue", False):
                reason = getattr(exc, "reason", exc)
                record_failure(task, f"rejected: {reason!r}", None, str(request.id), (), {})
            raise
        finally:
            session.remove()
            if claim is not None and (concurrency_key := header_of(request, CONCURRENCY_HEADER)):
                # Its slot is free (unless it failed: on_failure records that
                # after, and the relay's next pass fills the slot).
                publisher.send_next_of(jobs, concurrency_key)


def _limited(task: SqlAlchemyTask, jobs: Jobs, claim: ledger.Claim | None) -> Any:
    """The run's hard time limit, enforced here on the threads pool
    (:mod:`proj.jobs.time_limits`; the prefork pool enforces its own): at the
    limit a ledger job's attempt ends, as :meth:`JobRequest.on_timeout` ends
    it on prefork, and the run is interrupted."""
    if not jobs.limits_left_to_us:
        return nullcontext()
    # Read here: the request is this thread's, and end_attempt runs in another.
    request, limit, worker = task.request, time_limits.hard_limit_of(task), _worker_name(task)

    def end_attempt() -> None:
        if claim is not None:
            error = f"hard time limit ({limit:g} s) exceeded"
            state = ledger.worker_lost(jobs.engine, str(request.id), error, worker, requeued=False)
            if state == State.RETRYING:
                publisher.send_owed(jobs, [str(request.id)])

    return time_limits.enforced(limit, name=f"{task.name}[{request.id}]", on_expiry=end_attempt)


def header_of(request: Any, name: str) -> str | None:
    """The job message's header ``name`` (a concurrency or a rate key: the
    lock its claim waits on)."""
    found = request.get(name) or (request.get("headers") or {}).get(name)
    return str(found) if found else None


def carried_by(request: Any) -> Mapping[str, Any] | None:
    """The context the job was enqueued in (its message's header)."""
    found = request.get(context.HEADER) or (request.get("headers") or {}).get(context.HEADER)
    return found if isinstance(found, Mapping) else None


@contextmanager
def _running(task: SqlAlchemyTask) -> Iterator[None]:
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key")
    token = context.running_job.set(
        context.RunningJob(str(request.id), task.name, request.retries + 1, queue)
    )
    try:
        yield
    finally:
        context.running_job.reset(token)


def is_ledger_job(request: Any) -> bool:
    """Whether the message being run is a ledger job's (its header says so;
    a run applied in-process carries the header under ``headers``)."""
    return bool(
        request.get(publisher.JOB_HEADER)
        or (request.get("headers") or {}).get(publisher.JOB_HEADER)
    )


def _worker_name(task: SqlAlchemyTask) -> str:
    """This process, as its claims name it (``node:pid``)."""
    return f"{jobs_of(task.app).node or task.request.hostname}:{os.getpid()}"


def _claim(task: SqlAlchemyTask) -> ledger.Claim:
    jobs, request = jobs_of(task.app), task.request
    worker = _worker_name(task)
    try:
        claim = ledger.claim(
            jobs.engine,
            str(request.id),
            worker,
            header_of(request, CONCURRENCY_HEADER),
            header_of(request, RATE_HEADER),
        )
    except Exception as exc:
        if exc not in TRANSIENT_ERRORS:
            raise
        # The job is still waiting (nothing was claimed): deliver it again
        # once the database answers.
        raise task.retry(
            exc=exc,
            countdown=backoff(request.retries, base=1.0, cap=CLAIM_BACKOFF_CAP, jitter=False),
            max_retries=None,
        ) from exc
    if claim.held is not None:
        logger.info(
            "%s[%s]: %s; the job is handed back to the ledger, unrun",
            task.name,
            request.id,
            claim.held,
        )
        raise Ignore()
    if not claim.claimed:
        logger.info(
            "%s[%s]: job is %s; skipping this delivery",
            task.name,
            request.id,
            claim.state or "unknown to the ledger",
        )
        raise Ignore()
    setattr(request, CLAIM, claim)
    return claim


def _complete(task: SqlAlchemyTask, claim: ledger.Claim | None, retval: Any) -> None:
    """The run's success: its ledger row (if claimed), the canvas steps it
    releases and its effects, in one commit. A transient error on the way
    (the database gone silent at the ledger's UPDATE as much as at the
    COMMIT) retries as the task's ``retry_on`` says."""
    jobs = jobs_of(task.app)
    session = jobs.session
    try:
        if claim is not None:
            job_id = str(task.request.id)
            ledger.succeed(session(), job_id, claim.attempts, retval)
            if claim.graph:  # a canvas step: release what comes after it
                for released in ledger.release(session(), job_id, retval, claim.graph):
                    outbox.publish_on_commit(session(), jobs, [job_message(released)])
        if session.registry.has():
            session.commit()
    except Exception as exc:
        policy = retry_policy_of(task)
        if policy is not None and policy.matches(exc):
            policy.retry(task, exc)
        raise


def claim_of(task: SqlAlchemyTask) -> ledger.Claim | None:
    """The claim of the run in progress, if it is a ledger job's."""
    claim: ledger.Claim | None = task.request.get(CLAIM)
    return claim


def retry_job(
    task: SqlAlchemyTask, claim: ledger.Claim, exc: Exception | None, options: Mapping[str, Any]
) -> NoReturn:
    """A ledger job's retry: the row moves to ``retrying`` before the next
    attempt is published, and the ledger's attempts (which count lost workers
    too) decide when it is the last."""
    if claim.attempts >= claim.max_attempts:
        raise exc or Retry("retry")  # the last attempt failed: on_failure records it
    jobs = jobs_of(task.app)
    when = due_at(options) or utcnow()
    job_id = str(task.request.id)
    trace = "".join(format_exception(exc)) if exc is not None else None
    if not ledger.retrying(jobs.engine, job_id, claim.attempts, repr(exc), trace, when):
        logger.warning(
            "%s[%s]: not retried: the job was taken back and given to another run",
            task.name,
            job_id,
        )
        raise Ignore()
    publisher.send_owed(jobs, [job_id])
    raise Retry(exc=exc, when=when)


def record_failure(
    task: SqlAlchemyTask,
    error: str,
    traceback: str | None,
    task_id: str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> None:
    """End the job's row ``failed`` (made, for the tenant its message
    carries, if the job had none). Never raises."""
    # Celery may call on_failure outside the run (the request is then
    # empty): what it passes is what identifies the job.
    claim = claim_of(task)
    if claim is None and is_ledger_job(task.request):
        # This delivery failed before it claimed the job (the claim itself
        # failed): the job may be running elsewhere, or waiting, and is
        # not this delivery's to fail. The reconciler sends a waiting one again.
        logger.error(
            "%s[%s]: delivery failed before claiming the job (%s); the job is left as it is",
            task.name,
            task_id,
            error,
        )
        return
    try:
        ledger.record_failure(
            jobs_of(task.app).engine,
            job_id=task_id,
            name=task.name,
            error=error,
            traceback=traceback,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            attempts=claim.attempts if claim else (task.request.retries or 0) + 1,
            claimed=claim is not None,
            # A plain task's row is made now, for the tenant it ran for.
            tenant=(carried_by(task.request) or {}).get("tenant"),
        )
    except Exception:
        logger.exception("could not record the failure of %s[%s]", task.name, task_id)
    logger.warning("%s[%s] failed: %s", task.name, task_id, error)


class JobRequest(Request):
    """The worker's request for a proj task: when a prefork child dies running
    a ledger job, or passes its hard time limit, the row goes back to
    ``retrying`` or ends ``failed`` once its attempts are used up, so a job
    that kills its worker every time stops instead of looping."""

    @property
    def run_by(self) -> str | None:
        """The child running this request, named as its claim names it
        (``hostname:pid``); None if the worker never heard a child accept it."""
        return f"{self.hostname}:{self.worker_pid}" if self.worker_pid else None

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, WorkerLostError) and self._last_attempt_lost(exc):
            logger.error("%s[%s]: worker lost on its last attempt; failed", self.name, self.id)
            self.reject(requeue=False)
            return
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _last_attempt_lost(self, exc: WorkerLostError) -> bool:
        """Record that the worker running this attempt was lost; True if it was
        the last attempt (the job is failed, its message is to be dropped)."""
        jobs = jobs_of(self.task.app)
        error = f"the worker running it was lost: {exc!r}"
        # The child that died, named as its claim named it (unknown if the
        # worker never heard the child accept the task: then any run).
        worker = self.run_by
        if self.request_dict.get(publisher.JOB_HEADER):
            return ledger.worker_lost(jobs.engine, self.id, error, worker) == State.FAILED
        if not (self.task.acks_late and self.task.reject_on_worker_lost):
            return False  # Celery does not deliver it again
        limit = max_attempts_of(self.task, jobs.settings.max_attempts)
        attempt = ledger.plain_task_lost(jobs.engine, self.id, error, worker, limit)
        if attempt < limit:
            return False
        ledger.record_failure(
            jobs.engine,
            job_id=self.id,
            name=self.name,
            error=error,
            args=list(self.args or ()),
            kwargs=dict(self.kwargs or {}),
            attempts=attempt,
            tenant=(carried_by(self.request_dict) or {}).get("tenant"),
        )
        return True

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """A cold shutdown (or the end of a soft one) cuts this run off: its
        ledger job goes back to ``retrying`` (``failed`` on its last attempt),
        owed to the broker, so it runs again elsewhere without waiting for the
        reconciler (the broker's redelivery, if it comes too, is skipped)."""
        if self.time_start and self.request_dict.get(publisher.JOB_HEADER):
            worker = self.run_by
            engine = jobs_of(self.task.app).engine
            error = "cut off as the worker shut down"
            try:
                ledger.worker_lost(engine, self.id, error, worker, requeued=False)
            except Exception as exc:
                logger.warning("%s[%s]: not handed back (%s)", self.name, self.id, exc)
        super().cancel(pool, signal=signal, emit_retry=emit_retry)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """A ledger job past its hard time limit (its child is killed) ends the
        attempt at once: ``retrying`` and published again, or ``failed`` once
        its attempts are used up; its message is acknowledged."""
        if soft or not self.request_dict.get(publisher.JOB_HEADER) or worker_state.should_terminate:
            super().on_timeout(soft, timeout)
            return
        worker_state.task_ready(self)
        error = f"hard time limit ({timeout:g} s) exceeded"
        logger.error("%s[%s]: %s", self.name, self.id, error)
        jobs = jobs_of(self.task.app)
        worker = self.run_by
        state = ledger.worker_lost(jobs.engine, self.id, error, worker, requeued=False)
        if self.task.acks_late:
            self.acknowledge()
        if state == State.RETRYING:
            publisher.send_owed(jobs, [self.id])
