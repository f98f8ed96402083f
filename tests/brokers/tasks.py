"""Tasks of the broker-restart scenario (``celery worker -I tests.brokers.tasks``).

Each body writes a ``BodyRun`` row keyed by its *task id* (``entity_uuid``; the scenario
chooses every id, link callbacks included) when it starts and another when it is done, so
the test counts runs in PostgreSQL, which the broker restart does not touch: Celery's
events go through the broker and are lost while it is down. A task that fails (e.g. a
redelivered transition refused) writes a ``failed:<exception type>`` row instead.
"""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task
from celery.signals import task_failure

from task_workflow.tasks import transition
from tests.testapp.models import BodyRun, Volume

STARTED, DONE, FAILED = "started", "done", "failed:"
PREFIX = "tests.brokers."


def record_run(task: Any, what: str, task_id: str | None = None) -> None:
    BodyRun.objects.create(task=task.name, entity_uuid=task_id or task.request.id, state_seen=what[:64])


@shared_task(name=f"{PREFIX}record", bind=True)
def record(self: Any, seconds: float) -> str:
    """A plain task: works ``seconds``."""
    record_run(self, STARTED)
    time.sleep(seconds)  # the work; long enough that tasks are running when the broker goes
    record_run(self, DONE)
    return str(self.request.id)


@shared_task(name=f"{PREFIX}begin_update", bind=True)
@transition(Volume, "begin_updating", on_error="set_erred")
def begin_update(self: Any, volume_uuid: str, seconds: float, transition_entity: Any = None) -> str:
    """The first step of a chain (update_scheduled → updating); its ``link`` is ``finish_update``."""
    record_run(self, STARTED)
    time.sleep(seconds)
    record_run(self, DONE)
    return str(transition_entity.state)


@shared_task(name=f"{PREFIX}finish_update", bind=True)
@transition(Volume, "set_ok")
def finish_update(self: Any, volume_uuid: str, transition_entity: Any = None) -> str:
    """The last step (updating → ok), published by the worker when ``begin_update`` succeeded."""
    record_run(self, STARTED)
    record_run(self, DONE)
    return str(transition_entity.state)


@task_failure.connect(weak=False, dispatch_uid="tests-brokers-failure")
def _record_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    if sender is not None and sender.name.startswith(PREFIX):
        record_run(sender, f"{FAILED}{type(exception).__name__}", task_id)
