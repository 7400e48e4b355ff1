"""The Flask extensions the web tier uses."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy

from proj.db import Base

db = SQLAlchemy(model_class=Base)
"""Flask-SQLAlchemy on proj's ``Base``: the web tier's engine, pool and
request-scoped ``db.session``, separate from the worker tier's."""
