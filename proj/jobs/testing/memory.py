"""The in-memory mode: no broker, jobs recorded as they would be published.

In the spirit of Oban.Testing and Safir's mock queue::

    with in_memory(celery_app) as queue:
        client.post("/orders", json={...})           # the view commits
        queue.assert_enqueued(pay, args=[order_id])
        queue.run_enqueued()                         # runs them here, for real

While the block runs, ``delay_on_commit`` writes the job's ledger row as usual
and, when the transaction commits, records the job instead of publishing it
(nothing on rollback); a retry's next attempt is recorded the same way.
:meth:`InMemoryQueue.run_enqueued` runs recorded jobs in this process with the
real session rules: the claim, one session per run, commit or rollback, the
ledger's outcome.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task
from celery._state import get_current_app

from proj.jobs.extension import Jobs
from proj.jobs.publisher import JOB_HEADER

MAX_ROUNDS = 100
"""Most rounds :meth:`InMemoryQueue.run_enqueued` makes (a job that enqueues
itself forever must end a test, not hang it)."""


@dataclass(frozen=True)
class EnqueuedJob:
    """A job as it would have been published."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    """Publishing options kept with the job (queue, eta, ...)."""


@dataclass
class InMemoryQueue:
    """The jobs a Celery app's installation recorded instead of publishing."""

    celery_app: Celery
    jobs: list[EnqueuedJob] = field(default_factory=list)

    def record(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Take what the outbox would have published."""
        for message in messages:
            self.jobs.append(
                EnqueuedJob(
                    id=str(message["id"]),
                    name=str(message["name"]),
                    args=list(message["args"]),
                    kwargs=dict(message["kwargs"]),
                    options=dict(message["options"]),
                )
            )

    def enqueued_jobs(self, task: Task[Any, Any] | str | None = None) -> list[EnqueuedJob]:
        """The jobs recorded and not run yet, oldest first (of ``task`` only, if given)."""
        name = _name(task)
        return [job for job in self.jobs if name is None or job.name == name]

    def assert_enqueued(
        self,
        task: Task[Any, Any] | str,
        *,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> EnqueuedJob:
        """The recorded job of ``task`` with these arguments (any, where not
        given); ``AssertionError`` listing what was recorded if there is none."""
        found = self._matching(task, args, kwargs)
        if not found:
            recorded = [(job.name, job.args, job.kwargs) for job in self.jobs]
            wanted = (_name(task), args, kwargs)
            raise AssertionError(f"no job {wanted} was enqueued; enqueued: {recorded}")
        return found[0]

    def refute_enqueued(
        self,
        task: Task[Any, Any] | str,
        *,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """``AssertionError`` if a job of ``task`` with these arguments was recorded."""
        found = self._matching(task, args, kwargs)
        if found:
            raise AssertionError(f"{len(found)} jobs of {_name(task)} enqueued: {found}")

    def run_enqueued(self) -> int:
        """Run the recorded jobs in this process, and those they enqueue, until
        none is left; how many runs were made. A task's exception is not
        raised here: the job's ledger row says how it ended."""
        runs = 0
        for _ in range(MAX_ROUNDS):
            batch, self.jobs = self.jobs, []
            if not batch:
                return runs
            for job in batch:
                task = self.celery_app.tasks[job.name]
                headers: Any = {JOB_HEADER: True}
                task.apply(tuple(job.args), job.kwargs, task_id=job.id, headers=headers)
                runs += 1
        raise AssertionError(f"jobs were still being enqueued after {MAX_ROUNDS} rounds")

    def clear(self) -> None:
        """Forget the recorded jobs."""
        self.jobs.clear()

    def _matching(
        self,
        task: Task[Any, Any] | str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
    ) -> list[EnqueuedJob]:
        return [
            job
            for job in self.enqueued_jobs(task)
            if (args is None or job.args == list(args))
            and (kwargs is None or job.kwargs == dict(kwargs))
        ]


def _name(task: Task[Any, Any] | str | None) -> str | None:
    return task if task is None or isinstance(task, str) else str(task.name)


_active: list[InMemoryQueue] = []


@contextmanager
def in_memory(celery_app: Celery | None = None) -> Iterator[InMemoryQueue]:
    """Record ``celery_app``'s jobs (default: Celery's current app) instead of
    publishing them, until the block ends."""
    jobs = Jobs.of(celery_app or get_current_app())
    queue = InMemoryQueue(jobs.celery_app)
    previous, jobs.capture = jobs.capture, queue.record
    _active.append(queue)
    try:
        yield queue
    finally:
        _active.remove(queue)
        jobs.capture = previous


def _queue() -> InMemoryQueue:
    if not _active:
        raise AssertionError("no in-memory queue: use `with in_memory(celery_app):` first")
    return _active[-1]


def enqueued_jobs(task: Task[Any, Any] | str | None = None) -> list[EnqueuedJob]:
    """:meth:`InMemoryQueue.enqueued_jobs` of the innermost :func:`in_memory` block."""
    return _queue().enqueued_jobs(task)


def assert_enqueued(
    task: Task[Any, Any] | str,
    *,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> EnqueuedJob:
    """:meth:`InMemoryQueue.assert_enqueued` of the innermost :func:`in_memory` block."""
    return _queue().assert_enqueued(task, args=args, kwargs=kwargs)


def refute_enqueued(
    task: Task[Any, Any] | str,
    *,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> None:
    """:meth:`InMemoryQueue.refute_enqueued` of the innermost :func:`in_memory` block."""
    _queue().refute_enqueued(task, args=args, kwargs=kwargs)


def run_enqueued() -> int:
    """:meth:`InMemoryQueue.run_enqueued` of the innermost :func:`in_memory` block."""
    return _queue().run_enqueued()
