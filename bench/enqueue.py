"""Enqueue the workload's tasks the way each variant's users would, and print
the rate as JSON: ``python -m bench.enqueue baseline|proj COUNT [INTERVAL]``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.workload import USERS


def task_for(variant: str) -> Any:
    if variant == "baseline":
        from bench.baseline import touch
    else:
        import proj  # noqa: F401  (proj's app becomes the default)
        from bench.proj_touch import touch
    return touch


def main() -> None:
    variant, count = sys.argv[1], int(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    touch = task_for(variant)
    touch.delay(0, time.time())  # connect first; there is no user 0
    started = time.perf_counter()
    for n in range(count):
        touch.delay(n % USERS + 1, time.time())
        if interval:
            time.sleep(interval)
    seconds = time.perf_counter() - started
    print(json.dumps({"count": count, "seconds": seconds}))


if __name__ == "__main__":
    main()
