"""Celery's settings for proj, under the name Celery looks for by convention.

The settings live in ``proj.celeryconfig``, which is what ``celery -A proj``
loads. This module re-exports them, in a checkout only (the distribution ships
nothing at the top level of ``site-packages`` but ``proj``), for what expects
Celery's conventional top-level ``celeryconfig``: an app configured with
``config_from_object("celeryconfig")`` as Celery's first-steps guide does, or
Celery's default loader (``CELERY_CONFIG_MODULE``, whose default is this name).
Change the settings in ``proj/celeryconfig.py``, never here.
"""

from __future__ import annotations

from proj.celeryconfig import *  # noqa: F403 (every setting, whatever is added there)
