"""proj: the reference application on proj.jobs (users, invoices, charges,
reports), and the commands that run it.

``proj.app`` is the Celery app, so ``celery -A proj worker`` finds it; it is
made on first access, so ``import proj.jobs`` (the library) starts nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from proj.celery import app

        return app
    raise AttributeError(f"module 'proj' has no attribute {name!r}")
