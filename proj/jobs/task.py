"""``SqlAlchemyTask``: how a Celery task meets the database and the ledger.

As thin as Celery's Django task base: each run goes through
:func:`proj.jobs.worker.run` (one session, commit before success, rollback on
any exception, removed however the run ends), and ``delay_on_commit`` /
``apply_async_on_commit`` enqueue through :mod:`proj.jobs.outbox`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, cast

import celery
from billiard.einfo import ExceptionInfo
from kombu.exceptions import EncodeError
from sqlalchemy import orm

from proj.jobs import canvas, ledger, outbox, worker
from proj.jobs.arguments import argument_message, check_arguments, check_json
from proj.jobs.checks import check_countdown
from proj.jobs.errors import JobCancelled, TaskArgumentError
from proj.jobs.registry import jobs_of
from proj.jobs.retry import max_attempts_of
from proj.jobs.session import task_scope


class SqlAlchemyTask(celery.Task[Any, Any]):
    """A Celery task base that runs each task in a unit of work.

    - one session per run (``self.session``), scoped by the running task:
      concurrent runs on the threads pool, and a run called eagerly or
      directly from a web request or another task, never share a session or
      touch their caller's;
    - commit before success (a failed commit fails the task, and is retried
      if ``retry_on`` names the error); rollback on any exception;
    - the session removed whatever way the run ends;
    - arguments checked at enqueue time: an ORM object is refused with an
      error that says to pass its id;
    - ``delay_on_commit``: the job runs if and only if the caller's
      transaction commits, once;
    - a final failure recorded as a ``failed`` ledger row.

    ``max_attempts`` (a class attribute, or ``@app.task(max_attempts=...)``)
    bounds a job's attempts when no ``retry_on`` does.
    """

    Request = "proj.jobs.worker:JobRequest"
    max_attempts: int | None = None
    """Attempts a job of this task gets without ``retry_on`` (default: ``PROJ_MAX_ATTEMPTS``)."""

    @property
    def session(self) -> orm.Session:
        """The session of the run in progress."""
        return jobs_of(self.app).session()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return worker.run(self, lambda: super(SqlAlchemyTask, self).__call__(*args, **kwargs))

    def set_progress(self, percent: float) -> None:
        """Record how far the run is (0 to 100) on its ledger row, at once
        (in a transaction of its own); nothing for a job without a row.

        Raises :class:`~proj.jobs.JobCancelled` if someone asked the job to stop.
        """
        claim = worker.claim_of(self)
        if claim is not None:
            progress = max(0.0, min(100.0, percent))
            engine = jobs_of(self.app).engine
            if ledger.set_progress(engine, str(self.request.id), claim.attempts, progress):
                raise JobCancelled()

    def cancel_requested(self) -> bool:
        """Whether someone asked this job to stop (``POST /api/jobs/<id>/cancel``
        while it runs); False for a task without a ledger row."""
        if worker.claim_of(self) is None:
            return False
        return ledger.cancel_requested(jobs_of(self.app).engine, str(self.request.id))

    def check_cancelled(self) -> None:
        """Raise :class:`~proj.jobs.JobCancelled` if someone asked this job to
        stop: its session rolls back and the job ends ``cancelled``."""
        if self.cancel_requested():
            raise JobCancelled()

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
        """Celery's retry, after rolling the run's session back; for a ledger
        job, see :func:`proj.jobs.worker.retry_job`."""
        session = jobs_of(self.app).session
        if session.registry.has():
            session.rollback()
        claim = worker.claim_of(self)
        if claim is None:
            # A plain task's next attempt waits in the broker, unacknowledged.
            check_countdown(self.app, {"eta": eta, "countdown": countdown})
            raise super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        worker.retry_job(self, claim, exc, {"eta": eta, "countdown": countdown})

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: ExceptionInfo | None,
    ) -> None:
        """Remove the run's scoped session (the run has removed it already on
        every path, including retry, ignore and reject, which Celery does not
        pass through here; this keeps a subclass's run from leaking)."""
        key = getattr(self.request, worker.SESSION_KEY, None)
        if key is not None:
            with task_scope(key):
                jobs_of(self.app).session.remove()

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
        worker.record_failure(self, repr(exc), traceback, task_id, args, kwargs)

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
        unique: str | None = None,
        **options: Any,
    ) -> str:
        """Enqueue the job in ``session``'s transaction (default: the running
        task's, else the Flask request's ``db.session``, else a transaction of
        its own).

        ``unique``: a key; while a job of this task with that key is waiting
        or running, nothing is enqueued and that job's id is returned (it never
        raises into the caller's transaction). ``link`` and ``link_error``
        make the job the start of a canvas (:func:`~proj.jobs.enqueue_on_commit`):
        each callback is a ledger row too, released by the job's end.

        The job's ledger row is written in that transaction: if it rolls back,
        nothing is ever published; once it commits, the message is published
        at once, or by the relay if that fails. ``countdown`` and ``eta`` of
        any length are honoured: the job waits as its row, and the relay
        publishes it when it falls due (``expires`` counts from then).
        Returns the job id (the Celery task id).
        """
        if options.get("link") or options.get("link_error"):
            signature = self.signature(tuple(args or ()), dict(kwargs or {}), **options)
            canvas_id = str(uuid.uuid4())
            return canvas.enqueue(
                signature, canvas_id, session=session, celery_app=self.app, unique=unique
            )
        # The arguments are checked as the job's row is made (one encoding:
        # an ORM object, a cycle or anything else JSON cannot hold is named).
        jobs = jobs_of(self.app)
        max_attempts = max_attempts_of(self, jobs.settings.max_attempts)
        session = session or outbox.callers_session(jobs)
        with outbox.owning(session, jobs) as target:
            return outbox.enqueue(
                target,
                jobs,
                self.name,
                args or (),
                kwargs or {},
                max_attempts=max_attempts,
                options=options,
                unique=unique,
            )

    def enqueue_many(
        self,
        calls: Iterable[Sequence[Any]],
        *,
        session: orm.Session | None = None,
        **options: Any,
    ) -> list[str]:
        """Enqueue a job for each of ``calls`` (its positional arguments, as
        in Celery's ``starmap``) in ``session``'s transaction, found as
        ``apply_async_on_commit`` finds it, in one statement; returns the
        jobs' ids, in order.

        ``options`` (``queue``, ``priority``, ``countdown``, ``eta``,
        ``expires``…) apply to every job. The jobs run if and only if the
        transaction commits, each once; the relay publishes them, in batches
        the broker confirms (:func:`proj.jobs.outbox.enqueue_many` says
        when). ``unique``, ``task_id``, ``link``, ``link_error`` and chains
        are refused with :class:`~proj.jobs.TaskArgumentError`, as are
        arguments ``apply_async_on_commit`` refuses; nothing is enqueued then.
        """
        batch = [_positional(self.name, call) for call in calls]
        jobs = jobs_of(self.app)
        max_attempts = max_attempts_of(self, jobs.settings.max_attempts)
        session = session or outbox.callers_session(jobs)
        with outbox.owning(session, jobs) as target:
            return outbox.enqueue_many(
                target, jobs, self.name, batch, max_attempts=max_attempts, options=options
            )

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> str:
        """``apply_async_on_commit(args, kwargs)``: the job runs if and only if
        the caller's transaction commits."""
        return self.apply_async_on_commit(args, kwargs)


def _positional(task_name: str, call: Any) -> tuple[Any, ...]:
    """``call``, one job's positional arguments, as a tuple."""
    if isinstance(call, (str, bytes)) or not isinstance(call, Sequence):
        raise TaskArgumentError(
            f"{task_name}: enqueue_many takes one sequence of positional arguments a "
            f"job, as in [(1,), (2,)]; got {call!r:.60}."
        )
    return tuple(call)


def shared_task(**options: Any) -> Callable[[Callable[..., Any]], SqlAlchemyTask]:
    """Celery's ``shared_task`` on :class:`SqlAlchemyTask` (so ``delay_on_commit``
    and the rest type-check): ``@shared_task(name="app.tasks.send_welcome")``."""
    return cast(
        "Callable[[Callable[..., Any]], SqlAlchemyTask]",
        celery.shared_task(base=SqlAlchemyTask, **options),
    )
