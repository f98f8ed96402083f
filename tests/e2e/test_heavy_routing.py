"""Heavy tasks reach the heavy queue's worker, on real workers: the session's
``example_worker`` consumes only ``celery`` (the default queue), a second worker only
``TASK_WORKFLOW['HEAVY_QUEUE']``. Task events say which worker received and ran each
task (their ``hostname``).

The example's ``demo`` chains run end to end as in ``make demo``: the heavy worker
records its slot signals (``TW_TEST_SLOT_LOG_KEY``, see tests/testapp/throttle_tasks.py)
so the test can check that the two ``slow`` bodies held their one slot in turn.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from example_project.tasks import demo, fast, slow
from task_workflow.conf import get_setting
from tests.testapp.throttle_tasks import SLOT_LOG_ENV, max_overlap, read_records
from tests.workers import HANG_TIMEOUT, TaskEvents, WorkerProcess, start_workers

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

TIMEOUT = HANG_TIMEOUT
#: Seconds the heavy worker's ``slow`` body holds its slot (EXAMPLE_SLOW_SECONDS).
SLOW_SECONDS = 0.5


@pytest.fixture(scope="module")
def slot_log_key() -> str:
    return f"tw-test:slots:{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def heavy_worker(celery_app, task_events, worker_env, module_workers, slot_log_key) -> WorkerProcess:
    """A worker of the heavy queue only (2 processes: two ``slow`` tasks can run at
    once, so only the throttle keeps them apart)."""
    env = {**worker_env, "EXAMPLE_SLOW_SECONDS": str(SLOW_SECONDS), SLOT_LOG_ENV: slot_log_key}
    (worker,) = start_workers(
        WorkerProcess(celery_app, env=env, name="heavy", queues=(get_setting("HEAVY_QUEUE"),), concurrency=2)
    )
    module_workers.append(worker)
    return worker


@pytest.fixture
def workers(example_worker, heavy_worker) -> tuple[WorkerProcess, WorkerProcess]:
    """(default, heavy)."""
    assert tuple(example_worker.queues) == ("celery",)
    return example_worker, heavy_worker


def entity() -> int:
    """A fresh argument, so this test's tasks are told apart in the session's events."""
    return random.randrange(10**8, 10**9)


def received_by(task_events: TaskEvents, task_id: str) -> set[str]:
    return {e["hostname"] for e in task_events.history(task_id) if e["type"] == "task-received"}


def test_heavy_tasks_run_on_the_heavy_worker_and_others_on_the_default_one(workers, task_events):
    default, heavy = workers
    n = entity()

    sent_slow = slow.delay(n)
    sent_fast = fast.delay(n)
    # An explicit queue on the call wins over the heavy-task router.
    pinned = slow.apply_async(args=(n + 1,), queue="celery")

    done = {
        task_id: task_events.wait_for_id(task_id, timeout=TIMEOUT) for task_id in (sent_slow.id, sent_fast.id)
    }
    done[pinned.id] = task_events.wait_for_id(pinned.id, timeout=TIMEOUT)
    assert {event["type"] for event in done.values()} == {"task-succeeded"}, done

    assert received_by(task_events, sent_slow.id) == {heavy.hostname}
    assert done[sent_slow.id]["hostname"] == heavy.hostname
    assert received_by(task_events, sent_fast.id) == {default.hostname}
    assert done[sent_fast.id]["hostname"] == default.hostname
    assert received_by(task_events, pinned.id) == {default.hostname}
    assert done[pinned.id]["hostname"] == default.hostname


def slot_holds(records: list[dict[str, Any]], group: str) -> list[tuple[float, float]]:
    """(acquired, released) per token of ``group``, from the slot-signal records."""
    acquired = {r["token"]: r["at"] for r in records if r["group"] == group and r["action"] == "acquired"}
    released = {r["token"]: r["at"] for r in records if r["group"] == group and r["action"] == "released"}
    assert set(acquired) == set(released), "a slot acquired but never released (or the reverse)"
    return sorted((acquired[token], released[token]) for token in acquired)


def test_two_demo_chains_take_turns_on_the_slow_slot_and_both_finish(workers, task_events, slot_log_key):
    """``demo`` -> slow (heavy queue, one per region) -> fast -> dangerous, twice at once:
    both chains finish, each slow body on the heavy worker, the two holding the
    ``example.slow[region-1]`` slot one after the other, though both ran at once."""
    default, heavy = workers
    first, second = entity(), entity()
    already = len(read_records(slot_log_key))

    demo.delay(first)
    demo.delay(second)

    for n in (first, second):
        finished = task_events.wait_for("example.dangerous", args_contain=str(n), timeout=TIMEOUT)
        assert finished.succeeded, finished
        assert finished.hostname == default.hostname
        assert task_events.wait_for("example.fast", args_contain=str(n), timeout=TIMEOUT).succeeded
    slow_runs = [
        task_events.wait_for("example.slow", args_contain=str(n), timeout=TIMEOUT) for n in (first, second)
    ]
    assert {run.hostname for run in slow_runs} == {heavy.hostname}
    assert all(run.succeeded for run in slow_runs), slow_runs

    holds = slot_holds(read_records(slot_log_key)[already:], "example.slow[region-1]")
    assert len(holds) == 2, holds
    assert max_overlap(holds) == 1, f"the two slow bodies held the region's one slot at once: {holds}"
    # Non-vacuous: the second slow task had started (on the other pool process) while
    # the first still held the slot, so it waited for it.
    started = sorted(
        next(e["timestamp"] for e in task_events.history(run.uuid) if e["type"] == "task-started")
        for run in slow_runs
    )
    assert started[1] < holds[0][1], "the two slow tasks never ran at once: nothing to throttle"
