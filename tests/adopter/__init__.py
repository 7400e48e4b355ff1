"""A small Flask + Celery application that adopts proj.jobs as an outside
application would (it imports nothing of the reference application)."""
