"""Tasks of the transition-guard tests (tests/test_transition_guard.py and
tests/e2e/test_transition_guard_e2e.py): Celery's retries, redelivery and re-runs around
``@transition``. Each body records its runs (``BodyRun``) so tests count them across
processes."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import shared_task
from django_fsm.signals import post_transition

from task_workflow.tasks import throttle, transition

from .models import BodyRun, Volume


class TransientBackendError(Exception):
    """What a cloud call raises for a moment (Celery retries it)."""


def _runs(task_name: str, volume: Volume) -> int:
    BodyRun.objects.create(task=task_name, entity_uuid=volume.uuid, state_seen=volume.state)
    return BodyRun.objects.filter(task=task_name, entity_uuid=volume.uuid).count()


@shared_task(
    name="tests.guard.update_with_autoretry",
    bind=True,
    autoretry_for=(TransientBackendError,),
    retry_kwargs={"max_retries": 2, "countdown": 0},
)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_with_autoretry(self: Any, volume_uuid: str, fail_times: int, transition_entity=None) -> int:
    """Fails with a transient error on its first ``fail_times`` runs, then succeeds."""
    runs = _runs(self.name, transition_entity)
    if runs <= fail_times:
        raise TransientBackendError(f"backend busy (run {runs})")
    return runs


@shared_task(name="tests.guard.update_with_self_retry", bind=True, max_retries=1)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_with_self_retry(self: Any, volume_uuid: str, fail_times: int, transition_entity=None) -> int:
    """The body retries itself (``self.retry``) on its first ``fail_times`` runs."""
    runs = _runs(self.name, transition_entity)
    if runs <= fail_times:
        raise self.retry(exc=TransientBackendError(f"backend busy (run {runs})"), countdown=0)
    return runs


@shared_task(name="tests.guard.update_crashing_once", bind=True, acks_late=True, reject_on_worker_lost=True)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_crashing_once(self: Any, volume_uuid: str, transition_entity=None) -> int:
    """Its worker process dies (SIGKILL) in the first run, after the transition committed;
    the redelivered message runs the body again."""
    runs = _runs(self.name, transition_entity)
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs


@shared_task(name="tests.guard.finish_update")
@transition(Volume, "set_ok")
def finish_update(volume_uuid: str, transition_entity=None) -> str:
    return str(transition_entity.state)


# -- the database connection killed mid-transition ----------------------------------------------

#: ``Volume.size`` values that make the transition of that name pause under its row lock
#: (after the state change, before the save) until the test says go.
PAUSE_IN_TRANSITION = {7001: "begin_updating", 7002: "set_erred"}


def _pause_in_transition(sender: Any, instance: Any, name: str, **_: Any) -> None:
    if sender is not Volume or PAUSE_IN_TRANSITION.get(instance.size) != name:
        return
    from django.db import connection

    from .throttle_tasks import recorder

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    channel = f"tw-test:pgkill:{instance.uuid}:{name}"
    recorder().rpush(f"{channel}:pid", str(pid))
    recorder().blpop([f"{channel}:go"], timeout=30)


post_transition.connect(_pause_in_transition, weak=False, dispatch_uid="tw-test-pause-in-transition")


@shared_task(name="tests.guard.update_then_fail")
@transition(Volume, "begin_updating", on_error="set_erred")
def update_then_fail(volume_uuid: str, fail: bool = True, transition_entity=None) -> str:
    if fail:
        raise TransientBackendError("the backend said no")
    return str(transition_entity.state)


# -- Redis (broker and slot store) down mid-body ------------------------------------------------


def _wait_for_row(task_name: str, timeout: float = 60.0) -> None:
    """Poll the database (which stays up) for a row the test writes."""
    deadline = time.monotonic() + timeout
    while not BodyRun.objects.filter(task=task_name).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {task_name!r} row within {timeout}s")
        time.sleep(0.01)


@shared_task(
    name="tests.guard.update_through_an_outage", bind=True, acks_late=True, reject_on_worker_lost=True
)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_through_an_outage(self: Any, volume_uuid: str, transition_entity=None) -> int:
    """On its first run, tells the test it is inside the body, waits until the test has
    stopped Redis, then enters a throttled block (its slot store is that Redis)."""
    runs = _runs(self.name, transition_entity)
    if runs == 1:
        BodyRun.objects.create(task=f"inside:{volume_uuid}", entity_uuid=volume_uuid, state_seen="")
        _wait_for_row(f"go:{volume_uuid}")
    with throttle(key=volume_uuid, ttl=10):
        return runs


# -- a re-queued message whose entity left and came back to the same state (ABA) -------------


@shared_task(name="tests.guard.update_then_throttled", bind=True)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_then_throttled(self: Any, volume_uuid: str, transition_entity=None) -> str:
    """Applies begin_updating, then needs the volume's slot (``wait=0``): a busy slot
    re-queues the message, whose headers say it applied the transition."""
    _runs(self.name, transition_entity)
    with throttle(key=volume_uuid, wait=0, ttl=30):
        return "ran"
