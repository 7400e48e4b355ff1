"""proj.jobs's pytest plugin, loaded in every pytest run where proj is
installed (its ``pytest11`` entry point, named after this module). With
``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load it with
``pytest_plugins = ["proj.jobs.testing.plugin"]`` in your ``conftest.py``
(where it is loaded already, that line does nothing); turn it off with
``-p no:proj.jobs.testing.plugin``.

- ``jobs_celery_app``: the Celery app whose jobs the fixtures below look at
  (Celery's current app; override it in your ``conftest.py``);
- ``enqueued``: the in-memory mode (:func:`proj.jobs.testing.in_memory`) for
  the test's duration: jobs are recorded when their transaction commits,
  never published.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from celery._state import get_current_app

from proj.jobs.testing.memory import InMemoryQueue, in_memory


@pytest.fixture
def jobs_celery_app() -> Celery:
    """The Celery app with proj.jobs installed that the test uses."""
    return get_current_app()


@pytest.fixture
def enqueued(jobs_celery_app: Celery) -> Iterator[InMemoryQueue]:
    """Jobs recorded instead of published, for this test."""
    with in_memory(jobs_celery_app) as queue:
        yield queue
