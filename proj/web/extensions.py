"""The Flask extensions the web tier uses."""

from __future__ import annotations

from flask import has_app_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Session

from proj.db import Base
from proj.outbox import register_session_finder

db = SQLAlchemy(model_class=Base)
"""Flask-SQLAlchemy on proj's ``Base``: the web tier's engine, pool and
request-scoped ``db.session``, separate from the worker tier's."""


def _request_session() -> Session | None:
    return db.session() if has_app_context() else None


# ``delay_on_commit`` in a view enqueues in the view's transaction.
register_session_finder(_request_session)
