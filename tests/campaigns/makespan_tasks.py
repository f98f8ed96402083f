"""Tasks of ``test_makespan.py``; its worker loads them with ``--include``."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import shared_task

from task_workflow.tasks import throttle


@shared_task(name="campaign.makespan.throttled")
@throttle(concurrency=2, wait=None)
def throttled(i: int, seconds: float = 0.1) -> dict[str, Any]:
    """At most 2 at once; a busy slot is waited for in-process, woken by a release."""
    start = time.time()  # inside the slot: the throttled interval
    time.sleep(seconds)
    return {"i": i, "start": start, "end": time.time(), "pid": os.getpid()}
