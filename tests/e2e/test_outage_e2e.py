"""One Redis as broker, result backend and slot store goes down while a transition body
is inside: an outage, not an error of the entity (real worker, the test's own Redis).

The body's throttle finds the slot store unreachable and fails closed into a re-queue,
which the broker cannot take either. That is no reason to move the entity to ``erred``
(the first version did: the publish error escaped into ``on_error``). The message is
rejected back (``Reject``, control flow); with ``acks_late`` and a Redis that keeps its
writes (``appendonly``), the broker delivers it again after it is back, the redelivery
resumes from the transition history and the chain completes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from celery import Celery

from task_workflow.models import TransitionRecord
from tests.testapp import guard_tasks
from tests.testapp.models import BodyRun, Volume
from tests.workers import RedisServer, WorkerProcess, free_port

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

S = Volume.States
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def outage_redis() -> Iterator[RedisServer]:
    server = RedisServer(free_port(), name="outage", persistent=True).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def outage_app(outage_redis) -> Iterator[Celery]:
    """A client of that Redis as a broker (to send and to ping the worker)."""
    app = Celery("outage-test", broker=outage_redis.url, set_as_current=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def outage_worker(outage_app, outage_redis, worker_env, module_workers) -> WorkerProcess:
    env = {
        **worker_env,
        "DJANGO_SETTINGS_MODULE": "tests.e2e.outage_settings",
        "OUTAGE_REDIS_URL": outage_redis.url,
    }
    worker = WorkerProcess(outage_app, env=env, name="outage", queues=("celery",), concurrency=1).start()
    module_workers.append(worker)
    return worker


def wait_until(condition, timeout: float = TIMEOUT, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)  # polls the database, which the worker writes to


def test_broker_and_slot_store_down_mid_body_is_no_entity_error(outage_app, outage_redis, outage_worker):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    key = str(volume.uuid)
    with outage_app.connection_for_write() as connection:
        guard_tasks.update_through_an_outage.apply_async(
            args=(key,), link=guard_tasks.finish_update.si(key), connection=connection
        )
    wait_until(
        lambda: BodyRun.objects.filter(task=f"inside:{key}").exists(), message="the body never started"
    )

    # Marked before the outage: the worker may log the re-queue before this test runs again.
    log_mark = outage_worker.log_path.stat().st_size
    outage_redis.stop()
    BodyRun.objects.create(task=f"go:{key}", entity_uuid=volume.uuid, state_seen="")
    wait_until(
        lambda: (
            "rejecting it back to the broker" in outage_worker.log_path.read_text(errors="replace")[log_mark:]
        ),
        message="the throttle never tried to re-queue",
    )
    assert Volume.objects.values_list("state", "error_message").get(pk=volume.pk) == (S.UPDATING, "")

    outage_redis.start()
    wait_until(
        lambda: Volume.objects.get(pk=volume.pk).state == S.OK,
        message=f"the chain never completed after the outage; worker log:\n{outage_worker.log_tail()}",
    )
    records = TransitionRecord.objects.for_entity(volume).order_by("created_at", "id")
    assert list(records.values_list("transition", flat=True)) == ["begin_updating", "set_ok"]
    assert (
        BodyRun.objects.filter(
            task=guard_tasks.update_through_an_outage.name, entity_uuid=volume.uuid
        ).count()
        == 2
    )
    assert outage_worker.alive()
