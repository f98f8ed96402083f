"""Throttled tasks keep the limit and leave no slot idle: 40 tasks of 100 ms under
``@throttle(concurrency=2, wait=None)`` on a real prefork worker with 4 processes.

Two processes hold the slots, the other two wait in-process and are woken by a release,
so the makespan (last finish - first start, inside the slots) should be close to the ideal
tasks x seconds / 2 (2.0 s): efficiency = ideal / makespan >= 0.9
(``CAMPAIGN_MAKESPAN_EFFICIENCY``), and never more than 2 intervals overlap.
``CAMPAIGN_MAKESPAN_TASKS`` (40) sets the size. The worker is stopped when the test ends,
also when it fails.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.workers import WorkerProcess

pytestmark = [pytest.mark.campaign, pytest.mark.services, pytest.mark.django_db(transaction=True)]

TASKS = int(os.environ.get("CAMPAIGN_MAKESPAN_TASKS", "40"))
SECONDS = 0.1
SLOTS, PROCESSES = 2, 4
EFFICIENCY = float(os.environ.get("CAMPAIGN_MAKESPAN_EFFICIENCY", "0.9"))
QUEUE = "campaign_makespan"
TASK = "campaign.makespan.throttled"


class MakespanWorker(WorkerProcess):
    @property
    def command(self) -> list[str]:
        return [*super().command, "--include", "tests.campaigns.makespan_tasks"]


def max_overlap(results: list[dict[str, Any]]) -> int:
    # At equal instants ends (-1) sort before starts (+1): back to back is not overlap.
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def run_batch(app: Any, count: int, seconds: float) -> list[dict[str, Any]]:
    from celery import group

    batch = group([app.signature(TASK, args=(i, seconds), queue=QUEUE) for i in range(count)], app=app)
    return batch.apply_async().get(timeout=60 + count * seconds * 20)


def test_throttled_tasks_fill_their_slots(celery_app, worker_env, module_workers):
    worker = MakespanWorker(
        celery_app, env=worker_env, name="makespan", queues=(QUEUE,), concurrency=PROCESSES
    )
    module_workers.append(worker)
    worker.start()
    run_batch(celery_app, PROCESSES * 4, 0.02)  # warm every pool process up
    results = run_batch(celery_app, TASKS, SECONDS)
    makespan = max(r["end"] for r in results) - min(r["start"] for r in results)
    ideal = TASKS * SECONDS / SLOTS
    overlap = max_overlap(results)
    print(
        f"{TASKS} tasks x {SECONDS * 1000:g} ms, concurrency {SLOTS}, {PROCESSES} processes: makespan "
        f"{makespan:.3f} s, ideal {ideal:.3f} s, efficiency {ideal / makespan:.3f}, max overlap {overlap}, "
        f"pool processes used {len({r['pid'] for r in results})}"
    )
    assert overlap <= SLOTS
    assert ideal / makespan >= EFFICIENCY
