"""The jobs list's filters: read from query (or form) arguments, checked, and
turned into SQL conditions on the ledger; and which queue a job goes to.

A filter that cannot be read raises :class:`InvalidFilter`, which says, field
by field, what is wrong: a page shows that, never a server error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, Text, and_, case, cast, false, null, or_, select, true
from sqlalchemy.orm import Session

from proj.jobs.models import Job, State

TEXT_LIMIT = 255
"""Longest task name, queue or search text a filter takes (a task name's column)."""


class InvalidFilter(Exception):
    """Filter values that cannot be used; ``problems`` says what is wrong with each."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        super().__init__("; ".join(problems.values()))
        self.problems = dict(problems)


@dataclass(frozen=True)
class JobFilter:
    """Which jobs to list or act on; every field given narrows the list."""

    state: State | None = None
    name: str | None = None
    """The task's name, exactly."""
    queue: str | None = None
    """The queue the job goes to (see :class:`Queues`)."""
    tenant: str | None = None
    """Whose job it is (the tenant it was enqueued for)."""
    since: datetime | None = None
    """Created at or after (UTC)."""
    until: datetime | None = None
    """Created before (UTC)."""
    q: str | None = None
    """A job's exact id (that job alone), else text found in the arguments of
    jobs (case-insensitive)."""
    canvas: str | None = None
    """The canvas the jobs are steps of (its id, exactly)."""

    @classmethod
    def read(cls, values: Mapping[str, str]) -> JobFilter:
        """The filter ``values`` describe (empty values are left out).

        Times are ``YYYY-MM-DDTHH:MM`` (what ``<input type=datetime-local>``
        sends), in UTC unless they carry an offset. Raises
        :class:`InvalidFilter` naming each value that cannot be used.
        """
        given = {f.name: (values.get(f.name) or "").strip() for f in fields(cls)}
        problems: dict[str, str] = {}
        state = None
        if given["state"]:
            try:
                state = State(given["state"])
            except ValueError:
                problems["state"] = f"state must be one of {', '.join(State)}"
        for field in ("name", "queue", "tenant", "q", "canvas"):
            if len(given[field]) > TEXT_LIMIT:
                problems[field] = f"{field} takes at most {TEXT_LIMIT} characters"
            elif "\x00" in given[field]:
                problems[field] = f"{field} cannot hold a NUL character"
        moments = {}
        for field in ("since", "until"):
            if given[field]:
                try:
                    moments[field] = _utc(given[field])
                except (ValueError, OverflowError):
                    problems[field] = (
                        f"{field} must be a date and time like 2025-01-31T14:05 (UTC), "
                        f"not {given[field][:40]!r}"
                    )
        since, until = moments.get("since"), moments.get("until")
        if since is not None and until is not None and since >= until:
            problems["until"] = "until must be later than since"
        if problems:
            raise InvalidFilter(problems)
        return cls(
            state=state,
            name=given["name"] or None,
            queue=given["queue"] or None,
            tenant=given["tenant"] or None,
            since=since,
            until=until,
            q=given["q"] or None,
            canvas=given["canvas"] or None,
        )

    def args(self) -> dict[str, str]:
        """The arguments that give this filter back (for links and hidden fields)."""
        found = {
            "state": self.state,
            "name": self.name,
            "queue": self.queue,
            "tenant": self.tenant,
            "since": _local_text(self.since),
            "until": _local_text(self.until),
            "q": self.q,
            "canvas": self.canvas,
        }
        return {key: str(value) for key, value in found.items() if value}

    def conditions(self, queues: Queues, session: Session) -> list[ColumnElement[bool]]:
        """The SQL conditions a job must meet (``session`` looks ``q`` up as a
        job id)."""
        found, text = self.narrowing(queues, session)
        if text is not None:
            found.append(holds_text(text, Job.args, Job.kwargs))
        return found

    def narrowing(
        self, queues: Queues, session: Session
    ) -> tuple[list[ColumnElement[bool]], str | None]:
        """The SQL conditions of :meth:`conditions` but the search in the
        arguments, and the text that search looks for: None if there is none
        (no ``q``, or ``q`` the id of a job, which finds that job)."""
        found: list[ColumnElement[bool]] = []
        if self.state is not None:
            found.append(Job.state == self.state)
        if self.name is not None:
            found.append(Job.name == self.name)
        if self.queue is not None:
            found.append(queues.condition(self.queue))
        if self.tenant is not None:
            found.append(Job.tenant == self.tenant)
        if self.canvas is not None:
            found.append(Job.canvas_id == self.canvas)
        if self.since is not None:
            found.append(Job.created_at >= self.since)
        if self.until is not None:
            found.append(Job.created_at < self.until)
        if self.q is None:
            return found, None
        # An id finds its job through the primary key; other text is looked
        # for in the jobs' arguments.
        if session.scalar(select(Job.id).where(Job.id == self.q)) is not None:
            found.append(Job.id == self.q)
            return found, None
        return found, self.q


FILTER_FIELDS = tuple(field.name for field in fields(JobFilter))
"""The query arguments a filter is read from."""


def is_job_id(text: str) -> bool:
    """Whether ``text`` could be a job's id (the database would refuse some
    text outright: a NUL, more than the column holds)."""
    return len(text) <= TEXT_LIMIT and "\x00" not in text


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _local_text(moment: datetime | None) -> str | None:
    """``moment`` as ``<input type=datetime-local>`` shows it (UTC, no offset)."""
    if moment is None:
        return None
    plain = moment.astimezone(UTC).replace(tzinfo=None)
    precision = "microseconds" if plain.microsecond else "seconds" if plain.second else "minutes"
    return plain.isoformat(timespec=precision)


def holds_text(text: str, args: Any, kwargs: Any) -> ColumnElement[bool]:
    """Jobs whose arguments (``args``, ``kwargs``) hold ``text``: as typed, or
    as JSON spells it inside a string (quotes, backslashes, non-ASCII escaped)."""
    needles = {text, json.dumps(text)[1:-1]}
    columns = (cast(args, Text), cast(kwargs, Text))
    return or_(
        *(
            column.ilike(f"%{_escape(needle)}%", escape="\\")
            for needle in needles
            for column in columns
        ),
    )


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Queues:
    """Which queue each job goes to: the one its row names (``options["queue"]``),
    else the one Celery's routes give its task, asked by task name alone (a
    router that looks at the arguments is not followed; one that fails
    without them counts as the default queue)."""

    def __init__(self, celery_app: Celery) -> None:
        self.celery_app = celery_app
        self._routed: dict[str, str] = {}

    @property
    def default(self) -> str:
        return str(self.celery_app.conf.task_default_queue)

    def task_names(self) -> list[str]:
        """The tasks this process knows (Celery's own left out), sorted."""
        return sorted(name for name in self.celery_app.tasks if not name.startswith("celery."))

    def names(self) -> list[str]:
        """The queues configured, and those routes name, sorted."""
        configured = {queue.name for queue in self.celery_app.conf.task_queues or ()}
        return sorted({self.default, *configured, *map(self.routed, self.task_names())})

    def routed(self, task_name: str) -> str:
        """The queue Celery's routes send ``task_name`` to."""
        found = self._routed.get(task_name)
        if found is None:
            try:
                route: Mapping[str, Any] = self.celery_app.amqp.router.route({}, task_name, (), {})
            except Exception:
                # A router that needs the arguments: its tasks show as in the default queue.
                route = {}
            queue = route.get("queue")
            found = str(getattr(queue, "name", queue) or self.default)
            self._routed[task_name] = found
        return found

    def of(self, task_name: str, named: Any) -> str:
        """The queue of a job of ``task_name`` whose row names ``named`` (or nothing)."""
        return str(named) if named else self.routed(task_name)

    def condition(self, queue: str) -> ColumnElement[bool]:
        """SQL: the job goes to ``queue``: the queue its row keeps (by its
        index), else, for a row written before proj kept it, the one its
        options name or its task's route. A task this process does not know
        goes to the default queue."""
        return or_(*(and_(*branch) for branch in self.branches(queue)))

    def branches(self, queue: str) -> list[list[ColumnElement[bool]]]:
        """:meth:`condition`'s two halves, each an index walk of its own: the
        rows that keep ``queue``, and the older rows that keep none. A list
        walks them apart (:func:`proj.jobs.listing.newest`): under one ``OR``,
        PostgreSQL counts the first half twice, expects a rare queue's
        thousands of jobs to be a few, and reads them all to sort them."""
        named = named_queue()
        here: list[str] = []
        elsewhere: list[str] = []
        for task_name in self.task_names():
            (here if self.routed(task_name) == queue else elsewhere).append(task_name)
        by_route: ColumnElement[bool]
        if queue == self.default:
            by_route = Job.name.not_in(elsewhere) if elsewhere else true()
        else:
            by_route = Job.name.in_(here) if here else false()
        unnamed = or_(named.is_(None), named == "")
        return [
            [Job.queue == queue],
            [Job.queue.is_(None), or_(named == queue, and_(unnamed, by_route))],
        ]


def named_queue() -> ColumnElement[str]:
    """SQL: the queue a job's row names: its ``queue`` column (where proj
    keeps the queue Celery's routes chose at enqueue), else, for a row
    written before it did, the queue its options name, or NULL.

    PostgreSQL's json operators refuse a whole document holding ``\\u0000``
    (an unreadable message's body may): such a row is not parsed, and names
    no queue (only dead letters hold one).
    """
    unparsable = cast(Job.options, Text).contains("\\u0000", autoescape=True)
    in_options = case((unparsable, null()), else_=Job.options["queue"].as_string())
    named: ColumnElement[str] = case((Job.queue.is_not(None), Job.queue), else_=in_options)
    return named
