from __future__ import annotations

from celery import Celery
from sqlalchemy import select

import proj.testing
from proj.db import session_scope
from proj.models import User
from proj.tasks import send_welcome


def test_welcome_runs_on_worker(purged: Celery) -> None:
    with session_scope() as session:
        user = User(email="smoke@example.com")
        session.add(user)
        session.flush()
        user_id = user.id
    with proj.testing.worker(purged, pool="threads", concurrency=2):
        send_welcome.delay(user_id)

        def welcomed() -> bool:
            with session_scope() as session:
                return session.scalar(select(User.welcomed_at).filter_by(id=user_id)) is not None

        proj.testing.wait_for(welcomed)
    assert proj.testing.checked_out() == 0
