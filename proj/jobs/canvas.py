"""Celery's canvas on the ledger: ``chain``, ``group``, ``chord``, ``link``,
``link_error`` and immutable signatures (``.si()``), each step a ledger row::

    canvas_id = enqueue_on_commit(charge.s(invoice_id) | send_receipt.s())
    enqueue_on_commit(chord([tally.s(user_id) for user_id in ids], publish_report.s(month)))

:func:`enqueue_on_commit` writes every step of a canvas in the caller's
transaction: all of them, or on rollback none. The steps nothing comes
before are ``queued`` and published after the commit; the others are
``waiting``, with the count of the jobs before them (``parents_left``). A
job's success releases the steps after it in the same transaction
(:func:`proj.jobs.ledger.release`): the last parent to succeed makes a step
``queued``, with its parents' results as its first argument, so each step
is released once, whatever the broker or the workers do twice.

Results pass as Celery passes them: a step after one job gets that job's
return value as its first argument; a step after a group (a chord's
callback) gets the list of the group's results, in the group's order; an
immutable signature gets neither. A ``link_error`` callback runs once if its
job fails for good, with the failed job's id as its first argument (Celery's
classic errback), and every step after a failed job ends ``cancelled``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.canvas import Signature, _chain, chord, group, maybe_signature
from sqlalchemy import orm

from proj.jobs import outbox
from proj.jobs.errors import TaskArgumentError
from proj.jobs.registry import jobs_of

NOT_ON_A_STEP = ("countdown", "eta", "chord", "group_id", "group_index")
"""Options a step that waits for others cannot take (it runs when released)."""


@dataclass
class Step:
    """One job of a canvas, and its place in it."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    parents: list[str] = field(default_factory=list)
    """The jobs it waits for (none: it starts the canvas)."""
    children: list[str] = field(default_factory=list)
    """The steps released when it succeeds."""
    errbacks: list[str] = field(default_factory=list)
    """The ``link_error`` callbacks released if it fails for good."""
    gather: bool = False
    """It takes its parents' results as one list, in order (after a group)."""
    immutable: bool = False
    """It takes no result at all (``.si()``)."""
    errback: bool = False
    """It runs only if its one parent fails for good."""

    def graph(self) -> dict[str, Any]:
        """What its row keeps of its place (the ``graph`` column)."""
        return {
            "parents": self.parents,
            "children": self.children,
            "errbacks": self.errbacks,
            "gather": self.gather,
            "immutable": self.immutable,
            "errback": self.errback,
        }


class Plan:
    """A canvas laid out as steps, in the order they were placed."""

    def __init__(self, celery_app: Celery) -> None:
        self.celery_app = celery_app
        self.steps: dict[str, Step] = {}

    def place(
        self,
        signature: Any,
        parents: list[str],
        gather: bool = False,
        errbacks: tuple[Signature, ...] = (),
    ) -> list[str]:
        """Add ``signature`` after ``parents``; the ids of its last steps (what
        comes after it waits for)."""
        sig = _signature(signature, app=self.celery_app)
        options = dict(sig.options)
        errbacks = (*errbacks, *_listed(options.pop("link_error", None), self.celery_app))
        if isinstance(sig, chord):
            header = sig.tasks if isinstance(sig.tasks, group) else group(list(sig.tasks))
            ends = self.place(header, parents, gather, errbacks)
            ends = self.place(sig.body, ends, True, errbacks)
        elif isinstance(sig, group):
            ends = [
                end for task in sig.tasks for end in self.place(task, parents, gather, errbacks)
            ]
        elif isinstance(sig, _chain):
            ends, after_group = parents, gather
            for task in sig.tasks:
                ends = self.place(task, ends, after_group, errbacks)
                after_group = isinstance(_signature(task, app=self.celery_app), group)
        else:
            return [self._task(sig, options, parents, gather, errbacks)]
        for link in _listed(options.get("link"), self.celery_app):
            ends = self.place(link, ends, isinstance(sig, group))
        return ends

    def _task(
        self,
        sig: Signature,
        options: dict[str, Any],
        parents: list[str],
        gather: bool,
        errbacks: tuple[Signature, ...],
        errback_of: str | None = None,
    ) -> str:
        links = _listed(options.pop("link", None), self.celery_app)
        if parents:
            refused = sorted(set(NOT_ON_A_STEP) & {k for k, v in options.items() if v})
            if refused:
                raise TaskArgumentError(
                    f"{sig.task}: {', '.join(refused)} cannot go on a step that waits for "
                    "others (it runs when the jobs before it succeed)"
                )
        args = list(sig.args)
        if gather and not parents and not sig.immutable:
            args = [[], *args]  # a chord whose header is empty: no results
        step = Step(
            id=str(options.pop("task_id", None) or uuid.uuid4()),
            name=str(sig.task),
            args=args,
            kwargs=dict(sig.kwargs),
            options=options,
            parents=list(parents),
            gather=gather,
            immutable=bool(sig.immutable),
            errback=errback_of is not None,
        )
        if step.id in self.steps:
            raise TaskArgumentError(f"{step.name}: the task id {step.id} is in the canvas twice")
        self.steps[step.id] = step
        if errback_of is not None:
            self.steps[errback_of].errbacks.append(step.id)
        else:
            for parent in parents:
                self.steps[parent].children.append(step.id)
        for errback in errbacks:
            own = _signature(errback, app=self.celery_app)
            self._task(own, dict(own.options), [step.id], False, (), errback_of=step.id)
        for link in links:
            self.place(link, [step.id])
        return step.id


def _signature(value: Any, app: Celery | None = None) -> Signature:
    """``value`` (a signature, or one as a dict) as a signature."""
    found = maybe_signature(value, app=app)
    if not isinstance(found, Signature):
        raise TaskArgumentError(f"{value!r} is not a task signature")
    return found


def _listed(value: Any, celery_app: Celery) -> list[Signature]:
    """A ``link``/``link_error`` option's signatures (one, a list, or none)."""
    if not value:
        return []
    found = value if isinstance(value, list | tuple) else [value]
    return [_signature(item, app=celery_app) for item in found]


def plan(canvas: Any, celery_app: Celery) -> Plan:
    """``canvas`` (a signature, ``chain``, ``group`` or ``chord``) as steps."""
    laid_out = Plan(celery_app)
    laid_out.place(canvas, [])
    if not laid_out.steps:
        raise TaskArgumentError("the canvas has no task in it")
    return laid_out


def starting(steps: Iterable[Step]) -> list[Step]:
    """The steps that wait for nothing: queued at once."""
    return [step for step in steps if not step.parents]


def enqueue_on_commit(
    canvas: Any, *, session: orm.Session | None = None, celery_app: Celery | None = None
) -> str:
    """Enqueue ``canvas`` (a signature, ``chain``, ``group`` or ``chord``) in
    ``session``'s transaction, as ``apply_async_on_commit`` does (default: the
    running task's, else the Flask request's ``db.session``, else a
    transaction of its own): every step's row or, on rollback, none. Returns
    the canvas's id (``GET /api/jobs?canvas=<id>`` lists its steps).

    Raises :class:`~proj.jobs.TaskArgumentError` for arguments that cannot
    cross the queue, and for a countdown or ETA on a step that waits for
    others."""
    canvas_id = str(uuid.uuid4())
    enqueue(canvas, canvas_id, session=session, celery_app=celery_app)
    return canvas_id


def enqueue(
    canvas: Any,
    canvas_id: str,
    *,
    session: orm.Session | None = None,
    celery_app: Celery | None = None,
    unique: str | None = None,
) -> str:
    """:func:`enqueue_on_commit` as ``canvas_id``; the id of its first step
    (with ``unique``, see :func:`proj.jobs.outbox.enqueue_canvas`)."""
    app = celery_app or _signature(canvas).app
    steps = list(plan(canvas, app).steps.values())
    jobs = jobs_of(app)
    with outbox.owning(session or outbox.callers_session(jobs), jobs) as target:
        return outbox.enqueue_canvas(target, jobs, steps, canvas_id, unique)
