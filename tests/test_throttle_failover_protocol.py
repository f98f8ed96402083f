"""The Redis backend where the store itself misbehaves: a counter that went back (a
failover to a replica that missed the latest grants), a Redis user that may not run
``INFO``, a restarted server inside its grace, a release that hit an outage.

Real Redis servers: the shared one for the script-level cases, servers of the tests' own
(own ports) where a test pauses, restarts or configures ACL users on them. The Sentinel
topology cases are in ``test_throttle_sentinel.py``, the durable mode in
``test_throttle_durable.py``, the whole failover campaign in ``tests/faults/``.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.test import override_settings
from redis.backoff import NoBackoff
from redis.retry import Retry

import task_workflow.throttle as throttle_module
from task_workflow.throttle import ThrottleTimeout, ThrottleUnavailable, throttle
from task_workflow.throttle.base import SlotGroup
from task_workflow.throttle.lease import Lease, LeaseRenewer, lease_renewer
from task_workflow.throttle.redis_backend import RedisThrottleBackend
from tests.waiting import wait_until
from tests.workers import RedisServer, free_port

pytestmark = [pytest.mark.services]

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"

#: A clock in microseconds since 1970 is above this (2020-09-13); a counter that counted
#: up from 1 is far below it.
CLOCK_FLOOR_US = 1_600_000_000 * 1_000_000


def meta(group: SlotGroup) -> dict[str, object]:
    return {"task_name": group.task_name, "key": group.key, "concurrency": 1}


def unique_group() -> SlotGroup:
    return SlotGroup(f"tests.failover.{uuid.uuid4().hex[:12]}")


@pytest.fixture
def shared_backend() -> Iterator[RedisThrottleBackend]:
    """A backend on the shared test Redis, with a key prefix of its own."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    prefix = f"tw-test:{uuid.uuid4().hex}:"
    try:
        yield RedisThrottleBackend(client, prefix, restart_grace=0)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A Redis server of the test's own (own port, no persistence), stopped afterwards
    (resumed first if the test left it paused)."""
    server = RedisServer(port=free_port(), name=f"failover-{uuid.uuid4().hex[:6]}").start()
    try:
        yield server
    finally:
        if server.alive():
            server.process.send_signal(signal.SIGCONT)
        server.kill()


# --- Fencing tokens: never repeated, never backwards -----------------------------------------


def test_a_counter_that_went_back_never_yields_a_token_at_or_below_one_granted_before(shared_backend):
    """The lost-write failover at the script level: B's grant is on the primary only; the
    promoted replica has the group's counter as it was before B and no B. Its next grant
    must still carry a token above B's (found on the first version: C got B's token, so
    the documented ``fence__lte`` check accepted both writers)."""
    backend, group = shared_backend, unique_group()
    seq_key, holders_key = backend._keys(group)[5], backend._keys(group)[0]
    granted = [backend.acquire(group, "A", 1, 30.0, meta(group)).fencing_token]
    backend.release(group, "A")
    counter_before_b = backend.client.get(seq_key)
    granted.append(backend.acquire(group, "B", 1, 30.0, meta(group)).fencing_token)
    # The replica's view: the counter before B's grant, and no B.
    backend.client.set(seq_key, counter_before_b, px=24 * 3600 * 1000)
    backend.client.zrem(holders_key, "B")
    granted.append(backend.acquire(group, "C", 1, 30.0, meta(group)).fencing_token)
    assert granted == sorted(granted), granted
    assert len(set(granted)) == 3, granted


def test_tokens_are_the_servers_clock_in_microseconds_or_one_above_the_last(shared_backend):
    """Every token is at least the server's clock (so tokens granted by a server that took
    over later are above it) and above the group's last one."""
    backend, group = shared_backend, unique_group()
    tokens = []
    for owner in ("A", "B", "C", "D"):
        seconds, micros = backend.client.time()
        before = seconds * 1_000_000 + micros
        tokens.append(backend.acquire(group, owner, 1, 30.0, meta(group)).fencing_token)
        backend.release(group, owner)
        assert tokens[-1] >= before
    assert tokens == sorted(set(tokens))


# --- A Redis user without INFO (ACL +@all -@dangerous) ---------------------------------------


def limited_user(server: RedisServer) -> redis.Redis:
    """A client of ``server`` logged in as a user of the common profile ``+@all
    -@dangerous`` (no INFO among others)."""
    admin = server.client()
    admin.acl_setuser("limited", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                      commands=["+@all", "-@dangerous"])  # fmt: skip
    admin.close()
    return redis.Redis(port=server.port, username="limited", password="secret", socket_timeout=2)


def test_a_user_without_info_is_refused_clearly_and_leaves_nothing_behind(own_server):
    """With a restart grace the scripts must read the server's uptime (INFO). A user who may
    not run it gets a store error that names the permission, every time, and the group
    has no keys afterwards (the first version left the counter at 1 after the script
    failed, then granted tokens 2, 3, 4 and skipped the grace)."""
    client = limited_user(own_server)
    backend = RedisThrottleBackend(client, "tw:", restart_grace=1)
    group = unique_group()
    for _attempt in range(3):
        with pytest.raises(redis.exceptions.ResponseError, match=r"\+info"):
            backend.acquire(group, "A", 1, 30.0, meta(group))
    assert own_server.client().keys("tw:*") == []


def test_a_user_without_info_gets_clock_based_tokens_with_the_grace_off(own_server):
    """With ``THROTTLE_RESTART_GRACE`` 0 nothing needs INFO: grants as usual."""
    client = limited_user(own_server)
    backend = RedisThrottleBackend(client, "tw:", restart_grace=0)
    group = unique_group()
    first = backend.acquire(group, "A", 1, 30.0, meta(group))
    assert first.acquired
    assert first.fencing_token > CLOCK_FLOOR_US
    backend.release(group, "A")
    assert backend.acquire(group, "B", 1, 30.0, meta(group)).fencing_token > first.fencing_token


def test_a_release_by_a_user_without_info_still_frees_the_slot(own_server):
    """A release hands the slot on only when it may take a number; refused INFO (a group
    whose counter is gone) must not keep it from freeing the slot."""
    admin = own_server.client()
    client = limited_user(own_server)
    granting = RedisThrottleBackend(client, "tw:", restart_grace=0)
    graced = RedisThrottleBackend(client, "tw:", restart_grace=1)
    group = unique_group()
    assert granting.acquire(group, "A", 1, 30.0, meta(group)).acquired
    admin.delete(graced._keys(group)[5])  # the counter is gone (as after a restart)
    assert graced.release(group, "A") is True
    assert admin.zcard(graced._keys(group)[0]) == 0


# --- The restart grace says so ---------------------------------------------------------------


def redis_cache(server: RedisServer) -> dict[str, object]:
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": server.url,
        "OPTIONS": {"SOCKET_TIMEOUT": 2},
    }


@pytest.fixture
def fresh_backends() -> Iterator[None]:
    throttle_module._backends.clear()
    yield
    throttle_module._backends.clear()


def test_a_refusal_inside_the_restart_grace_says_so(own_server, fresh_backends):
    """A server that just started grants nothing for the grace; the caller is told that
    this is why, not that every slot is busy (a new user's first throttled task met
    "all 1 slots busy" with no slot held anywhere)."""
    with override_settings(
        CACHES={**settings.CACHES, "fresh": redis_cache(own_server)},
        TASK_WORKFLOW={**settings.TASK_WORKFLOW, "CACHE": "fresh", "THROTTLE_RESTART_GRACE": 30},
    ):
        backend = throttle_module.get_backend()
        group = unique_group()
        refused = backend.acquire(group, "A", 1, 30.0, meta(group))
        assert not refused.acquired
        assert refused.reason == "restart grace"
        with pytest.raises(ThrottleTimeout, match="restart grace"):
            throttle(name=group.task_name, wait=0.2).acquire()


# --- A release that hit an outage is retried --------------------------------------------------


def test_a_release_that_failed_during_an_outage_goes_through_once_the_store_is_back(own_server):
    """The holder still knows its token: once the store answers again the slot is freed
    (and handed to a waiter), not a whole lease later (the first version kept the group
    blocked for the lease: 60 s by default)."""
    # No retries with backoff (redis-py's default: three, 1 + 2 + 4 s): one timeout fails.
    client = redis.Redis(
        port=own_server.port, socket_timeout=0.3, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0)
    )
    backend = RedisThrottleBackend(client, "tw:", restart_grace=0)
    group = unique_group()
    granted = backend.acquire(group, "A", 1, 30.0, meta(group))
    assert granted.acquired
    lease = Lease(backend=backend, group=group, token="A", slot="", ttl=30.0,
                  fencing_token=granted.fencing_token, valid_until=time.monotonic() + 29)  # fmt: skip
    own_server.process.send_signal(signal.SIGSTOP)
    try:
        assert lease.release() is False  # the store did not answer
    finally:
        own_server.process.send_signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    admin = own_server.client()
    wait_until(lambda: admin.zcard(backend._keys(group)[0]) == 0, timeout=5, what="the slot to be freed")
    assert time.monotonic() - resumed_at < 3
    assert lease not in lease_renewer.held()


def test_a_retried_release_stops_once_the_lease_would_have_lapsed(own_server, monkeypatch):
    """A store that stays away: the retries end when the lease would have run out anyway
    (the store frees it itself), so a dead store does not keep the renewer busy forever."""
    # Slack for one call's timeout: this client's (0.2 s), not the default 5 s.
    monkeypatch.setattr(lease_renewer, "RELEASE_RETRY_SLACK", 0.2)
    client = redis.Redis(port=own_server.port, socket_timeout=0.2, socket_connect_timeout=0.2)
    backend = RedisThrottleBackend(client, "tw:", restart_grace=0)
    group = unique_group()
    assert backend.acquire(group, "A", 1, 1.0, meta(group)).acquired
    lease = Lease(backend=backend, group=group, token="A", slot="", ttl=1.0,
                  valid_until=time.monotonic() + 0.9)  # fmt: skip
    own_server.kill()
    assert lease.release() is False
    wait_until(lambda: lease not in lease_renewer.pending_releases(), timeout=5, what="the retries to end")


def test_the_waiter_of_a_failed_release_gets_the_slot_after_the_outage(own_server, fresh_backends):
    """End to end through ``throttle``: a holder's release hits a paused store; a waiter
    blocked meanwhile is granted within seconds of the store's return."""
    with override_settings(
        CACHES={**settings.CACHES, "paused": {**redis_cache(own_server), "OPTIONS": {"SOCKET_TIMEOUT": 0.3}}},
        TASK_WORKFLOW={**settings.TASK_WORKFLOW, "CACHE": "paused", "THROTTLE_RESTART_GRACE": 0},
    ):
        name = unique_group().task_name
        holder = throttle(name=name, ttl=30).acquire()
        own_server.process.send_signal(signal.SIGSTOP)
        try:
            holder.release()
        finally:
            own_server.process.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        try:
            waiter = throttle(name=name, ttl=30, wait=10).acquire()
        except (ThrottleTimeout, ThrottleUnavailable) as exc:  # pragma: no cover - the failure
            pytest.fail(f"the slot was not freed after the outage: {exc}")
        took = time.monotonic() - resumed_at
        waiter.release()
        assert took < 3, f"the waiter got the slot {took:.1f} s after the store came back"


class DeadStore:
    """A backend whose releases all fail (a store that is down), counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        self.calls += 1
        raise redis.exceptions.ConnectionError("the store is down")


def test_many_pending_releases_to_a_dead_store_cost_one_call_per_period():
    """Every task re-queued while the store is down leaves a give-back to retry; the
    renewer must not send each of them every period (one hanging call per release would
    hold the thread that renews the live leases): one call per store and period."""
    renewer = LeaseRenewer()
    store = DeadStore()
    leases = [
        Lease(backend=store, group=unique_group(), token=f"t{i}", slot="", ttl=30.0, released=True)
        for i in range(20)
    ]
    started = time.monotonic()
    for lease in leases:
        renewer.retry_release(lease)
    wait_until(lambda: store.calls >= 3, timeout=5, what="three retries")
    elapsed = time.monotonic() - started
    periods = elapsed / renewer.RELEASE_RETRY_PERIOD
    assert store.calls <= periods + 2, f"{store.calls} calls in {elapsed:.2f} s"
    assert len(renewer.pending_releases()) == 20
    for lease in leases:
        renewer.discard(lease)
