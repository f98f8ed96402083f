"""The throttle on Redis Sentinel (issue #21), on real topologies the tests start.

A ``SentinelTopology`` (tests/redis_topology.py) is a primary, two replicas and three
Sentinels on ports of their own; the throttle's cache is configured exactly as
django-redis documents Sentinel.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from django.core.cache import caches
from redis import Redis
from redis.sentinel import Sentinel, SentinelConnectionPool

import task_workflow.throttle as throttle_module
from task_workflow.tasks import ThrottleTimeout, throttle
from task_workflow.throttle import (
    STORE_ERRORS,
    RedisThrottleBackend,
    SlotGroup,
    ThrottleUnavailable,
    get_backend,
)
from task_workflow.throttle.sentinel import PrimaryWatch
from tests.redis_topology import SentinelTopology
from tests.waiting import wait_until
from tests.workers import ROOT

pytestmark = [
    # Redis servers of the tests' own; nothing here depends on the database, so the suite's
    # second pass on SQLite (which skips ``services``) need not run them again.
    pytest.mark.services,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH"),
]


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
        master = cast(dict[str, Any], sentinel.client().execute_command("SENTINEL MASTER", topology.service))
        assert (master["num-slaves"], master["num-other-sentinels"]) == (2, 2)


@pytest.mark.failover_campaign
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


# --- The throttle on django-redis's documented Sentinel configuration ------------------------


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A started topology whose service name is the test's own: django-redis keeps one
    pool per LOCATION per process, so a name used by an earlier test would get that
    test's pool (and its dead Sentinels)."""
    topology = SentinelTopology(tmp_path / "topology", service=f"tw{uuid.uuid4().hex[:10]}")
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


def use_lock_cache(settings: Any, cache: dict[str, Any], **throttle_settings: Any) -> None:
    """Make ``cache`` the throttle's lock cache (alias ``sentinel_locks``) with the given
    TASK_WORKFLOW settings; the throttle builds its backend anew. A server the topology
    just started is inside any restart grace: grace 0 unless given."""
    settings.CACHES = {**settings.CACHES, LOCK_ALIAS: cache}
    settings.TASK_WORKFLOW = {
        **getattr(settings, "TASK_WORKFLOW", {}),
        "CACHE": LOCK_ALIAS,
        "THROTTLE_RESTART_GRACE": 0,
        **throttle_settings,
    }
    throttle_module._backends.clear()


LOCK_ALIAS = "sentinel_locks"


@pytest.fixture(autouse=True)
def fresh_backends() -> Iterator[None]:
    throttle_module._backends.clear()
    yield
    throttle_module._backends.clear()


def test_the_throttle_grants_and_releases_on_sentinel_as_django_redis_documents_it(
    sentinel_topology: SentinelTopology, settings: Any
) -> None:
    use_lock_cache(settings, sentinel_topology.django_cache())
    name = f"tests.sentinel.{uuid.uuid4().hex[:8]}"
    tokens = []
    for _ in range(3):
        with throttle(key="region", name=name, wait=2) as lease:
            assert get_backend().held_slots()[0].token == lease.token
            tokens.append(lease.fencing_token)
    assert tokens == sorted(set(tokens))
    assert get_backend().held_slots() == []
    # The slots are on the primary Sentinel names, where the cache writes too.
    caches[LOCK_ALIAS].set("written-through-the-cache", 1)
    assert sentinel_topology.primary.client().exists(caches[LOCK_ALIAS].make_key("written-through-the-cache"))


LOOP_SCRIPT = """
import json, os, sys, time
import django
django.setup()
from task_workflow.tasks import ThrottleTimeout, throttle
from task_workflow.throttle.errors import ThrottleUnavailable
grants, errors, timeouts, tokens = 0, [], 0, []
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        with throttle(key="region", name="tests.sentinel.loop", concurrency=2, wait=1.0) as lease:
            grants += 1
            tokens.append(lease.fencing_token)
    except ThrottleUnavailable as exc:
        errors.append(str(exc)[-160:])
    except ThrottleTimeout:
        timeouts += 1
print(json.dumps({"grants": grants, "errors": errors, "timeouts": timeouts, "tokens": tokens}))
"""


def run_loops(cache: dict[str, Any], processes: int, seconds: float) -> list[dict[str, Any]]:
    """Run ``processes`` processes that acquire and release one group (limit 2) in a loop
    for ``seconds``, with ``cache`` as their lock cache; each one's counts."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.faults.settings",
        "TWF_LOCK_CACHE": json.dumps(cache),
        "TWF_TTL": "10",
        "TWF_GRACE": "0",
        "PYTHONPATH": str(ROOT),
    }
    running = [
        subprocess.Popen(
            [sys.executable, "-c", LOOP_SCRIPT, str(seconds)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    results = []
    try:
        for process in running:
            out, err = process.communicate(timeout=seconds + 60)
            assert process.returncode == 0, err.decode()[-2000:]
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.mark.failover_campaign
def test_several_processes_grant_and_release_on_sentinel(sentinel_topology: SentinelTopology) -> None:
    """The issue's first reproduction (6 processes for 8 s: 0 grants, 33 x "Name or
    service not known" on an older build): every process gets grants, none an error."""
    results = run_loops(sentinel_topology.django_cache(), processes=6, seconds=8)
    print(
        "grants per process", [r["grants"] for r in results], "errors", sum(len(r["errors"]) for r in results)
    )
    assert all(result["errors"] == [] for result in results), results[0]["errors"][:3]
    assert all(result["grants"] > 0 for result in results)


@pytest.fixture
def slow_failover_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """A topology whose Sentinels call the primary down only after a minute: a paused
    primary stays the primary for the whole test."""
    topology = SentinelTopology(
        tmp_path / "topology", service=f"tw{uuid.uuid4().hex[:10]}", down_after_ms=60_000
    )
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


def test_the_throttles_own_socket_timeout_applies_on_sentinel(
    slow_failover_topology: SentinelTopology, settings: Any
) -> None:
    """A primary that stops answering (SIGSTOP: its connections stay open) costs a throttle
    call THROTTLE_SOCKET_TIMEOUT per attempt redis-py makes, not the cache's own timeout:
    the lease renewer must not stall for the cache's 8 s per attempt."""
    topology = slow_failover_topology
    use_lock_cache(settings, topology.django_cache(SOCKET_TIMEOUT=8), THROTTLE_SOCKET_TIMEOUT=0.5)
    backend = get_backend()
    group = SlotGroup(f"tests.sentinel.{uuid.uuid4().hex[:8]}", "region")
    metadata = {"task_name": group.task_name, "key": group.key, "concurrency": 1}
    assert backend.acquire(group, "before", 1, 10.0, metadata).acquired  # connected
    assert backend.release(group, "before")

    topology.primary.pause()
    started = time.monotonic()
    with pytest.raises(STORE_ERRORS):
        backend.acquire(group, "paused", 1, 10.0, metadata)
    elapsed = time.monotonic() - started
    print(f"a call to a paused primary gave up after {elapsed:.2f} s")
    assert elapsed < 4.0


def test_a_sentinel_pool_is_rebuilt_with_the_throttles_timeouts() -> None:
    """The throttle's own pool of a Sentinel-managed primary: the cache pool's class,
    service, role, connection class and arguments, with the throttle's socket timeouts
    towards the primary and towards Sentinel (a shorter configured one is kept)."""
    manager = Sentinel([("127.0.0.1", 1), ("127.0.0.1", 2)], sentinel_kwargs={"password": "s3"})
    cache_pool = SentinelConnectionPool(
        "svc", manager, is_master=True, check_connection=True, db=3, password="pw", socket_connect_timeout=0.2
    )
    own_client = throttle_module.throttle_client(Redis(connection_pool=cache_pool), 1.5)
    own = own_client.connection_pool
    assert isinstance(own, SentinelConnectionPool)
    assert own is not cache_pool
    assert (own.service_name, own.is_master, own.check_connection) == ("svc", True, True)
    assert own.connection_class is cache_pool.connection_class
    assert own.connection_kwargs["connection_pool"] is own.proxy  # its own, not the cache's
    for name in ("db", "password"):
        assert own.connection_kwargs[name] == cache_pool.connection_kwargs[name]
    assert (own.connection_kwargs["socket_timeout"], own.connection_kwargs["socket_connect_timeout"]) == (
        1.5,
        0.2,
    )
    sentinels = own.sentinel_manager.sentinels
    assert [client.connection_pool.connection_kwargs["port"] for client in sentinels] == [1, 2]
    for client in sentinels:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["password"], kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (
            "s3",
            1.5,
            1.5,
        )


# --- Failovers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    at: float  # time.monotonic() when the lease was handed to the caller
    fencing_token: int


class GrantLoop(threading.Thread):
    """One caller that takes and gives back the one slot of a group (limit 1) in a loop
    through the public ``throttle()``, recording every grant (its time and fencing
    token) and every failure, until stopped."""

    def __init__(self, group_name: str) -> None:
        super().__init__(name="sentinel-grant-loop", daemon=True)
        self.group_name = group_name
        self.grants: list[Grant] = []
        self.failures: list[tuple[float, str]] = []
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.is_set():
            try:
                with throttle(key="region", name=self.group_name, wait=1.0, ttl=10) as lease:
                    self.grants.append(Grant(time.monotonic(), lease.fencing_token))
            except (ThrottleUnavailable, ThrottleTimeout) as exc:
                self.failures.append((time.monotonic(), str(exc)))
                # Pacing while the store is down (a refused connection fails at once).
                self._stop_requested.wait(0.02)

    def grants_after(self, moment: float) -> list[Grant]:
        return [grant for grant in list(self.grants) if grant.at > moment]

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(30)
        assert not self.is_alive(), "the grant loop did not stop"


@contextmanager
def granting(group_name: str) -> Iterator[GrantLoop]:
    """A running ``GrantLoop``, stopped afterwards (also when the test fails)."""
    loop = GrantLoop(group_name)
    loop.start()
    try:
        wait_until(lambda: len(loop.grants) >= 20, 30, "grants before the fault")
        yield loop
    finally:
        loop.stop()


def assert_strictly_increasing(grants: list[Grant]) -> None:
    """One caller's grants, one after the other: each fencing token above the one before."""
    tokens = [grant.fencing_token for grant in grants]
    repeats_or_backwards = [(a, b) for a, b in itertools.pairwise(tokens) if b <= a]
    assert not repeats_or_backwards, (
        f"{len(repeats_or_backwards)} fencing tokens not above the one before, "
        f"e.g. {repeats_or_backwards[:5]}"
    )


@pytest.mark.failover_campaign
def test_after_sigkill_of_the_primary_grants_resume_on_the_promoted_replica(
    sentinel_topology: SentinelTopology, settings: Any
) -> None:
    topology = sentinel_topology
    use_lock_cache(settings, topology.django_cache(), THROTTLE_SOCKET_TIMEOUT=1.0)
    with granting(f"tests.sentinel.{uuid.uuid4().hex[:8]}") as loop:
        killed_at = time.monotonic()
        killed = topology.kill_primary()
        topology.wait_for_failover(killed)
        promoted_at = time.monotonic()
        first = wait_until(lambda: loop.grants_after(promoted_at)[:1], 30, "a grant after the failover")[0]
        wait_until(lambda: len(loop.grants_after(first.at)) >= 20, 30, "grants on the new primary")
    # A call answered by the old primary may return just after the kill: grants resume
    # after the first call the kill made fail.
    first_failure = min(at for at, _ in loop.failures if at > killed_at)
    resumed = loop.grants_after(first_failure)[0].at - killed_at
    print(
        f"SIGKILL of the primary: Sentinel promoted a replica after {promoted_at - killed_at:.2f} s, "
        f"first grant {resumed:.2f} s after the kill; {len(loop.failures)} failed calls meanwhile"
    )
    assert resumed < (promoted_at - killed_at) + 3.0
    assert_strictly_increasing(loop.grants)


def seq_key(group_name: str) -> bytes:
    """The group's counter key (its last fencing token) in the lock cache."""
    backend = get_backend()
    assert isinstance(backend, RedisThrottleBackend)
    return backend._keys(SlotGroup(group_name, "region"))[5]


@pytest.mark.failover_campaign
@pytest.mark.parametrize("watch", [True, False], ids=["with-primary-watch", "without-primary-watch"])
def test_after_an_orderly_failover_the_old_primary_stops_granting_within_a_second(
    sentinel_topology: SentinelTopology, settings: Any, watch: bool
) -> None:
    """``SENTINEL FAILOVER`` promotes a replica while the old primary still answers as a
    primary (Sentinel demotes it some 8 s later): connections already open would go on
    granting there, writes the new primary never sees. With the primary watch the
    throttle leaves it within about a second of Sentinel's switch; without it (the
    measurement that shows why) until the old primary is demoted."""
    topology = sentinel_topology
    use_lock_cache(settings, topology.django_cache(), THROTTLE_SOCKET_TIMEOUT=1.0)
    group_name = f"tests.sentinel.{uuid.uuid4().hex[:8]}"
    backend = get_backend()
    assert isinstance(backend, RedisThrottleBackend)
    assert backend.primary_check is not None
    if not watch:
        backend.primary_check = None
    old = topology.primary
    key = seq_key(group_name)
    old_client = old.client()
    with granting(group_name) as loop:
        failover_at = time.monotonic()
        topology.orderly_failover()
        # Until the old primary is demoted: when its counter last moved (its last grant),
        # and when every Sentinel named the new primary (what the watch asks).
        last_value, last_grant_on_old, switched_at = old_client.get(key), failover_at, None
        while True:
            try:
                # Read in one round trip: the counter while the node is still a primary.
                pipeline = old_client.pipeline(transaction=False)
                pipeline.role()
                pipeline.get(key)
                role, value = pipeline.execute()
            except redis.exceptions.ConnectionError:
                continue  # Sentinel kills the clients of the node it demotes
            if role[0] != "master":
                break
            if value != last_value:
                last_value, last_grant_on_old = value, time.monotonic()
            if switched_at is None and old.address not in topology.sentinel_master_addresses():
                switched_at = time.monotonic()
            assert time.monotonic() - failover_at < 60, "the old primary was never demoted"
            time.sleep(0.02)  # sampling period of the old primary's counter
        demoted_at = time.monotonic()
        assert switched_at is not None
        topology.wait_for_failover(old)
        wait_until(lambda: len(loop.grants_after(demoted_at)) >= 20, 30, "grants on the new primary")
    window = last_grant_on_old - switched_at
    print(
        f"orderly failover ({'with' if watch else 'without'} the primary watch): Sentinel switched "
        f"{switched_at - failover_at:.2f} s after SENTINEL FAILOVER, the old primary was demoted "
        f"{demoted_at - failover_at:.2f} s after it and granted until {window:+.2f} s from the switch"
    )
    if watch:
        # The watch's interval (1 s), plus a loaded machine's scheduling.
        assert window < 2.0
    else:
        assert window > 4.0  # why the watch is there
    assert_strictly_increasing(loop.grants)


def test_sentinels_that_stop_answering_do_not_slow_the_throttle_down(
    sentinel_topology: SentinelTopology, settings: Any
) -> None:
    """The primary watch asks Sentinel once a second; Sentinels that stop answering (all
    paused: their sockets stay open, each question runs into the socket timeout) must
    not hold the throttle calls to a primary that is fine."""
    topology = sentinel_topology
    use_lock_cache(settings, topology.django_cache(), THROTTLE_SOCKET_TIMEOUT=0.5)
    name = f"tests.sentinel.{uuid.uuid4().hex[:8]}"
    with throttle(key="region", name=name, wait=1):
        pass  # connected, the primary known
    for sentinel in topology.sentinels:
        sentinel.pause()
    slowest, grants = 0.0, 0
    deadline = time.monotonic() + 3.5  # three of the watch's questions at least
    while time.monotonic() < deadline:
        started = time.monotonic()
        with throttle(key="region", name=name, wait=1):
            grants += 1
        slowest = max(slowest, time.monotonic() - started)
    print(f"Sentinels paused: {grants} grants in 3.5 s, the slowest acquire + release took {slowest:.3f} s")
    # Below one socket timeout: no call waited for a Sentinel's question.
    assert slowest < 0.4


class CountingPool:
    """Stands in for a SentinelConnectionPool: counts the watch's questions, and fails
    them when told to."""

    service_name = "counted"

    def __init__(self) -> None:
        self.questions = 0
        self.fail = False

    def get_master_address(self) -> tuple[str, int]:
        self.questions += 1
        if self.fail:
            raise redis.exceptions.ConnectionError("no Sentinel answers")
        return ("127.0.0.1", 6379)


def test_the_primary_watch_asks_at_most_once_per_interval_and_never_raises() -> None:
    pool = CountingPool()
    watch = PrimaryWatch(cast(SentinelConnectionPool, pool), interval=0.2)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        watch()  # the callers of one process, as fast as they come
    elapsed = time.monotonic() - started
    wait_until(
        lambda: not any(t.name == "task_workflow-primary-watch" for t in threading.enumerate()),
        5,
        "the watch",
    )
    assert 1 <= pool.questions <= elapsed / 0.2 + 1
    pool.fail = True
    questions = pool.questions

    def asked_again() -> bool:
        watch()  # raises nothing while its questions fail
        return pool.questions > questions

    wait_until(asked_again, 5, "a question that fails")


class SlowPool(CountingPool):
    """Answers after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.answered = threading.Event()

    def get_master_address(self) -> tuple[str, int]:
        time.sleep(self.delay)  # the Sentinel's answer time is what is tested
        address = super().get_master_address()
        self.answered.set()
        return address


def test_the_call_that_asks_waits_for_a_quick_answer_and_not_for_a_slow_one() -> None:
    """A quick answer is in before the call goes on (so a process quiet through an orderly
    failover sends its first call to the new primary); a slow one holds the call for
    ``answer_wait`` at most."""
    quick = SlowPool(0.01)
    PrimaryWatch(cast(SentinelConnectionPool, quick), answer_wait=0.5)()
    assert quick.answered.is_set()

    slow = SlowPool(1.0)
    started = time.monotonic()
    PrimaryWatch(cast(SentinelConnectionPool, slow), answer_wait=0.1)()
    waited = time.monotonic() - started
    assert not slow.answered.is_set()
    assert 0.1 <= waited < 0.5
    slow.answered.wait(5)
