"""The console's jobs list (filters, keyset pages, bulk actions) and job pages
(arguments, result, progress, each attempt's error, the timeline; retry and
cancel).

Every action goes through :mod:`proj.jobs.actions`: a compare-and-set in the
ledger, committed before the page answers with its entry in the audit trail
(:mod:`proj.jobs.audit`); a retried job is published after the commit. A
viewer sees no buttons, and the frame refuses a viewer's POST.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from flask import current_app, flash, redirect, render_template, request, url_for
from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    cast,
    func,
    or_,
    select,
    tuple_,
)
from werkzeug.wrappers.response import Response as BaseResponse

from proj.jobs import actions, audit, ledger, listing, revoke
from proj.jobs.auth import request_session
from proj.jobs.console import bulk, canvas_graph
from proj.jobs.console.bulk import Selection
from proj.jobs.console.filters import (
    FILTER_FIELDS,
    InvalidFilter,
    JobFilter,
    Queues,
    holds_text,
    is_job_id,
    named_queue,
)
from proj.jobs.console.site import Refused, blueprint
from proj.jobs.console.timeline import timeline
from proj.jobs.extension import EXTENSION_KEY, Jobs
from proj.jobs.http import whole_number
from proj.jobs.models import Job, State

PAGE_SIZE = 50
"""Jobs on one page of the list."""
SEARCH_WINDOW = 2_000
"""Jobs whose arguments one page of a text search reads, at most."""
LISTED = (
    Job.id,
    Job.name,
    named_queue().label("queue"),
    Job.tenant,
    Job.state,
    Job.attempts,
    Job.max_attempts,
    Job.created_at,
    Job.finished_at,
)
"""The list's columns: never the arguments, results or tracebacks."""


def _installed() -> Jobs:
    jobs: Jobs = current_app.extensions[EXTENSION_KEY]
    return jobs


@blueprint.get("/jobs")
def jobs() -> Any:
    """Jobs newest first, 50 a page, narrowed by the filter in the query
    arguments; ``before`` (a job id) continues after that job. A filter that
    cannot be used is answered 400 with the form saying what is wrong."""
    queues = Queues(_installed().celery_app)
    session = request_session()
    try:
        chosen = JobFilter.read(request.args)
        after = _cursor(request.args.get("before"))
    except InvalidFilter as exc:
        typed = {key: request.args.get(key, "") for key in FILTER_FIELDS}
        page = _page(queues, JobFilter(), [], None, typed, exc.problems)
        return page, 400
    # The queue is left to _newest, which walks its two halves apart.
    where, text = replace(chosen, queue=None).narrowing(queues, session)
    searched = None if text is None else _searched(queues, chosen, where, text, after)
    if searched is None:
        found = session.execute(_newest(queues, chosen, where, after)).all()
    else:
        found = searched.hits
    rows = [{**row._asdict(), "queue": queues.of(row.name, row.queue)} for row in found[:PAGE_SIZE]]
    older = searched_to = None
    if len(found) > PAGE_SIZE:
        older = _list_url(chosen, before=rows[-1]["id"])
    elif searched is not None and searched.last_id is not None:
        older = _list_url(chosen, before=searched.last_id)
        searched_to = searched.back_to
    return _page(queues, chosen, rows, older, chosen.args(), {}, searched_to)


@dataclass(frozen=True)
class Searched:
    """A page of a text search: the jobs found among the ``SEARCH_WINDOW``
    newest that meet the other filters (from the cursor), and, when all
    those were read, the last of them (the next search starts after it)."""

    hits: Sequence[Any]
    last_id: str | None
    back_to: datetime | None


def _searched(
    queues: Queues,
    chosen: JobFilter,
    where: list[ColumnElement[bool]],
    text: str,
    after: tuple[datetime, str] | None,
) -> Searched:
    """A page of the jobs ``chosen`` finds (``where``) that hold ``text`` in
    their arguments.

    A search reads the arguments of at most ``SEARCH_WINDOW`` jobs a page,
    newest first, so a page costs the same on a ledger of any size; a page
    with fewer finds than it holds links to the next jobs to search.
    """
    session = request_session()
    args, kwargs = cast(Job.args, Text).label("args"), cast(Job.kwargs, Text).label("kwargs")
    columns = (Job.id, Job.created_at, args, kwargs)
    window = _newest(queues, chosen, where, after, SEARCH_WINDOW, columns).subquery()
    hit = holds_text(text, window.c.args, window.c.kwargs)
    newest_first = (window.c.created_at.desc(), window.c.id.desc())
    numbered = select(
        window.c.id,
        window.c.created_at,
        hit.label("hit"),
        func.row_number().over(order_by=newest_first).label("n"),
    ).subquery()
    # The finds, and the last job read if the window was full.
    read = session.execute(
        select(numbered)
        .where(or_(numbered.c.hit, numbered.c.n == SEARCH_WINDOW))
        .order_by(numbered.c.n)
        .limit(PAGE_SIZE + 2)
    ).all()
    found = [row.id for row in read if row.hit]
    listed = select(*LISTED).where(Job.id.in_(found))
    newest = listed.order_by(Job.created_at.desc(), Job.id.desc())
    # No query for no ids: under row-level security PostgreSQL plans an empty
    # IN as a scan of the whole table, and spends tens of ms compiling it (JIT).
    hits = session.execute(newest).all() if found else []
    last = next((row for row in read if row.n == SEARCH_WINDOW), None)
    return Searched(
        hits=hits,
        last_id=last.id if last is not None else None,
        back_to=last.created_at if last is not None else None,
    )


def _newest(
    queues: Queues,
    chosen: JobFilter,
    where: list[ColumnElement[bool]],
    after: tuple[datetime, str] | None,
    limit: int = PAGE_SIZE + 1,
    columns: Sequence[Any] = LISTED,
) -> Select[Any]:
    """The query of a page: ``columns`` of up to ``limit`` jobs meeting
    ``where`` and ``chosen``'s queue, newest first, after the job ``after``
    (its creation and id), one query a state (see :mod:`proj.jobs.listing`)
    and a half of the queue's condition (:meth:`Queues.branches`). A
    canvas's steps are few and found by their own index, in one query."""
    if chosen.canvas is not None:
        if chosen.queue is not None:
            where = [*where, queues.condition(chosen.queue)]
        query = select(*columns).where(*where).order_by(Job.created_at.desc(), Job.id.desc())
        if after is not None:
            query = query.where(tuple_(Job.created_at, Job.id) < after)
        return query.limit(limit)
    return listing.newest(
        columns,
        where,
        limit,
        state=chosen.state,
        after=after,
        branches=queues.branches(chosen.queue) if chosen.queue is not None else ((),),
        leading=[Job.queue] if chosen.queue is not None else [],
    )


def _page(
    queues: Queues,
    chosen: JobFilter,
    rows: list[dict[str, Any]],
    older: str | None,
    typed: dict[str, str],
    problems: dict[str, str],
    searched_to: datetime | None = None,
) -> str:
    return render_template(
        "proj_console/jobs.html",
        filter=chosen,
        searched_to=searched_to,
        search_window=SEARCH_WINDOW,
        typed=typed,
        problems=problems,
        rows=rows,
        older=older,
        paged="before" in request.args,
        states=list(State),
        task_names=queues.task_names(),
        queue_names=queues.names(),
    )


def _cursor(before: str | None) -> tuple[datetime, str] | None:
    """Where the page starts: after the job ``before`` (its creation and id)."""
    if not before:
        return None
    query = select(Job.created_at, Job.id).where(Job.id == before)
    found = request_session().execute(query).one_or_none() if is_job_id(before) else None
    if found is None:
        raise InvalidFilter(
            {"before": "the job this page continued after is gone; start again from the newest"}
        )
    return found.created_at, found.id


@blueprint.post("/jobs/confirm")
def confirm_jobs() -> Any:
    """The confirmation of a bulk action: how many jobs it would touch now."""
    selection = Selection.read(request.form)
    back = _list_url(selection.filter)
    if selection.empty:
        flash("tick the jobs to act on first (or act on every job matching the filter)", "error")
        return redirect(back)
    count, capped = selection.count(request_session(), Queues(_installed().celery_app))
    return render_template(
        "proj_console/confirm.html",
        selection=selection,
        count=count,
        capped=capped,
        limit=bulk.BATCH_LIMIT,
        back=back,
    )


@blueprint.post("/jobs/act")
def act_on_jobs() -> BaseResponse:
    """Carry out a confirmed bulk action and say what it did."""
    selection = Selection.read(request.form)
    back = _list_url(selection.filter)
    if selection.empty:
        flash("tick the jobs to act on first (or act on every job matching the filter)", "error")
        return redirect(back)
    expected = request.form.get("expected", "")
    session = request_session()
    job_ids, capped = selection.pick(session, Queues(_installed().celery_app))
    tally = selection.apply(session, _installed(), job_ids)
    selection.record(session, tally, len(job_ids), capped)
    session.commit()
    revoke.announce(_installed().celery_app, tally.cancelled)
    summary = selection.summary(tally, len(job_ids), capped, whole_number(expected) or 0)
    flash(summary, "message" if tally.done or tally.stopping else "error")
    return redirect(back)


@blueprint.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    """One job: what it runs, where it stands, each attempt's error, its
    timeline; a canvas step's parents, children and canvas, drawn."""
    found = _job_or_404(job_id)
    session = request_session()
    attempts = ledger.attempts_of(session, job_id)
    queues = Queues(_installed().celery_app)
    return render_template(
        "proj_console/job.html",
        job=found,
        queue=queues.of(found.name, (found.options or {}).get("queue")),
        attempts=attempts,
        timeline=timeline(found, attempts),
        worker=found.worker or next((a.worker for a in reversed(attempts) if a.worker), None),
        may_retry=actions.may_retry(found),
        may_cancel=actions.may_cancel(found),
        canvas=canvas_graph.draw(session, found),
        relatives=canvas_graph.relatives(session, found) if found.canvas_id else None,
    )


@blueprint.post("/jobs/<job_id>/retry")
def retry_job(job_id: str) -> BaseResponse:
    """Queue a failed job again; back to its page with what happened."""
    found = _job_or_404(job_id)
    session = request_session()
    try:
        actions.retry(session, _installed(), found)
    except actions.NotActionable as exc:
        session.rollback()
        flash(str(exc), "error")
    else:
        audit.record_request(session, audit.Action.JOB_RETRY, target=job_id)
        session.commit()
        flash(f"job {job_id} is queued again, with a fresh budget of attempts")
    return redirect(url_for(".job", job_id=job_id))


@blueprint.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> BaseResponse:
    """Cancel a waiting or running job; back to its page with what happened."""
    found = _job_or_404(job_id)
    session = request_session()
    try:
        was = actions.cancel(session, found)
    except actions.NotActionable as exc:
        session.rollback()
        flash(str(exc), "error")
    else:
        audit.record_request(session, audit.Action.JOB_CANCEL, target=job_id, detail={"was": was})
        session.commit()
        if was == State.RUNNING:
            flash(
                f"job {job_id} is running: it is asked to stop and ends cancelled at its "
                "next check; a job that never checks finishes normally"
            )
        else:
            revoke.announce(_installed().celery_app, [job_id])
            flash(f"job {job_id} is cancelled; it will never run")
    return redirect(url_for(".job", job_id=job_id))


def _list_url(chosen: JobFilter, before: str | None = None) -> str:
    """The jobs list, filtered by ``chosen`` (after the job ``before``)."""
    args: dict[str, Any] = chosen.args()
    if before is not None:
        args["before"] = before
    return url_for(".jobs", **args)


def _job_or_404(job_id: str) -> Job:
    found = request_session().get(Job, job_id) if is_job_id(job_id) else None
    if found is None:
        raise Refused(404, "not_found", f"no job with id {job_id}")
    return found


@blueprint.app_template_filter("job_time")
def job_time(moment: datetime | None) -> str:
    """A ledger time as the console shows it (UTC, to the second)."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@blueprint.app_template_filter("job_json")
def job_json(value: Any) -> str:
    """A JSON value, indented for a ``<pre>``."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=repr)
