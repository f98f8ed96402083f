"""The transition guard under Celery's retry and redelivery machinery, on a real
``celery worker`` (prefork), Redis and PostgreSQL.

Each case failed on the first version: a ``bind=True`` + ``autoretry_for`` task erred its
entity on the first transient error and its retry was refused by its own transition; a
message redelivered after its worker process died (``acks_late``) failed its own
transition and left the entity stuck in ``updating``.
"""

from __future__ import annotations

import pytest
from django.db import connection

from task_workflow.models import TransitionRecord
from task_workflow.tasks import TransitionOrigin, apply_transition, throttle
from tests.testapp import guard_tasks
from tests.testapp.models import BodyRun, Volume
from tests.testapp.throttle_tasks import recorder
from tests.workers import HANG_TIMEOUT, TaskEvents

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

S = Volume.States
TIMEOUT = HANG_TIMEOUT


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
    # The worker's main process may handle the success (pool process B) before the
    # second retry (pool process A) that led to it, so the retried event can come last.
    task_events.wait_for_id(result.id, ("task-retried",), count=2, timeout=TIMEOUT)
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


# -- PostgreSQL connection killed mid-transition ------------------------------------------------


def kill_backend_when_paused(volume: Volume, transition_name: str) -> None:
    """Wait until the worker paused inside ``transition_name`` (row locked, state changed
    in memory, not saved), terminate its PostgreSQL session, then let it go on."""
    channel = f"tw-test:pgkill:{volume.uuid}:{transition_name}"
    popped = recorder().blpop([f"{channel}:pid"], timeout=TIMEOUT)
    assert popped is not None, f"the worker never paused in {transition_name}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [int(popped[1])])
        assert cursor.fetchone() == (True,)
    recorder().rpush(f"{channel}:go", "1")


def later_tasks_succeed(task_events: TaskEvents, count: int = 4) -> None:
    """Tasks sent after the kill run on fresh connections (every pool process)."""
    volumes = [Volume.objects.create(state=S.UPDATE_SCHEDULED) for _ in range(count)]
    results = [guard_tasks.update_then_fail.apply_async(args=(str(v.uuid), False)) for v in volumes]
    for result in results:
        assert task_events.wait_for_id(result.id, timeout=TIMEOUT)["type"] == "task-succeeded"
    assert {stored(v) for v in volumes} == {(S.UPDATING, "")}


def test_connection_killed_during_the_transition_applies_nothing_and_fails_clearly(task_events: TaskEvents):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, size=7001)
    result = guard_tasks.update_then_fail.apply_async(args=(str(volume.uuid), False))
    kill_backend_when_paused(volume, "begin_updating")

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    assert "OperationalError" in final["exception"] or "InterfaceError" in final["exception"], final
    assert stored(volume) == (S.UPDATE_SCHEDULED, "")
    assert history(volume) == []
    later_tasks_succeed(task_events)


def test_connection_killed_during_the_error_transition_keeps_the_original_error(task_events: TaskEvents):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, size=7002)
    result = guard_tasks.update_then_fail.apply_async(args=(str(volume.uuid), True))
    kill_backend_when_paused(volume, "set_erred")

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    assert "TransientBackendError" in final["exception"], final  # the body's error, not the database's
    assert stored(volume) == (S.UPDATING, "")  # the error transition did not half-apply
    assert [name for name, _ in history(volume)] == ["begin_updating"]
    later_tasks_succeed(task_events)


# -- ABA: a re-queued message after the entity left and came back to the same state ----------


def test_a_requeued_message_is_refused_after_the_entity_came_back_to_its_state(task_events: TaskEvents):
    """The message applies ``begin_updating`` and is re-queued by a busy slot; meanwhile
    other tasks take the volume ``updating → erred → update_scheduled → updating``. The
    same state name, another application: the old message must not run its body again
    (the first version compared state names only, and did)."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    key = str(volume.uuid)
    task = guard_tasks.update_then_throttled
    holder = throttle(name=task.name, key=key, ttl=30).acquire()
    try:
        result = task.apply_async(args=(key,))
        task_events.wait_for_id(result.id, ("task-retried",), timeout=TIMEOUT)
        other = TransitionOrigin("tests.other_task", "other-task-id")
        for name in ("set_erred", "schedule_updating", "begin_updating"):
            apply_transition(Volume, volume.uuid, name, origin=other)
    finally:
        holder.release()

    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    assert "come back to" in final["exception"], final
    assert body_runs(task.name, volume) == 1
    assert stored(volume) == (S.UPDATING, "")
    assert [name for name, _ in history(volume)] == [
        "begin_updating",
        "set_erred",
        "schedule_updating",
        "begin_updating",
    ]
