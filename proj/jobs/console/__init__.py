"""The operations console: a Flask blueprint to mount in your own app, once
``jobs.init_app(flask_app, db)`` has run and ``SECRET_KEY`` is set::

    flask_app.register_blueprint(proj.jobs.console.blueprint, url_prefix="/dashboard")

Pages: the overview, the jobs (filters, bulk actions), a job, periodic tasks,
workers, API tokens and the audit trail (:mod:`proj.jobs.audit`). Console
accounts are made with ``proj admin add`` (see :mod:`proj.jobs.auth`); the
frame (sign-in, roles, CSRF, headers) is :mod:`proj.jobs.console.site`.
"""

from __future__ import annotations

from proj.jobs.console import jobs, overview  # noqa: F401  (their pages join the blueprint)
from proj.jobs.console.site import blueprint

__all__ = ["blueprint"]
