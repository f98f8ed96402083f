"""The example tasks: the design note's stop-instance chain, ported to Python 3."""

from __future__ import annotations

import time

from celery import chain, shared_task
from django.conf import settings

from task_workflow.tasks import error_transition, throttle, transition

from . import backend
from .models import Instance


@shared_task(name="example.stop_instance")
@transition(Instance, "begin_stopping")
def stop_instance(instance_uuid: str, transition_entity: Instance | None = None) -> None:
    """online → stopping, then ask the backend to shut down; the callbacks finish the job."""
    # Every task with the transition decorator must accept 'transition_entity'.
    instance = transition_entity
    assert instance is not None
    backend_shutdown.apply_async(
        args=(instance.backend_id,),
        link=stop_instance_succeeded.si(instance_uuid),
        # A failed shutdown moves the instance to erred with the backend's error text.
        link_error=error_transition(Instance, instance_uuid),
    )


@shared_task(name="example.backend_shutdown")
def backend_shutdown(backend_id: str) -> None:
    """The slow backend call."""
    backend.stop(backend_id)


@shared_task(name="example.stop_instance_succeeded")
@transition(Instance, "set_offline")
def stop_instance_succeeded(instance_uuid: str, transition_entity: Instance | None = None) -> None:
    """stopping → offline."""


@shared_task(name="example.start_instance")
@transition(Instance, "begin_starting", on_error="set_erred")
def start_instance(instance_uuid: str, transition_entity: Instance | None = None) -> None:
    """offline → starting → online, calling the backend inline: a failure of the body
    itself moves the instance to erred (``on_error``)."""
    assert transition_entity is not None
    backend.start(transition_entity.backend_id)
    start_instance_succeeded.delay(instance_uuid)


@shared_task(name="example.start_instance_succeeded")
@transition(Instance, "set_online")
def start_instance_succeeded(instance_uuid: str, transition_entity: Instance | None = None) -> None:
    """starting → online."""


# The design note's second example: throttle and route heavy tasks.

#: Every entity of this example lives on one cloud region: the key that serialises calls.
REGION = "region-1"


def key_by_uuid(uuid: object) -> str:
    """The throttle key of an entity: the backend region it lives on."""
    return REGION


@shared_task(name="example.demo")
def demo(uuid: int = 0) -> None:
    """This whole task will be partially throttled by its "slow/dangerous" part."""
    chain(
        slow.si(uuid),
        fast.si(uuid),
        dangerous.si(uuid),
    )()


# Place task into a separate queue for heavy tasks
@shared_task(name="example.slow", is_heavy_task=True)
def slow(uuid: int = 0) -> None:
    # Run only one task at a time
    # It will be throttled based on task name and key pair
    throttle_key = key_by_uuid(uuid)
    with throttle(key=throttle_key):
        print(f"** Start {uuid}")
        time.sleep(settings.EXAMPLE_SLOW_SECONDS)
        print(f"** End {uuid}")


@shared_task(name="example.dangerous")
@throttle(concurrency=3)
def dangerous(uuid: int = 0) -> None:
    print(f"** Dangerous {uuid}")


@shared_task(name="example.fast")
def fast(uuid: int) -> None:
    print(f"** Fast {uuid}")
