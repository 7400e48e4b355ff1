"""Celery's canvas on the ledger, on every stack with a real worker: every
step a row written in the caller's transaction, released once by its
parents' success (in the same commit), results passed as Celery passes
them, and a failed step stopping what comes after it."""

from __future__ import annotations

from collections import Counter

import pytest
from celery import Celery, chain, chord, group
from flask.testing import FlaskClient
from sqlalchemy import select
from stacks import queue_depth

import proj.jobs.testing
from proj.db import session_scope
from proj.jobs import SqlAlchemyTask, State, TaskArgumentError, enqueue_on_commit, shared_task
from proj.jobs.models import Job

RAN: Counter[str] = Counter()
"""Runs of this module's tasks, by job id (each run that committed)."""
BROKEN: set[str] = set()
"""Labels ``step`` fails for, until the test takes them out."""


@shared_task(name="tests.canvas.add", bind=True, ignore_result=True)
def add(self: SqlAlchemyTask, x: int, y: int) -> int:
    RAN[str(self.request.id)] += 1
    return x + y


@shared_task(name="tests.canvas.total", bind=True, ignore_result=True)
def total(self: SqlAlchemyTask, values: list[int], offset: int = 0) -> int:
    RAN[str(self.request.id)] += 1
    return sum(values) + offset


@shared_task(name="tests.canvas.step", bind=True, ignore_result=True, max_attempts=1)
def step(self: SqlAlchemyTask, given: object, label: str) -> str:
    if label in BROKEN:
        raise RuntimeError(f"step {label} is broken")
    RAN[str(self.request.id)] += 1
    return label


@shared_task(name="tests.canvas.noted", bind=True, ignore_result=True)
def noted(self: SqlAlchemyTask, failed_id: str, label: str) -> str:
    RAN[str(self.request.id)] += 1
    return failed_id


def steps(canvas_id: str) -> list[Job]:
    with session_scope() as session:
        found = list(
            session.scalars(select(Job).where(Job.canvas_id == canvas_id).order_by(Job.id))
        )
        session.expunge_all()
    return found


def finished(canvas_id: str) -> bool:
    return all(
        job.state in (State.SUCCEEDED, State.FAILED, State.CANCELLED) for job in steps(canvas_id)
    )


def by_name(canvas_id: str) -> dict[str, list[Job]]:
    found: dict[str, list[Job]] = {}
    for job in steps(canvas_id):
        found.setdefault(job.name.rpartition(".")[2], []).append(job)
    return found


def test_a_chain_passes_each_result_on_and_runs_each_step_once(purged: Celery) -> None:
    with session_scope() as session:
        canvas_id = enqueue_on_commit(add.s(1, 2) | add.s(3) | add.s(4), session=session)
    waiting = steps(canvas_id)
    assert sorted(job.state for job in waiting) == [State.QUEUED, State.WAITING, State.WAITING]
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: finished(canvas_id), timeout=60)
    done = steps(canvas_id)
    assert {job.state for job in done} == {State.SUCCEEDED}
    assert sorted(job.result for job in done) == [3, 6, 10]
    assert all(RAN[job.id] == 1 for job in done)


def test_a_chord_callback_gets_every_result_in_order_once(purged: Celery) -> None:
    header = [add.s(i, 0) for i in range(12)]
    with session_scope() as session:
        canvas_id = enqueue_on_commit(chord(header, total.s(offset=1000)), session=session)
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=4):
        proj.jobs.testing.wait_for(lambda: finished(canvas_id), timeout=60)
    [callback] = by_name(canvas_id)["total"]
    assert callback.state == State.SUCCEEDED
    assert callback.args == [list(range(12))]
    assert callback.result == sum(range(12)) + 1000
    assert RAN[callback.id] == 1


def test_a_group_then_a_step_is_a_chord_and_immutables_take_no_result(purged: Celery) -> None:
    canvas = chain(add.s(1, 1), group(add.s(10), add.s(20)), total.s(), add.si(5, 5))
    with session_scope() as session:
        canvas_id = enqueue_on_commit(canvas, session=session)
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: finished(canvas_id), timeout=60)
    found = by_name(canvas_id)
    assert found["total"][0].args == [[12, 22]]
    assert sorted(job.result for job in found["add"]) == [2, 10, 12, 22]


def test_a_failed_step_cancels_what_follows_runs_its_errback_and_resumes_when_retried(
    purged: Celery, client: FlaskClient
) -> None:
    """A member that fails for good: the callback never runs, ``link_error``
    runs once with its id, dependents end ``cancelled``. Retried from the
    API, the member succeeds and the canvas completes."""
    label = f"broken-{id(purged)}"
    BROKEN.add(label)
    header = [step.s(None, "a"), step.s(None, label).on_error(noted.s("errback"))]
    with session_scope() as session:
        canvas_id = enqueue_on_commit(
            chord(header, step.s("after") | step.s("last")), session=session
        )
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: finished(canvas_id), timeout=60)
        failed = next(job for job in steps(canvas_id) if job.state == State.FAILED)
        assert failed.args == [None, label]
        cancelled = [job for job in steps(canvas_id) if job.state == State.CANCELLED]
        assert sorted(job.args[-1] for job in cancelled) == ["after", "last"]
        assert all(failed.id in (job.error or "") for job in cancelled)
        [errback] = by_name(canvas_id)["noted"]
        assert (errback.state, errback.args, RAN[errback.id]) == (
            State.SUCCEEDED,
            [failed.id, "errback"],
            1,
        )

        BROKEN.discard(label)
        assert client.post(f"/api/jobs/{failed.id}/retry").status_code == 202
        proj.jobs.testing.wait_for(
            lambda: {job.state for job in steps(canvas_id)} == {State.SUCCEEDED}, timeout=60
        )
    last = next(job for job in steps(canvas_id) if job.args[-1] == "last")
    assert last.args == ["after", "last"] and RAN[last.id] == 1
    assert RAN[errback.id] == 1


def test_a_canvas_rolled_back_leaves_no_row_and_no_message(purged: Celery) -> None:
    with pytest.raises(RuntimeError), session_scope() as session:
        canvas_id = enqueue_on_commit(add.s(1, 2) | add.s(3), session=session)
        raise RuntimeError("rolled back as asked")
    assert steps(canvas_id) == []
    assert queue_depth(purged) == 0


def test_the_api_names_a_steps_canvas_parents_and_children(
    purged: Celery, client: FlaskClient
) -> None:
    with session_scope() as session:
        canvas_id = enqueue_on_commit(add.s(1, 2) | add.s(3), session=session)
    first, second = sorted(steps(canvas_id), key=lambda job: len(job.args), reverse=True)
    shown = client.get(f"/api/jobs/{second.id}").get_json()
    assert (shown["canvas_id"], shown["parents"], shown["children"]) == (
        canvas_id,
        [first.id],
        [],
    )
    listed = client.get(f"/api/jobs?canvas={canvas_id}").get_json()["jobs"]
    assert sorted(job["id"] for job in listed) == sorted([first.id, second.id])
    assert client.post(f"/api/jobs/{first.id}/cancel").status_code == 200
    assert {job.state for job in steps(canvas_id)} == {State.CANCELLED}


def test_a_countdown_on_a_step_that_waits_is_refused(purged: Celery) -> None:
    with pytest.raises(TaskArgumentError, match="countdown cannot go on a step"):
        enqueue_on_commit(add.s(1, 2) | add.s(3).set(countdown=5))


def test_link_and_link_error_on_a_single_job_make_a_canvas(purged: Celery) -> None:
    """``apply_async_on_commit(link=..., link_error=...)`` returns the job's id;
    its success releases the link (with its result), and the errback, not
    needed, ends ``cancelled``."""
    with session_scope() as session:
        job_id = add.apply_async_on_commit(
            (2, 3), link=add.s(10), link_error=noted.s("unused"), session=session
        )
    job = proj.jobs.testing.job(job_id)
    assert job.canvas_id is not None and len(job.graph["children"]) == 1
    with proj.jobs.testing.worker(purged, pool="threads", concurrency=2):
        proj.jobs.testing.wait_for(lambda: finished(str(job.canvas_id)), timeout=60)
    found = by_name(str(job.canvas_id))
    assert sorted(step.result for step in found["add"]) == [5, 15]
    assert found["noted"][0].state == State.CANCELLED
