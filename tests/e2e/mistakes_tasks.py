"""Tasks of the mistake tests on real workers (imported by the workers of
``tests.e2e.mistakes_settings`` through ``CELERY_IMPORTS``). They run on the queue
:data:`QUEUE`, which only those workers consume."""

from __future__ import annotations

from celery import shared_task

from task_workflow.tasks import transition
from tests.testapp.models import Volume

#: The queue of these tasks: the session's example worker does not know them.
QUEUE = "mistakes"


@shared_task(name="tests.mistakes.update_volume")
@transition(Volume, "begin_updating")
def update_volume(volume_uuid: str, transition_entity: Volume | None = None) -> str:
    """update_scheduled → updating; a second message for the same volume is refused."""
    return str(volume_uuid)


@shared_task(name="tests.mistakes.update_volume_or_drop")
@transition(Volume, "begin_updating", if_not_permitted="ignore")
def update_volume_or_drop(volume_uuid: str, transition_entity: Volume | None = None) -> str:
    """As :func:`update_volume`, but a refused message is dropped silently."""
    return str(volume_uuid)
