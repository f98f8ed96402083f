"""The transition guard under Celery's retry and redelivery machinery, on a real
``celery worker`` (prefork), Redis and PostgreSQL.

Each case failed on the first version: a ``bind=True`` + ``autoretry_for`` task erred its
entity on the first transient error and its retry was refused by its own transition; a
message redelivered after its worker process died (``acks_late``) failed its own
transition and left the entity stuck in ``updating``.
"""

from __future__ import annotations

import pytest

from task_workflow.models import TransitionRecord
from tests.testapp import guard_tasks
from tests.testapp.models import BodyRun, Volume
from tests.workers import TaskEvents

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

S = Volume.States
TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _worker(example_worker):
    return example_worker


def history(volume: Volume) -> list[tuple[str, str]]:
    """(transition, error text) of every record of ``volume``, oldest first."""
    records = TransitionRecord.objects.for_entity(volume).order_by("created_at", "id")
    return list(records.values_list("transition", "error_message"))


def stored(volume: Volume) -> tuple[str, str]:
    return Volume.objects.values_list("state", "error_message").get(pk=volume.pk)


def body_runs(task_name: str, volume: Volume) -> int:
    return BodyRun.objects.filter(task=task_name, entity_uuid=volume.uuid).count()


def test_autoretry_of_a_bound_task_retries_the_body_with_the_transition_applied_once(task_events: TaskEvents):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = guard_tasks.update_with_autoretry
    result = task.apply_async(args=(str(volume.uuid), 2))

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-succeeded", final
    assert len([e for e in task_events.history(result.id) if e["type"] == "task-retried"]) == 2
    assert body_runs(task.name, volume) == 3
    assert stored(volume) == (S.UPDATING, "")
    assert history(volume) == [("begin_updating", "")], "the transition was applied once, never erred"


def test_autoretry_exhausted_applies_the_error_transition_once_with_the_final_error(task_events: TaskEvents):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = guard_tasks.update_with_autoretry
    result = task.apply_async(args=(str(volume.uuid), 99))

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    assert body_runs(task.name, volume) == 3  # the first run and max_retries=2 retries
    assert stored(volume) == (S.ERRED, "TransientBackendError: backend busy (run 3)")
    assert history(volume) == [
        ("begin_updating", ""),
        ("set_erred", "TransientBackendError: backend busy (run 3)"),
    ]


def test_self_retry_past_its_limit_errs_the_entity_with_the_final_error(task_events: TaskEvents):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = guard_tasks.update_with_self_retry
    result = task.apply_async(args=(str(volume.uuid), 99))

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    assert body_runs(task.name, volume) == 2
    assert stored(volume) == (S.ERRED, "TransientBackendError: backend busy (run 2)")
    assert [name for name, _ in history(volume)] == ["begin_updating", "set_erred"]


def test_a_message_redelivered_after_its_worker_died_resumes_and_its_chain_completes(
    task_events: TaskEvents, example_worker
):
    """``acks_late`` + ``reject_on_worker_lost``: the pool process dies (SIGKILL) after
    the transition committed; the message comes back, recognises from the transition
    history that it applied the transition itself, runs the body again (at least once)
    and the chain completes. The transition is recorded once."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = guard_tasks.update_crashing_once
    result = task.apply_async(args=(str(volume.uuid),), link=guard_tasks.finish_update.si(str(volume.uuid)))

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-succeeded", final
    done = task_events.wait_for("tests.guard.finish_update", args_contain=str(volume.uuid), timeout=TIMEOUT)
    assert done.succeeded, done
    assert body_runs(task.name, volume) == 2
    assert stored(volume) == (S.OK, "")
    assert [name for name, _ in history(volume)] == ["begin_updating", "set_ok"]
    assert example_worker.alive()


def test_another_message_for_an_entity_in_its_transitional_state_is_still_refused(task_events: TaskEvents):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    first = guard_tasks.update_with_autoretry.apply_async(args=(str(volume.uuid), 0))
    assert task_events.wait_for_id(first.id, timeout=TIMEOUT)["type"] == "task-succeeded"

    second = guard_tasks.update_with_autoretry.apply_async(args=(str(volume.uuid), 0))
    final = task_events.wait_for_id(second.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    assert "TransitionNotPermitted" in final["exception"]
    assert stored(volume) == (S.UPDATING, "")
    assert [name for name, _ in history(volume)] == ["begin_updating"]
