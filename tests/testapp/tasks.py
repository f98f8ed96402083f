"""Tasks used by the throttle tests (run on real workers with tests.settings)."""

from __future__ import annotations

import os
import time

from celery import shared_task
from celery.signals import task_prerun
from django.contrib.contenttypes.models import ContentType

from task_workflow.tasks import throttle, transition

from .models import BodyRun, Volume


def _record(task: str, volume: Volume) -> None:
    BodyRun.objects.create(task=task, entity_uuid=volume.uuid, state_seen=volume.state)


@shared_task(name="tests.update_volume_throttle_outside", bind=True, max_retries=0)
@throttle(key="volumes", wait=0)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_volume_throttle_outside(self, volume_uuid: str, hold: float = 0.0, transition_entity=None) -> int:
    """throttle wraps transition: a busy slot re-queues before the transition."""
    _record(self.name, transition_entity)
    time.sleep(hold)
    return os.getpid()


@shared_task(name="tests.update_volume_throttle_inside", bind=True, max_retries=0)
@transition(Volume, "begin_updating", on_error="set_erred")
@throttle(key="volumes", wait=0)
def update_volume_throttle_inside(self, volume_uuid: str, hold: float = 0.0, transition_entity=None) -> int:
    """transition wraps throttle: the transition is applied, then the slot is busy."""
    _record(self.name, transition_entity)
    time.sleep(hold)
    return os.getpid()


@shared_task(name="tests.hold_slot")
def hold_slot(name: str, key: str, seconds: float, concurrency: int = 1) -> int:
    """Hold a slot of (name, key) for a while, like a long backend call."""
    with throttle(key=key, name=name, concurrency=concurrency, wait=None):
        time.sleep(seconds)
    return os.getpid()


from . import guard_tasks, throttle_tasks  # noqa: E402,F401


@task_prerun.connect(weak=False)
def _forget_content_types(task=None, **_: object) -> None:
    """Test workers outlive database flushes between tests, which recreate content types
    with new ids: forget cached ids so transition records point at existing rows."""
    if task is not None and not task.request.is_eager:
        ContentType.objects.clear_cache()
