"""The throttle on Redis Sentinel (issue #21), on real topologies the tests start.

A ``SentinelTopology`` (tests/redis_topology.py) is a primary, two replicas and three
Sentinels on ports of their own; the throttle's cache is configured exactly as
django-redis documents Sentinel.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.redis_topology import SentinelTopology

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH")


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A started primary + 2 replicas + 3 Sentinels; every process is killed afterwards,
    also when the test fails."""
    topology = SentinelTopology(tmp_path / "topology")
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- The topology itself ------------------------------------------------------------------


def test_a_started_topology_is_in_sync_and_known_to_every_sentinel(topology: SentinelTopology) -> None:
    primary = topology.current_primary()
    assert primary is topology.primary
    assert primary.client().role()[0] == "master"
    for replica in topology.replicas:
        role = replica.client().role()
        assert (role[0], role[2]) == ("slave", primary.port)
    assert set(topology.replication_lag().values()) == {0}
    for sentinel in topology.sentinels:
        master = cast(dict[str, Any], sentinel.client().sentinel_master(topology.service))
        assert (master["num-slaves"], master["num-other-sentinels"]) == (2, 2)


def test_sigkill_of_the_primary_then_orderly_failover_each_promote_a_replica(
    topology: SentinelTopology,
) -> None:
    primary = topology.primary
    primary.client().set("written-before-the-kill", "1")
    topology.wait_until_synced()

    killed = topology.kill_primary()
    promoted = topology.wait_for_failover(killed)
    assert promoted is not killed
    assert promoted is topology.current_primary()
    assert promoted.client().get("written-before-the-kill") == "1"

    topology.restart(killed)  # back as a replica of the new primary
    assert killed.client().role()[0] == "slave"

    topology.orderly_failover()
    switched = topology.wait_for_failover(promoted)
    assert switched is not promoted
    assert switched.client().role()[0] == "master"


def test_leaving_the_topology_kills_every_process_also_after_an_error(tmp_path: Path) -> None:
    pids: list[int] = []

    def fail_inside(topology: SentinelTopology) -> None:
        pids.extend(node.process.pid for node in topology if node.process is not None)
        topology.replicas[0].pause()  # a stopped process is killed too
        raise RuntimeError("the test failed")

    topology = SentinelTopology(tmp_path / "topology", replicas=1, sentinels=1)
    with pytest.raises(RuntimeError, match="the test failed"), topology:
        fail_inside(topology)
    assert len(pids) == 3
    assert not any(_process_exists(pid) for pid in pids)
