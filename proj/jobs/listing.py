"""Jobs newest first, a page at a time, on a ledger of any size: the query
the console's jobs list and the job API share.

Each index that serves a list leads with the column filtered on and then
``state``: ``(state, created_at)``, and ``(tenant | name | queue, state,
created_at, id)``. A page without a state to filter on is one query a state,
merged: each walks its index from the newest (from the cursor) and stops at
the page's size, so a page reads about its own rows whatever else the ledger
holds. ``IS NULL`` leaves a column one value as ``=`` does, but PostgreSQL
does not see it so: each branch is ordered by ``leading`` columns too (one
value within the branch), which lets it walk the index all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, select, tuple_, union_all

from proj.jobs.models import Job, State


def newest(
    columns: Sequence[Any],
    where: Sequence[ColumnElement[bool]],
    limit: int,
    *,
    state: str | None = None,
    after: tuple[datetime, str] | None = None,
    branches: Sequence[Sequence[ColumnElement[bool]]] = ((),),
    leading: Sequence[Any] = (),
) -> Select[Any]:
    """``columns`` of up to ``limit`` jobs meeting ``where`` (and ``state``,
    if given), newest first, after the job ``after`` (its creation and id),
    each in one of ``branches`` (conditions that split the jobs, as a queue's
    kept rows and its older rows do)."""
    if after is not None:
        # The first condition lets the index start at the cursor; the second is exact.
        where = [*where, Job.created_at <= after[0], tuple_(Job.created_at, Job.id) < after]
    order = (*(column.desc() for column in leading), Job.created_at.desc(), Job.id.desc())
    states = [state] if state is not None else list(State)
    parts = [
        select(*columns).where(Job.state == one, *branch, *where).order_by(*order).limit(limit)
        for one in states
        for branch in branches
    ]
    if len(parts) == 1:
        return parts[0]
    merged = union_all(*(select(part.subquery()) for part in parts)).subquery()
    return select(merged).order_by(merged.c.created_at.desc(), merged.c.id.desc()).limit(limit)
