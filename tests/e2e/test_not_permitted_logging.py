"""What a worker logs for an expected refusal and for a row it cannot see, on a real
``celery worker`` (prefork), Redis and PostgreSQL.

- A duplicate message (the entity moved on) ends the task with ``TransitionNotPermitted``
  as before (FAILURE, a chain stops) but is logged as ONE WARNING line naming the entity,
  its state, the transition and the task, with no traceback and not as Celery's "raised
  unexpected" ERROR; its ``link_error=error_transition(...)`` does not move the entity to
  its error state. With ``if_not_permitted="ignore"`` the message is dropped with nothing
  logged by task_workflow above DEBUG (Celery's own INFO lines of every message remain).
- A row created and sent to a task inside one open transaction: the worker's
  ``EntityNotFound`` says the row may not be committed yet and how to send on commit.

On the code before this change, the duplicate was logged "raised unexpected" at ERROR with
a traceback and its errback moved the volume to ``erred``; ``EntityNotFound`` said only
"does not exist".
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.db import transaction

from task_workflow.models import TransitionRecord
from task_workflow.tasks import error_transition
from tests.e2e import mistakes_tasks
from tests.testapp.models import Volume
from tests.waiting import wait_until
from tests.workers import HANG_TIMEOUT, TaskEvents, WorkerProcess

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

S = Volume.States
TIMEOUT = HANG_TIMEOUT
#: A log line above DEBUG, as Celery's worker writes it: ``[time: WARNING/ForkPoolWorker-1]``.
LOUD = re.compile(r": (INFO|WARNING|ERROR|CRITICAL)/")


@pytest.fixture(scope="module")
def mistakes_worker(celery_app, task_events, worker_env) -> Iterator[WorkerProcess]:
    """A worker of the mistakes queue with the tasks of ``tests.e2e.mistakes_tasks``."""
    worker = WorkerProcess(
        celery_app,
        env={**worker_env, "DJANGO_SETTINGS_MODULE": "tests.e2e.mistakes_settings"},
        name="mistakes",
        queues=(mistakes_tasks.QUEUE,),
        concurrency=1,
    )
    worker.start()
    yield worker
    worker.stop()


def log_of_task(worker: WorkerProcess, task_id: str) -> list[str]:
    """The worker's log lines from the moment it received task ``task_id`` on (``[]``
    before it did)."""
    lines = worker.log_path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if task_id in line and " received" in line]
    return lines[starts[0] :] if starts else []


def wait_for_task_log(worker: WorkerProcess, task_id: str, marker: str, what: str) -> list[str]:
    """The worker's log lines from task ``task_id``'s receipt on, once a line of that task
    contains ``marker`` (the task's id is part of every line Celery logs about it)."""

    def lines_with_marker() -> list[str]:
        found = log_of_task(worker, task_id)
        return found if any(task_id in line and marker in line for line in found) else []

    return wait_until(lines_with_marker, TIMEOUT, what)


def first_run(task, volume: Volume, task_events: TaskEvents) -> None:
    result = task.apply_async(args=(str(volume.uuid),), queue=mistakes_tasks.QUEUE)
    assert task_events.wait_for_id(result.id, timeout=TIMEOUT)["type"] == "task-succeeded"


def history(volume: Volume) -> list[str]:
    return list(TransitionRecord.objects.for_entity(volume).values_list("transition", flat=True))


def test_a_refused_duplicate_is_one_warning_line_and_does_not_err_the_entity(
    mistakes_worker: WorkerProcess, task_events: TaskEvents
):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = mistakes_tasks.update_volume
    first_run(task, volume, task_events)

    duplicate = task.apply_async(
        args=(str(volume.uuid),),
        queue=mistakes_tasks.QUEUE,
        link_error=error_transition(Volume, volume.uuid),
    )
    final = task_events.wait_for_id(duplicate.id, timeout=TIMEOUT)
    # The outcome is as before: the task failed with the refusal (a chain stops here).
    assert final["type"] == "task-failed", final
    assert "TransitionNotPermitted" in final["exception"], final
    # Its errback ran in the worker before the failure was announced.
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (S.UPDATING, ""), "the refused duplicate erred the volume"
    assert history(volume) == ["begin_updating"]

    lines = wait_for_task_log(
        mistakes_worker, duplicate.id, "raised", "Celery's log line of the refused task"
    )
    text = "\n".join(lines)
    assert "raised unexpected" not in text, text
    assert "Traceback" not in text, text
    assert not [line for line in lines if re.search(r": (ERROR|CRITICAL)/", line)], text
    warnings = [line for line in lines if ": WARNING/" in line]
    assert len(warnings) == 1, text
    (warning,) = warnings
    for part in (
        "testapp.Volume",
        str(volume.uuid),
        f"volume {volume.uuid}",  # its __str__
        "'updating'",
        "'begin_updating'",
        task.name,
        duplicate.id,
    ):
        assert part in warning, (part, warning)


def test_entity_not_found_in_the_worker_says_the_row_may_not_be_committed(
    mistakes_worker: WorkerProcess, task_events: TaskEvents
):
    """What a view does wrong: create the row and send the task in one transaction. The
    transaction stays open until the worker has failed."""
    with transaction.atomic():
        volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
        task = mistakes_tasks.update_volume
        result = task.apply_async(args=(str(volume.uuid),), queue=mistakes_tasks.QUEUE)
        final = task_events.wait_for_id(result.id, timeout=TIMEOUT)

    assert final["type"] == "task-failed", final
    message = final["exception"]
    assert "EntityNotFound" in message, message
    assert str(volume.uuid) in message, message
    assert "not committed" in message, message
    assert "transaction.on_commit" in message, message
    assert "delay_on_commit" in message, message


def test_with_if_not_permitted_ignore_a_refused_duplicate_is_dropped_with_nothing_logged_above_debug(
    mistakes_worker: WorkerProcess, task_events: TaskEvents
):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = mistakes_tasks.update_volume_or_drop
    first_run(task, volume, task_events)

    duplicate = task.apply_async(
        args=(str(volume.uuid),),
        queue=mistakes_tasks.QUEUE,
        link=mistakes_tasks.update_volume.si(str(volume.uuid)),
        link_error=error_transition(Volume, volume.uuid),
    )
    # Celery's Ignore: acknowledged, no task-succeeded/failed event, no result. Celery logs
    # "ignored" at INFO, as it logs "received" and "succeeded" for every message.
    lines = wait_for_task_log(
        mistakes_worker, duplicate.id, "] ignored", "Celery's 'ignored' line of the dropped task"
    )
    text = "\n".join(lines)
    loud = [line for line in lines if LOUD.search(line)]
    assert [line for line in loud if " received" not in line and "] ignored" not in line] == [], text
    assert "Traceback" not in text, text
    # task_workflow said why, at DEBUG.
    refusal = [line for line in lines if ": DEBUG/" in line and duplicate.id in line and "refused" in line]
    assert len(refusal) == 1, text
    assert "if_not_permitted='ignore'" in refusal[0], refusal

    assert duplicate.state == "PENDING"  # no state update, as Celery's Ignore promises
    events = {e["type"] for e in task_events.history(duplicate.id)}
    assert not events & {"task-succeeded", "task-failed"}, events
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (S.UPDATING, "")
    assert history(volume) == ["begin_updating"], "the link ran, or the errback erred the volume"


def test_the_setting_makes_ignore_the_default_of_every_transition_task(
    mistakes_worker: WorkerProcess, task_events: TaskEvents, worker_env
):
    """``TASK_WORKFLOW['IF_NOT_PERMITTED'] = "ignore"`` drops a refused message of a task
    declared without the option (a worker of its own, with the setting)."""
    worker = WorkerProcess(
        mistakes_worker.app,
        env={
            **worker_env,
            "DJANGO_SETTINGS_MODULE": "tests.e2e.mistakes_settings",
            "MISTAKES_IF_NOT_PERMITTED": "ignore",
        },
        name="mistakes-ignore",
        queues=("mistakes-ignore",),
        concurrency=1,
    ).start()
    try:
        volume = Volume.objects.create(state=S.UPDATING)
        refused = mistakes_tasks.update_volume.apply_async(args=(str(volume.uuid),), queue="mistakes-ignore")
        lines = wait_for_task_log(
            worker, refused.id, "] ignored", "Celery's 'ignored' line of the dropped task"
        )
    finally:
        worker.stop()
    assert not [line for line in lines if ": WARNING/" in line or ": ERROR/" in line], "\n".join(lines)
