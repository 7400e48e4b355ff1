"""The audit trail's own logic on a SQLite file, without servers: what an
entry keeps (text cut to its column, any detail as JSON), pages newest
first by tenant, pruning by age, and who a request acts as."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from flask import Flask, g
from sqlalchemy import Engine, create_engine, update
from sqlalchemy.orm import Session

from proj.jobs import audit
from proj.jobs.audit import AUDIT, Action, AuditEntry


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = create_engine(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    AUDIT.create(made)
    yield made
    made.dispose()


def test_an_entry_keeps_what_its_columns_hold(engine: Engine) -> None:
    when = datetime(2025, 1, 31, 9, 30, tzinfo=UTC)
    audit.record(
        engine,
        Action.JOB_CANCEL,
        actor="account:" + "a" * 500,
        target="j" * 500,
        address="x" * 100,
        detail={"was": "queued", "when": when, "ids": ("a", "b")},
    )
    audit.record(engine, Action.SIGN_OUT, actor="account:b@example.com", detail={})
    with Session(engine) as session:
        cut, plain = audit.page(session, 10).entries[::-1]
    assert (len(cut.actor), len(cut.target or ""), len(cut.address or "")) == (400, 400, 64)
    assert cut.detail == {"was": "queued", "when": repr(when), "ids": ["a", "b"]}
    assert cut.action == "job.cancel" and cut.at.tzinfo is not None
    assert plain.detail is None and plain.target is None


def test_pages_run_newest_first_within_a_tenant(engine: Engine) -> None:
    for n in range(5):
        audit.record(engine, Action.JOB_RETRY, actor="token:a", target=f"a{n}", tenant="a")
        audit.record(engine, Action.JOB_RETRY, actor="token:n", target=f"n{n}")
    seen: list[str | None] = []
    before = None
    with Session(engine) as session:
        while True:
            found = audit.page(session, 2, before, audit.of_tenant("a"))
            seen += [entry.target for entry in found.entries]
            if found.older is None:
                break
            before = found.older
        nobodys = audit.page(session, 100, None, audit.of_tenant(None)).entries
    assert seen == ["a4", "a3", "a2", "a1", "a0"]
    assert [entry.target for entry in nobodys] == ["n4", "n3", "n2", "n1", "n0"]


def test_prune_deletes_what_was_written_before_the_cutoff(engine: Engine) -> None:
    audit.record(engine, Action.TOKEN_ADD, actor=audit.CLI, target="old")
    audit.record(engine, Action.TOKEN_ADD, actor=audit.CLI, target="new")
    cutoff = datetime.now(UTC) - timedelta(days=30)
    with Session(engine) as session:
        session.execute(
            update(AuditEntry)
            .where(AuditEntry.target == "old")
            .values(at=cutoff - timedelta(seconds=1))
        )
        assert audit.prune(session, cutoff) == 1
        session.commit()
        assert [entry.target for entry in audit.page(session, 10).entries] == ["new"]


def test_a_request_acts_as_its_token_else_its_account_else_nobody() -> None:
    app = Flask(__name__)
    with app.test_request_context():
        assert audit.requester() == audit.ANONYMOUS
        g.console_account = SimpleNamespace(email="ops@example.com")
        assert audit.requester() == "account:ops@example.com"
        g.proj_token = SimpleNamespace(name="deploy-bot", tenant=None)
        assert audit.requester() == "token:deploy-bot"
