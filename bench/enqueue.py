"""Enqueue the workload's tasks the way each variant's users would, and print
the rate and the database work per enqueue as JSON:
``python -m bench.enqueue baseline|proj|proj-full COUNT [INTERVAL]``.

``proj-full`` enqueues each task in a transaction of its own with
``delay_on_commit`` (as a web request would); the others call ``delay()``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from bench import stats
from bench.workload import USERS


def enqueuer(variant: str) -> Callable[[int], object]:
    if variant == "baseline":
        from bench.baseline import touch as plain

        return lambda user_id: plain.delay(user_id, time.time())
    import proj  # noqa: F401  (proj's app becomes the default)
    from bench.proj_touch import touch
    from proj.db import session_scope

    if variant == "proj":
        return lambda user_id: touch.delay(user_id, time.time())

    def on_commit(user_id: int) -> None:
        with session_scope():
            touch.delay_on_commit(user_id, time.time())

    return on_commit


def main() -> None:
    variant, count = sys.argv[1], int(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    send = enqueuer(variant)
    send(0)  # connect first; there is no user 0
    stats.count_database_work()
    stats.counts.clear()
    started = time.perf_counter()
    for n in range(count):
        send(n % USERS + 1)
        if interval:
            time.sleep(interval)
    seconds = time.perf_counter() - started
    print(json.dumps({"count": count, "seconds": seconds, **stats.counts}))


if __name__ == "__main__":
    main()
