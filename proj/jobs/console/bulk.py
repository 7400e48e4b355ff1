"""Bulk actions: which jobs a console form picks (those ticked, or every job
the filter matches), how many of them an action would touch, and what it did,
in words.

An action takes at most :data:`BATCH_LIMIT` jobs at once, the newest first;
each job's change is a compare-and-set (see :mod:`proj.jobs.actions`), and
the action is one entry of the audit trail (:meth:`Selection.record`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session
from werkzeug.datastructures import MultiDict

from proj.jobs import actions, audit
from proj.jobs.console.filters import InvalidFilter, JobFilter, Queues, is_job_id
from proj.jobs.console.site import Refused
from proj.jobs.extension import Jobs
from proj.jobs.models import Job

BATCH_LIMIT = 10_000
"""Most jobs one bulk action takes (the newest first); act again for the rest."""
ELIGIBLE: dict[str, Callable[[], tuple[ColumnElement[bool], ...]]] = {
    "retry": actions.retryable,
    "cancel": actions.cancellable,
}
"""Each action, and the SQL of the jobs it applies to."""
SCOPES = ("selected", "matching")
AUDITED = {"retry": audit.Action.JOBS_BULK_RETRY, "cancel": audit.Action.JOBS_BULK_CANCEL}
"""Each action, as the audit trail names it."""
IDS_RECORDED = 100
"""Ids of changed jobs an audit entry keeps, at most (its counts are whole)."""


@dataclass(frozen=True)
class Selection:
    """An action and the jobs it is for: the ``selected`` ids, or every job
    ``matching`` the filter."""

    action: str
    scope: str
    job_ids: tuple[str, ...]
    filter: JobFilter

    @classmethod
    def read(cls, form: MultiDict[str, str]) -> Selection:
        """The selection a bulk form posted; :class:`Refused` (400) if it cannot be used."""
        action, scope = form.get("action", ""), form.get("scope", "")
        if action not in ELIGIBLE:
            raise Refused(400, "invalid_form", f"action must be one of {', '.join(ELIGIBLE)}")
        if scope not in SCOPES:
            raise Refused(400, "invalid_form", f"scope must be one of {', '.join(SCOPES)}")
        try:
            chosen = JobFilter.read(form)
        except InvalidFilter as exc:
            raise Refused(400, "invalid_filter", str(exc)) from None
        # An id no job could have is left out: it would be skipped anyway.
        job_ids = tuple(dict.fromkeys(i for i in form.getlist("job_id") if i and is_job_id(i)))
        if scope == "selected" and len(job_ids) > BATCH_LIMIT:
            raise Refused(400, "invalid_form", f"select at most {BATCH_LIMIT:,} jobs at once")
        return cls(action, scope, job_ids if scope == "selected" else (), chosen)

    @property
    def empty(self) -> bool:
        """True when jobs were to be ticked and none were."""
        return self.scope == "selected" and not self.job_ids

    def _where(self, session: Session, queues: Queues) -> list[ColumnElement[bool]]:
        where = list(ELIGIBLE[self.action]())
        if self.scope == "selected":
            return [Job.id.in_(self.job_ids), *where]
        return [*self.filter.conditions(queues, session), *where]

    def count(self, session: Session, queues: Queues) -> tuple[int, bool]:
        """How many jobs the action would touch now, up to ``BATCH_LIMIT``, and
        whether more are left (the count stops there, so it stays quick on any
        ledger)."""
        if self.empty:
            return 0, False
        some = select(Job.id).where(*self._where(session, queues)).limit(BATCH_LIMIT + 1)
        found = int(session.scalar(select(func.count()).select_from(some.subquery())) or 0)
        return min(found, BATCH_LIMIT), found > BATCH_LIMIT

    def pick(self, session: Session, queues: Queues) -> tuple[list[str], bool]:
        """The ids to act on: the ticked ones, or the newest ``BATCH_LIMIT`` jobs
        the action applies to that match the filter; and whether more were left."""
        if self.scope == "selected":
            return list(self.job_ids), False
        query = (
            select(Job.id)
            .where(*self._where(session, queues))
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(BATCH_LIMIT + 1)
        )
        found = list(session.scalars(query))
        return found[:BATCH_LIMIT], len(found) > BATCH_LIMIT

    def apply(self, session: Session, jobs: Jobs, job_ids: list[str]) -> actions.Tally:
        """Act on ``job_ids`` in ``session``'s transaction (the caller commits)."""
        if self.action == "retry":
            return actions.retry_each(session, jobs, job_ids)
        return actions.cancel_each(session, job_ids)

    def record(self, session: Session, tally: actions.Tally, picked: int, capped: bool) -> None:
        """Record the action in the audit trail, in ``session``'s transaction:
        how many jobs it changed, its counts, the filter (for every job
        matching it) and the first :data:`IDS_RECORDED` ids it changed."""
        detail = {
            "scope": self.scope,
            "filter": self.filter.args() if self.scope == "matching" else None,
            "picked": picked,
            "capped": capped,
            "done": tally.done,
            "stopping": tally.stopping,
            "skipped": tally.skipped,
            "unrunnable": tally.unrunnable,
            "job_ids": tally.changed[:IDS_RECORDED],
        }
        target = _jobs(len(tally.changed))
        audit.record_request(session, AUDITED[self.action], target=target, detail=detail)

    def summary(self, tally: actions.Tally, picked: int, capped: bool, expected: int) -> str:
        """What was done, in words. ``expected`` is the count the confirmation
        showed: matching jobs it counted that were no longer there to pick
        are told as skipped too."""
        skipped, still = tally.skipped, "not"
        if self.scope == "matching":
            skipped += max(0, min(expected, BATCH_LIMIT) - picked)
            still = "no longer"  # the confirmation counted them
        if self.action == "retry":
            parts = [f"retried {_jobs(tally.done)}"]
            if skipped:
                parts.append(f"{_jobs(skipped, 'was', 'were')} {still} failed")
            if tally.unrunnable:
                parts.append(
                    f"{_jobs(tally.unrunnable, 'is a message', 'are messages')} "
                    "no worker could read (not retried)"
                )
        else:
            parts = [f"cancelled {_jobs(tally.done)}"]
            if tally.stopping:
                parts.append(
                    f"asked {_jobs(tally.stopping)} running to stop (a job that checks "
                    "ends cancelled at its next check)"
                )
            if skipped:
                parts.append(f"{_jobs(skipped, 'was', 'were')} {still} waiting or running")
        if capped:
            parts.append(f"only the newest {BATCH_LIMIT:,} were taken: do it again for the rest")
        return "; ".join(parts)


def _jobs(count: int, one: str = "", many: str = "") -> str:
    verb = one if count == 1 else many
    noun = "job" if count == 1 else "jobs"
    return f"{count:,} {noun} {verb}".rstrip()
