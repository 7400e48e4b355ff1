"""Enqueue the workload's tasks the way each variant's users would, and print
the rate and the database work per enqueue as JSON:
``python -m bench.enqueue baseline|proj|proj-full COUNT [INTERVAL [PER_TRANSACTION]]``.

``proj-full`` enqueues in a session's transaction (``apply_async_on_commit``
with the session given; ``delay_on_commit`` finds a web request's the same
way), one task a transaction unless ``PER_TRANSACTION`` says more; the others
call ``delay()``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from bench import stats
from bench.workload import USERS


def enqueuer(variant: str) -> Callable[[list[int]], object]:
    """Enqueues a task for each user id given (in one transaction, for proj-full)."""
    if variant == "baseline":
        from bench.baseline import touch as plain

        return lambda user_ids: [plain.delay(u, time.time()) for u in user_ids]
    import proj.celery  # noqa: F401  (proj's app becomes the default)
    from bench.proj_touch import touch
    from proj.db import session_scope

    if variant == "proj":
        return lambda user_ids: [touch.delay(u, time.time()) for u in user_ids]
    # proj-full and its variants (proj-full-info, proj-full-observed)

    def on_commit(user_ids: list[int]) -> None:
        with session_scope() as session:  # as a web request's session would be
            for user_id in user_ids:
                touch.apply_async_on_commit((user_id, time.time()), session=session)

    return on_commit


def main() -> None:
    variant, count = sys.argv[1], int(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    per_transaction = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    send = enqueuer(variant)
    send([0])  # connect first; there is no user 0
    stats.count_database_work()
    stats.counts.clear()
    started = time.perf_counter()
    for first in range(0, count, per_transaction):
        send([n % USERS + 1 for n in range(first, min(first + per_transaction, count))])
        if interval:
            time.sleep(interval)
    seconds = time.perf_counter() - started
    print(json.dumps({"count": count, "seconds": seconds, **stats.counts}))


if __name__ == "__main__":
    main()
