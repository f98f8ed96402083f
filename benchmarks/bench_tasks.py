"""Tasks for ``benchmarks/throttle_makespan.py``; its worker loads them with
``--include benchmarks.bench_tasks``. Not part of the library or its tests."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import shared_task

from task_workflow.throttle import throttle


def _work(i: int, seconds: float) -> dict[str, Any]:
    start = time.time()  # inside the slot: the throttled interval
    time.sleep(seconds)
    return {"i": i, "start": start, "end": time.time(), "pid": os.getpid()}


@shared_task(name="bench.throttled")
@throttle(concurrency=2, wait=None)
def throttled(i: int, seconds: float = 0.1) -> dict[str, Any]:
    """At most 2 at once; a busy slot is waited for in-process, woken by a release."""
    return _work(i, seconds)


@shared_task(name="bench.throttled_requeue")
@throttle(concurrency=2, wait=0)
def throttled_requeue(i: int, seconds: float = 0.1) -> dict[str, Any]:
    """At most 2 at once; a busy slot re-queues the task at once (with backoff)."""
    return _work(i, seconds)
