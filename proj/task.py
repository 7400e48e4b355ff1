"""``SqlAlchemyTask``: how a Celery task meets the database.

Each run gets a session of its own (``proj.db.Session`` resolves to it, and
``self.session`` is it). When the run returns, the session is committed before
Celery reports success; when it raises (including retry, ignore and reject),
it is rolled back. Either way it is closed and removed, so the connection goes
back to the pool before the worker takes the next message.

A job enqueued with ``delay_on_commit`` has a ledger row: its run first claims
the row (a delivery of a job that already ran, was cancelled or is running
elsewhere is acknowledged and skipped), and the move to ``succeeded`` commits
with the task's own effects.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, NoReturn, cast

import celery
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.exceptions import Ignore, Reject, Retry
from celery.worker.request import Request
from kombu.exceptions import EncodeError
from sqlalchemy import orm

from proj import ledger, outbox
from proj.arguments import argument_message, check_arguments, check_json
from proj.config import current_settings
from proj.db import Session, in_task_run, session_scope, task_scope, utcnow, worker_engine
from proj.errors import TaskArgumentError
from proj.retry import TRANSIENT_ERRORS, retry_policy_of
from proj.safety import check_countdown

logger = logging.getLogger(__name__)

_runs = itertools.count()
SESSION_KEY = "proj_session_key"
"""Where a traced run leaves its session's key on the request, for ``after_return``."""
CLAIM_BACKOFF_CAP = 60.0
"""Most seconds a delivery waits before trying again to claim its job."""
CLAIM = "proj_claim"
"""Where a run that claimed its ledger row keeps the :class:`~proj.ledger.Claim`."""


class SqlAlchemyTask(celery.Task[Any, Any]):
    """A Celery task base that runs each task in a unit of work.

    - one session per run, scoped by the running task: concurrent runs on the
      threads pool, and a run called eagerly or directly from a web request
      or another task, never share a session or touch their caller's;
    - commit before success (a failed commit fails the task, and is retried
      if ``retry_on`` names the error); rollback on any exception;
    - the session removed whatever way the run ends;
    - arguments checked at enqueue time: an ORM object is refused with an
      error that says to pass its id;
    - ``delay_on_commit``: the job runs if and only if the caller's
      transaction commits, once;
    - a final failure recorded as a ``failed`` ledger row.
    """

    Request = "proj.task:JobRequest"

    @property
    def session(self) -> orm.Session:
        """The session of the run in progress."""
        return Session()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A key of its own for every run, not the task id: a message delivered
        # twice runs twice at once, and each run must have its own session.
        key = f"{self.request.id}/{next(_runs)}"
        traced = not self.request.called_directly
        claims = traced and self.request.get(outbox.JOB_HEADER) and not in_task_run()
        if traced:
            setattr(self.request, SESSION_KEY, key)  # for after_return
        with task_scope(key):
            try:
                if claims:
                    self._claim()
                retval = super().__call__(*args, **kwargs)
                if claims:
                    ledger.succeed(Session(), str(self.request.id), retval)
                if Session.registry.has():
                    self._commit()
                return retval
            except BaseException as exc:
                if Session.registry.has():
                    Session.rollback()
                if isinstance(exc, Reject) and not getattr(exc, "requeue", False):
                    reason = getattr(exc, "reason", exc)
                    self._record_failure(
                        f"rejected: {reason!r}", None, str(self.request.id), args, kwargs
                    )
                raise
            finally:
                Session.remove()

    def _claim(self) -> None:
        worker = f"{self.request.hostname}:{os.getpid()}"
        try:
            claim = ledger.claim(worker_engine(), str(self.request.id), worker)
        except Exception as exc:
            if exc not in TRANSIENT_ERRORS:
                raise
            # The job is still waiting (nothing was claimed): deliver it again
            # once the database answers.
            raise self.retry(
                exc=exc,
                countdown=min(CLAIM_BACKOFF_CAP, 2.0**self.request.retries),
                max_retries=None,
            ) from exc
        if not claim.claimed:
            logger.info(
                "%s[%s]: job is %s; skipping this delivery",
                self.name,
                self.request.id,
                claim.state or "unknown to the ledger",
            )
            raise Ignore()
        setattr(self.request, CLAIM, claim)

    def _commit(self) -> None:
        try:
            Session.commit()
        except Exception as exc:
            policy = retry_policy_of(self)
            if policy is not None and policy.matches(exc):
                policy.retry(self, exc)
            raise

    def set_progress(self, percent: float) -> None:
        """Record how far the run is (0 to 100) on its ledger row, at once
        (in a transaction of its own); nothing for a job without a row."""
        if self.request.get(CLAIM) is not None:
            ledger.set_progress(str(self.request.id), max(0.0, min(100.0, percent)))

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> NoReturn:
        """Celery's retry; for a ledger job, the row moves to ``retrying``
        before the next attempt is published, and the ledger's attempts
        (which count lost workers too) decide when it is the last."""
        claim: ledger.Claim | None = self.request.get(CLAIM)
        if claim is None:
            raise super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if claim.attempts >= claim.max_attempts:
            raise exc or Retry("retry")  # the last attempt failed: on_failure records it
        when = eta or utcnow() + timedelta(seconds=countdown or 0)
        job_id = str(self.request.id)
        ledger.retrying(job_id, repr(exc), when)
        outbox.send_owed(self.app, [job_id])
        raise Retry(exc=exc, when=when)

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo | None,
    ) -> None:
        """Remove the run's scoped session (``__call__`` has removed it already
        on every path, including retry, ignore and reject, which Celery does
        not pass through here; this keeps a subclass's run from leaking)."""
        key = getattr(self.request, SESSION_KEY, None)
        if key is not None:
            with task_scope(key):
                Session.remove()

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo,
    ) -> None:
        """Record the failure in the ledger (the job's row ends ``failed``)."""
        traceback = str(einfo.traceback) if einfo else None
        self._record_failure(repr(exc), traceback, task_id, args, kwargs)

    def _record_failure(
        self,
        error: str,
        traceback: str | None,
        task_id: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
    ) -> None:
        # Celery may call on_failure outside the run (the request is then
        # empty): what it passes is what identifies the job.
        claim: ledger.Claim | None = self.request.get(CLAIM)
        if claim is None and self.request.get(outbox.JOB_HEADER):
            # This delivery failed before it claimed the job (the claim itself
            # failed): the job may be running elsewhere, or waiting, and is
            # not this delivery's to fail. The reconciler sends a waiting one again.
            logger.error(
                "%s[%s]: delivery failed before claiming the job (%s); the job is left as it is",
                self.name,
                task_id,
                error,
            )
            return
        try:
            ledger.record_failure(
                job_id=task_id,
                name=self.name,
                error=error,
                traceback=traceback,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                attempts=claim.attempts if claim else (self.request.retries or 0) + 1,
            )
        except Exception:
            logger.exception("could not record the failure of %s[%s]", self.name, task_id)
        logger.warning("%s[%s] failed: %s", self.name, task_id, error)

    def apply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Enqueue the task; refuse arguments that cannot cross the queue."""
        check_arguments(self.name, args, kwargs)
        check_countdown(self.app, options)
        if self.app.conf.task_always_eager:
            check_json(self.name, args, kwargs)
        try:
            return super().apply_async(tuple(args or ()), dict(kwargs or {}), **options)
        except EncodeError as exc:
            raise TaskArgumentError(argument_message(self.name, str(exc))) from exc

    def apply_async_on_commit(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        session: orm.Session | None = None,
        **options: Any,
    ) -> str:
        """Enqueue the job in ``session``'s transaction (default: the running
        task's, else the web request's, else a transaction of its own).

        The job's ledger row is written in that transaction: if it rolls back,
        nothing is ever published; once it commits, the message is published
        at once, or by the relay if that fails. ``countdown`` and ``eta`` are
        honoured. Returns the job id (the Celery task id).
        """
        check_arguments(self.name, args, kwargs)
        check_json(self.name, args, kwargs)
        check_countdown(self.app, options)
        policy = retry_policy_of(self)
        max_attempts = policy.max_retries + 1 if policy else current_settings().max_attempts
        session = session or outbox.callers_session()
        with nullcontext(session) if session else session_scope() as target:
            job_id = outbox.enqueue(
                target,
                self.name,
                args or (),
                kwargs or {},
                celery_app=self.app,
                max_attempts=max_attempts,
                options=options,
            )
        return job_id

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> str:
        """``apply_async_on_commit(args, kwargs)``: the job runs if and only if
        the caller's transaction commits."""
        return self.apply_async_on_commit(args, kwargs)


def shared_task(**options: Any) -> Callable[[Callable[..., Any]], SqlAlchemyTask]:
    """Celery's ``shared_task`` on :class:`SqlAlchemyTask` (so ``delay_on_commit``
    and the rest type-check): ``@shared_task(name="app.tasks.send_welcome")``."""
    return cast(
        "Callable[[Callable[..., Any]], SqlAlchemyTask]",
        celery.shared_task(base=SqlAlchemyTask, **options),
    )


class JobRequest(Request):
    """The worker's request for a proj task: when a prefork child dies running
    a ledger job, the row goes back to ``retrying`` (the message is requeued),
    or ends ``failed`` once its attempts are used up (the message is dropped),
    so a job that kills its worker every time stops instead of looping."""

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        lost = isinstance(exc, WorkerLostError) and self.request_dict.get(outbox.JOB_HEADER)
        # The child that died, named as its claim named it (unknown if the
        # worker never heard the child accept the task: then any run).
        worker = f"{self.hostname}:{self.worker_pid}" if self.worker_pid else None
        if lost and ledger.worker_lost(self.id, repr(exc), worker) == ledger.State.FAILED:
            logger.error("%s[%s]: worker lost on its last attempt; failed", self.name, self.id)
            self.reject(requeue=False)
            return
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
