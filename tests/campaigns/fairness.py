"""The waiter processes of ``test_fairness.py`` (spawned: their target must be importable)."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

#: Seconds each waiter holds the slot when its turn comes.
HOLD_EACH = 0.005


def waiter(conn: Connection, env: dict[str, str], name: str, number: int) -> None:
    """Set Django up, say ready, enter ``throttle(name=...)`` when told, report the grant."""
    os.environ.update(env)
    import django

    django.setup()
    from task_workflow.tasks import throttle

    conn.send("ready")
    conn.recv()  # arrive now
    with throttle(name=name, ttl=30, wait=None):
        conn.send((number, time.monotonic_ns()))
        time.sleep(HOLD_EACH)


def kendall_tau(order: list[int]) -> float:
    """Kendall's tau between ``order`` and ``sorted(order)`` (no ties)."""
    n = len(order)
    concordant = sum(1 for i in range(n) for j in range(i + 1, n) if order[i] < order[j])
    pairs = n * (n - 1) // 2
    return (2 * concordant - pairs) / pairs if pairs else 1.0
