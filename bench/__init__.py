"""Benchmarks: proj against plain Celery and the physical limits, in one run."""
