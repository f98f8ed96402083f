"""A broker restart with tasks in flight loses no task with README's settings ("Broker
restarts"), on real Celery workers, for the Redis and the RabbitMQ broker.

Each test starts a broker of its own, a worker with README's recommended settings and one
with Celery's defaults (``tests/brokers/profiles.py``), sends 40 plain tasks and 10
transition chains to each (60 task ids apiece), kills the broker (SIGKILL) while tasks run
and more wait in the queue, starts it again on the same data, and waits until every
profile settled (``tests/brokers/scenario.py``). It asserts that with the recommended
settings every task id ran and finished and every chain ended in ``ok`` with each
transition recorded once; duplicates (at least once) are counted, not forbidden. On Redis
one exception is allowed, kombu's and not ours: the one message the worker was popping at
the instant of the kill (kombu's Redis transport takes a message with ``BRPOP`` and records
its unacknowledged copy with a second command, so a kill between the two loses it; seen
once in 7 runs on one machine). The test allows it only for a message no worker ever logged
as received, at most one per worker connected at the kill; a received message must never
be lost, on either broker. A worker that exits (kombu can end one on a Redis connection
loss) is started again, as a process supervisor would, and counted. The defaults run only
reports what it lost. The counts are printed and written to ``test-artifacts/broker-restart-<broker>.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tests.brokers.scenario import Broker, Counts, RestartScenario, format_table
from tests.brokers.servers import BrokerRedis, RabbitMQNode, rabbitmq_available
from tests.workers import ARTIFACTS_DIR, WorkerProcess, free_port

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

PROFILES = ("recommended", "defaults")
#: Seconds the killed Redis stays down (a RabbitMQ node needs seconds to boot anyway):
#: longer than Celery's default publish retries (about 0.6 s), as a real restart is.
REDIS_DOWNTIME = 2.0


def run_and_report(
    broker: Broker,
    worker_env: dict[str, str],
    module_workers: list[WorkerProcess],
    name: str,
    downtime: float,
) -> dict[str, Counts]:
    """Run the scenario on ``broker``; print and store the counts; by profile."""
    scenario = RestartScenario(broker, PROFILES, worker_env, downtime=downtime, timeout=45.0)
    module_workers.extend(scenario.workers)  # their log tails are attached if the test fails
    try:
        with scenario:
            rows = scenario.run()
    finally:  # and those of the workers started in place of one that exited
        module_workers.extend(worker for worker in scenario.workers if worker not in module_workers)
    report = "\n".join([broker.description, format_table(rows), *(row.line() for row in rows)])
    print(report)
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS_DIR / f"broker-restart-{name}.txt").write_text(report + "\n")
    return {row.profile: row for row in rows}


def assert_nothing_lost(row: Counts, chains: int = 10, popped_at_the_kill: int = 0) -> None:
    """Every task id finished and every chain ended ``ok``, but for at most
    ``popped_at_the_kill`` messages that no worker received (kombu's Redis pop window)."""
    assert row.done_at_restart < row.sent - 10, f"the restart came too late to matter: {row.line()}"
    assert not row.timed_out, row.line()
    assert row.lost == row.never_received <= popped_at_the_kill, row.line()
    assert row.completed == row.sent - row.lost, row.line()
    assert row.chains_ok == row.chains == chains, row.line()


def assert_reported(rows: Sequence[Counts]) -> None:
    """Celery's defaults may lose tasks: that run only has to produce its counts."""
    for row in rows:
        assert row.lost >= 0
        assert row.completed + row.lost == row.sent


def test_a_redis_broker_restart_loses_no_task_with_the_recommended_settings(worker_env, module_workers):
    server = BrokerRedis(free_port(), name="broker-restart", appendfsync="always")
    try:
        server.start()
        rows = run_and_report(server, worker_env, module_workers, "redis", REDIS_DOWNTIME)
    finally:
        server.close()
    # One worker (one consumer connection) per profile was connected when Redis was killed.
    assert_nothing_lost(rows["recommended"], popped_at_the_kill=1)
    assert_reported([rows["defaults"]])


@pytest.mark.skipif(not rabbitmq_available(), reason="needs rabbitmq-server")
def test_a_rabbitmq_broker_restart_loses_no_task_with_the_recommended_settings(worker_env, module_workers):
    node = RabbitMQNode()
    try:
        node.start()
        rows = run_and_report(node, worker_env, module_workers, "rabbitmq", 0.0)
    finally:
        node.close()
    assert_nothing_lost(rows["recommended"])
    assert_reported([rows["defaults"]])
