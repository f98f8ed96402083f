"""Broker restarts with many tasks in flight: the short test's scenario
(``tests/brokers/test_broker_restart.py``, ``tests/brokers/scenario.py``) with ten times
the tasks, on each persistent broker.

Per broker (a ``redis-server`` with an append-only file fsynced ``always``, one fsynced
``everysec``, and a RabbitMQ node when ``rabbitmq-server`` is installed; each a server of
the test's own on free ports and a temporary data directory), one worker with the
recommended settings and one with Celery's defaults (prefork, 2 processes),
``CAMPAIGN_BROKER_PLAIN`` plain tasks (320) and ``CAMPAIGN_BROKER_CHAINS`` transition
chains (40) each; the broker is killed (SIGKILL) once both finished 40 tasks, stays down
2 s (Redis) and starts again on the same data. With the recommended settings nothing may
be lost (on Redis but for the one message a worker was popping at the kill, which no
worker logged as received: kombu's window, see the short test); Celery's defaults are
only reported. The counts are printed and written to
``test-artifacts/broker-restart-long-<broker>.txt``. Servers and workers are stopped when
the test ends, also when it fails.
"""

from __future__ import annotations

import os

import pytest

from tests.brokers.scenario import RestartScenario, format_table
from tests.brokers.servers import BrokerRedis, RabbitMQNode, rabbitmq_available
from tests.brokers.test_broker_restart import assert_nothing_lost, assert_reported
from tests.workers import ARTIFACTS_DIR, free_port

pytestmark = [pytest.mark.campaign, pytest.mark.services, pytest.mark.django_db(transaction=True)]

PROFILES = ("recommended", "defaults")
PLAIN = int(os.environ.get("CAMPAIGN_BROKER_PLAIN", "320"))
CHAINS = int(os.environ.get("CAMPAIGN_BROKER_CHAINS", "40"))
RESTART_AFTER = min(40, PLAIN // 4)
REDIS_DOWNTIME = 2.0

BROKERS = {
    "redis-always": lambda: BrokerRedis(free_port(), name="campaign-always", appendfsync="always"),
    "redis-everysec": lambda: BrokerRedis(free_port(), name="campaign-everysec", appendfsync="everysec"),
    "rabbitmq": RabbitMQNode,
}


@pytest.mark.parametrize(
    "broker_name",
    [
        "redis-always",
        "redis-everysec",
        pytest.param(
            "rabbitmq", marks=pytest.mark.skipif(not rabbitmq_available(), reason="needs rabbitmq-server")
        ),
    ],
)
def test_a_broker_restart_loses_no_task_with_the_recommended_settings(
    broker_name, worker_env, module_workers
):
    server = BROKERS[broker_name]()
    try:
        server.start()
        scenario = RestartScenario(
            server,
            PROFILES,
            worker_env,
            plain=PLAIN,
            chains=CHAINS,
            restart_after=RESTART_AFTER,
            downtime=REDIS_DOWNTIME if server.kind == "redis" else 0.0,
            timeout=120.0,
        )
        module_workers.extend(scenario.workers)  # their log tails are attached if the test fails
        try:
            with scenario:
                rows = {row.profile: row for row in scenario.run()}
        finally:  # and those of the workers started in place of one that exited
            module_workers.extend(worker for worker in scenario.workers if worker not in module_workers)
    finally:
        server.close()
    report = "\n".join(
        [server.description, format_table(list(rows.values())), *(r.line() for r in rows.values())]
    )
    print(report)
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS_DIR / f"broker-restart-long-{broker_name}.txt").write_text(report + "\n")
    popped = 1 if server.kind == "redis" else 0
    assert_nothing_lost(rows["recommended"], chains=CHAINS, popped_at_the_kill=popped)
    assert_reported([rows["defaults"]])
