"""The example project's task chains on a real ``celery worker`` (prefork), Redis and
PostgreSQL.

Each test commits its rows (``transaction=True``) so the worker's own connection sees
them, sends the first task from this process, and waits for the Celery *event* of the
task that ends the story (never a sleep). Task events are matched by the entity's uuid
(or a unique backend id) in the task's arguments, so the session-wide event stream of
one shared worker serves every test.
"""

from __future__ import annotations

import uuid

import pytest

from example_project.backend import FAILING_PREFIX
from example_project.models import Instance
from example_project.tasks import start_instance, stop_instance
from tests.workers import HANG_TIMEOUT

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

States = Instance.States

#: Upper bound for a chain that takes a few tenths of a second (backend delay 0.2 s).
TIMEOUT = HANG_TIMEOUT


@pytest.fixture(autouse=True)
def _worker(example_worker):
    """Every test here runs against the session's real worker."""
    return example_worker


def stored(instance: Instance) -> tuple[str, str]:
    """(state, error_message) as committed in the database."""
    return Instance.objects.values_list("state", "error_message").get(pk=instance.pk)


def failing_backend_id() -> str:
    return f"{FAILING_PREFIX}i-{uuid.uuid4().hex[:8]}"


def test_stop_instance_chain_ends_offline(task_events):
    """online -> stopping (stop_instance) -> backend call -> offline (link callback)."""
    instance = Instance.objects.create(name="vm-ok", backend_id="i-123", state=States.ONLINE)
    instance_uuid = str(instance.uuid)

    stop_instance.delay(instance_uuid)

    done = task_events.wait_for(
        "example.stop_instance_succeeded", args_contain=instance_uuid, timeout=TIMEOUT
    )
    assert done.succeeded, done
    first = task_events.wait_for("example.stop_instance", args_contain=instance_uuid, timeout=TIMEOUT)
    assert first.succeeded, first
    assert stored(instance) == (States.OFFLINE, "")


def test_failed_backend_call_moves_the_instance_to_erred_with_the_error_text(task_events):
    """The backend call fails: the errback (run in the worker before it reports the
    failure) moves the instance to erred with the backend's error text."""
    backend_id = failing_backend_id()
    instance = Instance.objects.create(name="vm-fail", backend_id=backend_id, state=States.ONLINE)
    instance_uuid = str(instance.uuid)

    stop_instance.delay(instance_uuid)

    failed = task_events.wait_for("example.backend_shutdown", args_contain=backend_id, timeout=TIMEOUT)
    assert failed.failed, failed
    assert "quota exceeded" in (failed.exception or ""), failed
    state, error_message = stored(instance)
    assert state == States.ERRED
    assert "quota exceeded" in error_message
    assert backend_id in error_message
    assert error_message.startswith("BackendError: "), error_message
    # The success callback is linked to success only: it was never sent.
    assert task_events.received("example.stop_instance_succeeded", args_contain=instance_uuid) == []


def test_start_instance_body_failure_moves_the_instance_to_erred(task_events):
    """start_instance calls the backend in its own body: on_error="set_erred" records
    the error, then the task fails."""
    backend_id = failing_backend_id()
    instance = Instance.objects.create(name="vm-boot-fail", backend_id=backend_id, state=States.OFFLINE)
    instance_uuid = str(instance.uuid)

    start_instance.delay(instance_uuid)

    failed = task_events.wait_for("example.start_instance", args_contain=instance_uuid, timeout=TIMEOUT)
    assert failed.failed, failed
    assert "BackendError" in (failed.exception or ""), failed
    state, error_message = stored(instance)
    assert state == States.ERRED
    assert error_message == f"BackendError: backend refused to start {backend_id}: quota exceeded"
    assert task_events.received("example.start_instance_succeeded", args_contain=instance_uuid) == []


def test_start_instance_chain_ends_online(task_events):
    """offline -> starting (start_instance, backend called inline) -> online."""
    instance = Instance.objects.create(name="vm-boot", backend_id="i-456", state=States.OFFLINE)
    instance_uuid = str(instance.uuid)

    start_instance.delay(instance_uuid)

    done = task_events.wait_for(
        "example.start_instance_succeeded", args_contain=instance_uuid, timeout=TIMEOUT
    )
    assert done.succeeded, done
    assert stored(instance) == (States.ONLINE, "")


def test_a_transition_from_the_wrong_state_is_refused_and_changes_nothing(task_events):
    """Stopping an offline instance: the worker refuses the transition, the task fails,
    the body never runs (no backend call is sent) and the row is untouched."""
    instance = Instance.objects.create(name="vm-off", backend_id="i-789", state=States.OFFLINE)
    instance_uuid = str(instance.uuid)

    stop_instance.delay(instance_uuid)

    failed = task_events.wait_for("example.stop_instance", args_contain=instance_uuid, timeout=TIMEOUT)
    assert failed.failed, failed
    assert "TransitionNotPermitted" in (failed.exception or ""), failed
    assert "'begin_stopping' is not allowed from state 'offline'" in (failed.exception or ""), failed
    assert stored(instance) == (States.OFFLINE, "")
    assert task_events.received("example.backend_shutdown", args_contain="i-789") == []
