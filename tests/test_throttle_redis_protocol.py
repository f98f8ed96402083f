"""The Redis throttle protocol's invariants (README, "Throttle protocol"), each tested on
the real Redis, most through the public API.

Several tests reproduce bugs of the first protocol and failed on it: a release that handed
a slot to a caller already holding one (shortening its lease), keys that expired under a
live handed-over holder, a line ordered by the last attempt instead of the first arrival,
a renewer that one bad call stopped, receivers that leaked a lease, a key prefix read as a
glob pattern.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from redis.backoff import NoBackoff
from redis.retry import Retry

import task_workflow.throttle as throttle_module
from task_workflow.conf import get_setting
from task_workflow.locks import force_release
from task_workflow.signals import slot_acquired, slot_released
from task_workflow.tasks import ThrottleTimeout, throttle
from task_workflow.throttle import RedisThrottleBackend, SlotGroup, get_backend
from task_workflow.throttle import lease as lease_module
from task_workflow.throttle import limiter as limiter_module
from task_workflow.throttle.lease import LeaseRenewer, lease_renewer

pytestmark = [pytest.mark.services]

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"


def unique_name(label: str = "group") -> str:
    return f"tests.protocol.{label}.{uuid.uuid4().hex[:12]}"


def wait_for(condition, timeout: float = 5.0, message: str = "condition never held") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.002)


@pytest.fixture(autouse=True)
def fresh_backends():
    throttle_module._backends.clear()
    yield
    throttle_module._backends.clear()


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture
def backend(client) -> Iterator[RedisThrottleBackend]:
    prefix = f"tw-test:{uuid.uuid4().hex}:"
    yield RedisThrottleBackend(client, prefix, restart_grace=0)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


def deadlines(backend, group: SlotGroup) -> dict[str, float]:
    """Seconds left of each holder's lease in the store."""
    return {slot.token: slot.expires_in for slot in backend.held_slots() if slot.group == group}


def meta(group: SlotGroup) -> dict:
    return {"task_name": group.task_name, "key": group.key, "concurrency": 2}


# --- Releases and handoffs never touch another holder's lease ------------------------


def test_a_waiter_that_took_a_lapsed_slot_is_not_handed_a_second_one(backend):
    """The issue's reproduction: P (ttl 1 s) dies holding a slot; A holds the other; B is
    refused and waits; when P's lease lapses B's next attempt takes it. A's release must
    not "hand" its slot to B (who holds one) and overwrite B's 60 s lease with a 5 s claim:
    the slot goes to nobody who waited, and later callers find at most two holders."""
    group = SlotGroup(unique_name(), "region-1")
    assert backend.acquire(group, "P", 2, 1.0, meta(group)).acquired  # then P dies
    assert backend.acquire(group, "A", 2, 60.0, meta(group)).acquired
    assert not backend.acquire(group, "B", 2, 60.0, meta(group)).acquired  # B is in line
    wait_for(lambda: deadlines(backend, group)["P"] <= 0, message="P's lease never lapsed")
    assert backend.acquire(group, "B", 2, 60.0, meta(group)).acquired  # B's next attempt

    assert backend.release(group, "A")

    assert deadlines(backend, group)["B"] > 55, "a release shortened B's lease"
    assert backend.acquire(group, "C", 2, 60.0, meta(group)).acquired  # A's freed slot
    assert not backend.acquire(group, "D", 2, 60.0, meta(group)).acquired
    assert sorted(deadlines(backend, group)) == ["B", "C"]


def test_every_grant_leaves_the_line(backend):
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "H", 1, 0.3, meta(group)).acquired
    assert not backend.acquire(group, "W", 1, 60.0, meta(group)).acquired
    assert backend.waiting(group) == ["W"]
    wait_for(lambda: deadlines(backend, group)["H"] <= 0)
    assert backend.acquire(group, "W", 1, 60.0, meta(group)).acquired
    assert backend.waiting(group) == []


def test_a_slot_handed_over_then_acquired_again_keeps_the_group_keys_alive(backend, client):
    """A waiter handed a slot under the short claim may find it with its next acquire
    (its own lease then applies); the group's keys must outlive that lease too."""
    group = SlotGroup(unique_name())
    holders = backend._keys(group)[0]
    assert backend.acquire(group, "H", 1, 0.3, meta(group)).acquired
    assert not backend.acquire(group, "W", 1, 60.0, meta(group)).acquired
    assert backend.release(group, "H")  # handed to W under a 5 s claim
    assert backend.acquire(group, "W", 1, 60.0, meta(group)).acquired  # the own-slot path

    lease_left = deadlines(backend, group)["W"]
    assert lease_left > 55
    assert client.pttl(holders) / 1000 >= lease_left, "the group's keys expire under W's lease"
    assert client.pttl(backend._keys(group)[1]) / 1000 >= lease_left


def test_group_keys_outlive_every_lease_of_a_mixed_ttl_group(backend, client):
    group = SlotGroup(unique_name())
    holders, meta_key = backend._keys(group)[:2]
    for token, ttl in (("long", 120.0), ("short", 0.2), ("mid", 30.0)):
        assert backend.acquire(group, token, 3, ttl, meta(group)).acquired
    assert backend.renew(group, "short", "", 0.2)
    longest = max(deadlines(backend, group).values())
    assert client.pttl(holders) / 1000 >= longest
    assert client.pttl(meta_key) / 1000 >= longest


class ShortClaims(RedisThrottleBackend):
    CLAIM_MS = 300


def test_a_lapsed_lease_is_not_counted_against_a_waiter_whose_turn_it_is(client):
    """Found by the stateful property test: 3 slots; C holds, D was handed a slot and died
    before using it (its claim lapsed), E and F wait, F behind E. F's attempt finds one
    live holder and one waiter ahead: a slot is free for it. The first version of the line
    swept expired leases only when the group held ``concurrency`` entries, so D's lapsed
    claim still counted and F was refused."""
    backend = ShortClaims(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
    group = SlotGroup(unique_name())
    try:
        assert backend.acquire(group, "A", 3, 0.2, meta(group)).acquired
        for token in ("B", "C"):
            assert backend.acquire(group, token, 3, 60.0, meta(group)).acquired
        for token in ("D", "E"):
            assert not backend.acquire(group, token, 3, 60.0, meta(group)).acquired
        wait_for(lambda: deadlines(backend, group)["A"] <= 0)
        assert backend.release(group, "B")  # handed to D, who never wakes up
        assert not backend.acquire(group, "F", 3, 60.0, meta(group)).acquired  # behind E
        wait_for(lambda: deadlines(backend, group)["D"] <= 0, message="D's claim never lapsed")
        assert backend.acquire(group, "F", 3, 60.0, meta(group)).acquired
        assert backend.waiting(group) == ["E"]
    finally:
        client.delete(*backend._keys(group))


# --- FIFO by first arrival --------------------------------------------------------------


def test_waiters_are_served_in_order_of_first_arrival_however_often_they_attempt(backend):
    """20 callers arrive in a known order; each attempts again many times, the last to
    arrive most recently. Releases hand the slot over in order of first arrival."""
    group = SlotGroup(unique_name())
    arrivals = [f"w{n:02d}" for n in range(20)]
    assert backend.acquire(group, "holder", 1, 60.0, meta(group)).acquired
    for token in arrivals:
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    for token in reversed(arrivals):  # attempts again: must not move anyone in line
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    assert backend.waiting(group) == arrivals

    granted, holder = [], "holder"
    for _ in arrivals:
        assert backend.release(group, holder)
        [holder] = deadlines(backend, group)
        granted.append(holder)
    assert granted == arrivals


def test_a_newcomer_does_not_take_a_lapsed_slot_ahead_of_the_line(backend):
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "dies", 1, 0.3, meta(group)).acquired
    assert not backend.acquire(group, "first", 1, 60.0, meta(group)).acquired
    wait_for(lambda: deadlines(backend, group)["dies"] <= 0)
    assert not backend.acquire(group, "newcomer", 1, 60.0, meta(group)).acquired
    assert backend.acquire(group, "first", 1, 60.0, meta(group)).acquired
    assert backend.waiting(group) == ["newcomer"]


def test_a_waiter_that_stops_attempting_drops_out_without_moving_the_others(backend, monkeypatch):
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "holder", 1, 60.0, meta(group)).acquired
    for token in ("gone", "second", "third"):
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    wait_for(lambda: backend.waiting(group) == [], timeout=10, message="waiters never went stale")
    for token in ("second", "third"):  # still attempting: alive again, in their places
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    assert backend.waiting(group) == ["second", "third"]
    assert backend.release(group, "holder")
    assert list(deadlines(backend, group)) == ["second"]


def test_twenty_threads_are_granted_slots_in_arrival_order():
    """The same through the public API: 20 threads arrive in order and wait (each
    attempting again about once a second); the holder's release starts a chain of
    handoffs in that order."""
    name = unique_name("fifo")
    backend = get_backend()
    group = SlotGroup(name)
    order: list[int] = []
    holder = throttle(name=name, ttl=30).acquire()

    def wait_in_line(n: int) -> None:
        with throttle(name=name, ttl=30, wait=None):
            order.append(n)

    threads = []
    for n in range(20):
        thread = threading.Thread(target=wait_in_line, args=(n,))
        thread.start()
        threads.append(thread)
        wait_for(lambda n=n: len(backend.waiting(group)) == n + 1, message=f"waiter {n} never queued")
    holder.release()
    for thread in threads:
        thread.join(30)
    assert order == list(range(20))


# --- Fencing tokens -----------------------------------------------------------------------


def test_fencing_tokens_strictly_increase_over_every_kind_of_grant(backend, client):
    group = SlotGroup(unique_name())
    tokens = [backend.acquire(group, "a", 2, 60.0, meta(group)).fencing_token]
    tokens.append(backend.acquire(group, "b", 2, 60.0, meta(group)).fencing_token)
    assert not backend.acquire(group, "c", 2, 60.0, meta(group)).acquired
    assert not backend.acquire(group, "d", 2, 60.0, meta(group)).acquired
    backend.release(group, "a")
    handed = backend.wait_for_release(group, "c", 1.0)  # a handoff
    assert handed is not None
    assert handed.handed_over
    tokens.append(handed.fencing_token)
    backend.release(group, "b")
    late = backend.cancel_wait(group, "d")  # handed over while giving up
    assert late is not None
    tokens.append(late.fencing_token)
    listed = {slot.token: slot.fencing_token for slot in backend.held_slots() if slot.group == group}
    assert listed == {"c": tokens[2], "d": tokens[3]}

    client.delete(*backend._keys(group))  # the group's records are gone (expiry, loss)
    tokens.append(backend.acquire(group, "e", 2, 60.0, meta(group)).fencing_token)
    assert tokens == sorted(set(tokens)), tokens
    assert all(isinstance(token, int) and token > 0 for token in tokens)


def test_lease_carries_its_fencing_token_and_a_view_that_ends_before_the_store_deadline():
    name = unique_name()
    with throttle(name=name, ttl=20) as first:
        pass
    with throttle(name=name, ttl=20) as second:
        [slot] = [s for s in get_backend().held_slots() if s.group.task_name == name]
        assert slot.fencing_token == second.fencing_token
        assert second.valid_until - time.monotonic() < slot.expires_in
    assert second.fencing_token > first.fencing_token


# --- Restart: a server that forgot its leases grants nothing for a grace ---------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def own_redis() -> Iterator[tuple[redis.Redis, float]]:
    """A Redis server of this test's own (own port and directory, no persistence), and
    ``time.monotonic()`` just before it was spawned."""
    port, directory = free_port(), tempfile.mkdtemp(prefix="tw-redis-")
    spawned_at = time.monotonic()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2)
    try:
        wait_for(lambda: _pings(client), message="own redis-server never answered")
        yield client, spawned_at
    finally:
        client.close()
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def test_a_freshly_started_server_grants_nothing_until_its_restart_grace_has_passed(own_redis):
    """Counted from the server process's start, by this machine's clock: the server's own
    uptime is whole seconds (up to one more than has passed), so the grace may last up to
    a second longer, never shorter (the fault campaign caught grants 1.06 s into a 1.5 s
    grace when the uptime was taken at its word)."""
    client, spawned_at = own_redis
    backend = RedisThrottleBackend(client, "tw:", restart_grace=1.5)
    group = SlotGroup(unique_name())
    refused = backend.acquire(group, "early", 1, 60.0, meta(group))
    assert not refused.acquired
    assert 0 < refused.retry_after <= 2.5
    granted_at = None

    def granted() -> bool:
        nonlocal granted_at
        if backend.acquire(group, "later", 1, 60.0, meta(group)).acquired:
            granted_at = time.monotonic()
            return True
        return False

    wait_for(granted, timeout=5)
    assert granted_at - spawned_at >= 1.5


# --- The lease renewer survives bad calls --------------------------------------------


class BlockingRenewals(RedisThrottleBackend):
    """Renewals of the tokens in ``blocked`` hang until ``unblock`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocked: set[str] = set()
        self.unblock = threading.Event()
        self.renewed: dict[str, int] = {}

    def renew(self, group, token, slot, ttl):
        if token in self.blocked:
            self.unblock.wait(30)
        self.renewed[token] = self.renewed.get(token, 0) + 1
        return super().renew(group, token, slot, ttl)


@pytest.fixture
def renewer(monkeypatch) -> Iterator[LeaseRenewer]:
    """A private renewer that replaces a stuck thread within half a second."""
    renewer = LeaseRenewer()
    renewer.STALL_AFTER = 0.5
    renewer.WATCHDOG_PERIOD = 0.05
    monkeypatch.setattr(lease_module, "lease_renewer", renewer)
    monkeypatch.setattr(limiter_module, "lease_renewer", renewer)
    yield renewer
    with renewer._condition:
        renewer._due.clear()


def test_a_renewal_that_hangs_marks_its_lease_lost_when_the_lease_runs_out(client, renewer):
    backend = BlockingRenewals(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
    group = SlotGroup(unique_name())
    try:
        backend.blocked.add("stuck")
        sent_at = time.monotonic()
        assert backend.acquire(group, "stuck", 1, 0.6, meta(group)).acquired
        lease = lease_module.Lease(
            backend, group, "stuck", "", 0.6, valid_until=lease_module.lease_view(sent_at, 0.6)
        )
        renewer.add(lease)
        wait_for(lambda: lease.lost, timeout=3, message="a hanging renewal left the lease believed")
        assert time.monotonic() - sent_at < 0.6, "lost was late: the store may have given the slot away"
    finally:
        backend.unblock.set()


def test_a_hanging_renewal_does_not_stop_the_other_leases_renewals(client, renewer, caplog):
    backend = BlockingRenewals(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
    group = SlotGroup(unique_name())
    try:
        backend.blocked.add("stuck")
        leases = {}
        for token in ("stuck", "healthy"):
            sent_at = time.monotonic()
            assert backend.acquire(group, token, 2, 1.5, meta(group)).acquired
            leases[token] = lease_module.Lease(
                backend, group, token, "", 1.5, valid_until=lease_module.lease_view(sent_at, 1.5)
            )
            renewer.add(leases[token])
        with caplog.at_level(logging.ERROR, logger="task_workflow.throttle.lease"):
            wait_for(lambda: backend.renewed.get("healthy", 0) >= 3, timeout=5, message="renewals stopped")
        assert not leases["healthy"].lost
        assert leases["stuck"].lost
        assert renewer.restarts >= 1
        assert "hangs" in caplog.text
    finally:
        backend.unblock.set()


def test_an_unexpected_error_in_the_renewer_is_logged_and_renewals_go_on(monkeypatch, caplog):
    failures = iter([RuntimeError("boom")])

    def failing_once() -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    monkeypatch.setattr(lease_module, "close_old_connections", failing_once)
    name = unique_name()
    caplog.set_level(logging.ERROR, logger="task_workflow.throttle.lease")
    with throttle(name=name, ttl=0.6) as lease:
        first = lease.valid_until
        wait_for(lambda: lease.valid_until > first + 0.3, timeout=3, message="renewals stopped")
        assert not lease.lost
    assert "boom" in caplog.text


def test_a_renewer_thread_that_died_is_replaced(renewer, caplog):
    caplog.set_level(logging.ERROR, logger="task_workflow.throttle.lease")
    name = unique_name()
    with throttle(name=name, ttl=0.6):
        pass
    with renewer._condition:
        renewer._thread = threading.Thread(target=lambda: None)  # a thread that has ended
        renewer._thread.start()
        renewer._thread.join()
    with throttle(name=name, ttl=0.6) as lease:
        first = lease.valid_until
        wait_for(lambda: lease.valid_until > first + 0.3, timeout=3, message="not renewed")
    assert "died" in caplog.text


# --- Signals: a receiver that raises neither leaks the lease nor fails the work ---------


@pytest.mark.parametrize("signal", [slot_acquired, slot_released], ids=["acquired", "released"])
def test_a_raising_signal_receiver_neither_leaks_the_slot_nor_fails_the_body(signal, caplog):
    name = unique_name()

    def raising(sender, lease, **kwargs):
        if sender.task_name == name:
            raise RuntimeError("receiver broke")

    signal.connect(raising, weak=False)
    try:
        with caplog.at_level(logging.ERROR), throttle(name=name, ttl=30) as lease:
            result = "done"
    finally:
        signal.disconnect(raising)
    assert result == "done"
    assert lease.released
    assert lease not in lease_renewer.held()
    assert [s for s in get_backend().held_slots() if s.group.task_name == name] == []
    assert "receiver broke" in caplog.text


# --- Listing: the key prefix is a literal, not a pattern -----------------------------


def test_listing_reads_only_its_own_prefix_even_with_glob_characters(client):
    base = f"tw-test:{uuid.uuid4().hex}:"
    globbed = RedisThrottleBackend(client, base + "[ab]*?:", restart_grace=0)
    other = RedisThrottleBackend(client, base + "a-other:", restart_grace=0)
    group = SlotGroup(unique_name())
    try:
        assert other.acquire(group, "theirs", 1, 30.0, meta(group)).acquired
        assert globbed.acquire(group, "ours", 1, 30.0, meta(group)).acquired
        assert [slot.token for slot in globbed.held_slots()] == ["ours"]
    finally:
        client.delete(*client.keys(base.encode() + b"*"))


def test_throttle_calls_have_a_socket_timeout_of_their_own(client):
    backend = get_backend()
    assert isinstance(backend, RedisThrottleBackend)
    kwargs = backend.client.connection_pool.connection_kwargs
    assert 0 < kwargs["socket_timeout"] <= settings.TASK_WORKFLOW.get("THROTTLE_SOCKET_TIMEOUT", 5.0)


def test_outside_a_task_a_full_group_times_out():
    name = unique_name()
    with throttle(name=name, ttl=30), pytest.raises(ThrottleTimeout):
        throttle(name=name, ttl=30, wait=0.05).acquire()


# --- The backend's own client: redis-py's public path ----------------------------------------


def test_the_throttle_socket_timeout_applies_to_the_backends_own_pool(settings):
    """The backend's client has a pool of its own (the cache's calls keep their
    timeouts) with the throttle's socket timeout, on the cache's server and database."""
    settings.TASK_WORKFLOW = {**settings.TASK_WORKFLOW, "THROTTLE_SOCKET_TIMEOUT": 0.75}
    throttle_module._backends.clear()
    backend = get_backend()
    assert isinstance(backend, RedisThrottleBackend)
    cache_client = caches[get_setting("CACHE")].client.get_client(write=True)
    own_pool, cache_pool = backend.client.connection_pool, cache_client.connection_pool
    assert own_pool is not cache_pool
    assert type(own_pool) is type(cache_pool)
    assert own_pool.connection_kwargs["socket_timeout"] == 0.75
    assert own_pool.connection_kwargs["socket_connect_timeout"] == 0.75
    for name in ("host", "port", "db"):
        assert own_pool.connection_kwargs.get(name) == cache_pool.connection_kwargs.get(name)
    assert backend._max_block <= 0.75 / 2  # a BLPOP never outlasts the socket timeout
    with throttle(name=unique_name(), ttl=30):
        [connection] = own_pool._available_connections or own_pool._in_use_connections
    assert connection._sock.gettimeout() == 0.75


def test_script_calls_go_through_execute_command(backend, monkeypatch):
    """Instrumentation that wraps the client's ``execute_command`` (tracing, metrics)
    sees every script call, as ``EVALSHA`` with the group's keys."""
    seen: list[tuple] = []
    real = backend.client.execute_command

    def recording(*args, **options):
        seen.append(args)
        return real(*args, **options)

    monkeypatch.setattr(backend.client, "execute_command", recording)
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "A", 1, 30.0, meta(group)).acquired
    assert not backend.acquire(group, "B", 1, 30.0, meta(group)).acquired
    assert backend.renew(group, "A", "", 30.0)
    assert backend.release(group, "A")  # a handoff
    assert backend.wait_for_release(group, "B", 1.0) is not None
    assert backend.cancel_wait(group, "B") is not None

    names = [args[0] for args in seen]
    assert names == ["EVALSHA"] * 4 + ["BLPOP", "EVALSHA"]
    shas = [args[1] for args in seen if args[0] == "EVALSHA"]
    assert shas == [
        backend._acquire.sha,
        backend._acquire.sha,
        backend._renew.sha,
        backend._release.sha,
        backend._cancel_wait.sha,
    ]
    holders = backend._keys(group)[0]
    assert all(args[3] == holders for args in seen if args[0] == "EVALSHA")


def test_a_server_that_forgot_the_scripts_loads_them_again(backend, client):
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "A", 1, 30.0, meta(group)).acquired
    client.script_flush()
    assert not backend.acquire(group, "B", 1, 30.0, meta(group)).acquired
    client.script_flush()
    assert backend.release(group, "A")  # the release and its announcement, both reloaded
    handed = backend.wait_for_release(group, "B", 1.0)
    assert handed is not None
    assert handed.handed_over
    client.script_flush()
    assert backend.renew(group, "B", "", 30.0)
    assert backend.release(group, "B")


#: Keeps the server busy for ARGV[1] ms (a script runs alone), reading its clock.
BUSY_SCRIPT = """
local function ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local until_ms = ms() + tonumber(ARGV[1])
while ms() < until_ms do end
return 1
"""


def slow_server_backend(client: redis.Redis, retry: Retry) -> RedisThrottleBackend:
    """A backend on ``client``'s server whose calls time out after 0.2 s."""
    kwargs = {**client.connection_pool.connection_kwargs, "socket_timeout": 0.2, "retry": retry}
    return RedisThrottleBackend(
        redis.Redis(connection_pool=redis.ConnectionPool(**kwargs)), "tw-test:", restart_grace=0
    )


def keep_busy(client: redis.Redis, ms: int) -> threading.Thread:
    """Keeps the server busy for ``ms`` from another connection; returns at once."""
    busy = threading.Thread(target=lambda: client.eval(BUSY_SCRIPT, 0, ms))
    busy.start()
    time.sleep(0.05)
    return busy


def test_a_call_that_timed_out_does_not_leave_its_reply_for_the_next_call(own_redis):
    """A script call whose reply did not come within the socket timeout (no retries
    configured): redis-py drops that connection, so the late reply (here: a fencing
    token) is never read as the answer to a later call. The test's own server is kept
    busy by a script on another connection meanwhile."""
    client, _ = own_redis
    backend = slow_server_backend(client, Retry(NoBackoff(), 0))
    group = SlotGroup(unique_name())
    # A server up for less than a second grants nothing, whatever the grace.
    wait_for(lambda: backend.acquire(group, "A", 2, 30.0, meta(group)).acquired)
    [connection] = backend.client.connection_pool._available_connections
    busy = keep_busy(client, 600)
    with pytest.raises(redis.exceptions.TimeoutError):
        backend.acquire(group, "B", 2, 30.0, meta(group))  # granted, but too late
    busy.join()
    assert connection._sock is None, "the timed-out connection was kept"
    assert backend.renew(group, "A", "", 30.0) is True  # a 1, not B's late fencing token
    assert backend.acquire(group, "B", 2, 30.0, meta(group)).acquired  # B finds its slot
    assert sorted(deadlines(backend, group)) == ["A", "B"]


def test_a_call_that_redis_py_retries_after_a_timeout_is_granted_once(own_redis):
    """With the cache's ``retry`` (copied into the backend's pool), redis-py sends a
    timed-out acquire again; the first one went through, so the second finds the caller's
    own slot: one slot, one fencing token."""
    client, _ = own_redis
    backend = slow_server_backend(client, Retry(NoBackoff(), 3))
    group = SlotGroup(unique_name())
    wait_for(lambda: backend.acquire(group, "A", 2, 30.0, meta(group)).acquired)
    busy = keep_busy(client, 300)
    granted = backend.acquire(group, "B", 2, 30.0, meta(group))  # times out, then retried
    busy.join()
    assert granted.acquired
    listed = {slot.token: slot.fencing_token for slot in backend.held_slots() if slot.group == group}
    assert sorted(listed) == ["A", "B"]
    assert listed["B"] == granted.fencing_token


def test_a_connection_the_network_broke_mid_call_is_dropped(backend):
    """A connection whose socket fails while a script call is sent is disconnected, not
    given back to the pool as it is; the next call works on a new one."""
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "A", 1, 30.0, meta(group)).acquired
    pool = backend.client.connection_pool
    [broken] = pool._available_connections
    real_socket = broken._sock
    broken._sock = FailingSocket()
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            backend.release(group, "A")
        assert broken._sock is None, "the broken connection was kept connected"
    finally:
        real_socket.close()
    assert backend.release(group, "A")  # on a new connection
    assert deadlines(backend, group) == {}


def test_the_backend_works_in_a_forked_child(backend):
    """redis-py's pool resets itself in a forked child: the child opens its own
    connections instead of sharing the parent's socket."""
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "parent", 2, 30.0, meta(group)).acquired
    parent_connection = backend.client.connection_pool._available_connections[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            ok = backend.acquire(group, "child", 2, 30.0, meta(group)).acquired
            fresh = parent_connection not in backend.client.connection_pool._available_connections
            ok = ok and fresh and backend.release(group, "child")
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert backend.release(group, "parent")  # the parent's connection still answers


class FailingSocket:
    """Stands in for a connection's socket that the network broke."""

    def sendall(self, data: bytes) -> None:
        raise ConnectionResetError("connection reset by peer")

    def settimeout(self, timeout: float | None) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


# --- A handoff is announced to its waiter only while the waiter holds it -----------------


@pytest.mark.parametrize("attempts_again", [False, True], ids=["waits-at-once", "attempts-again-first"])
def test_a_handoff_force_released_before_its_waiter_woke_is_not_granted_to_it(backend, attempts_again):
    """Found by the stateful property test (a fencing token granted twice): W is handed
    H's slot while it is not blocked in its wait, an operator force-releases W's slot (it
    goes on to X), then W waits, at once or after attempting again and being refused.
    The first version left the announcement on W's wake list, so the wait granted W a
    slot it no longer held, with the fencing token of its first handoff, while X held
    the slot."""
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "H", 1, 60.0, meta(group)).acquired
    for token in ("W", "X"):
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    assert backend.release(group, "H")  # handed to W, which is not waiting yet
    [handed] = [slot for slot in backend.held_slots() if slot.group == group]
    assert handed.token == "W"
    assert backend.release(group, "W", handed.slot)  # the operator's force release
    assert list(deadlines(backend, group)) == ["X"]
    if attempts_again:
        assert not backend.acquire(group, "W", 1, 60.0, meta(group)).acquired

    woken = backend.wait_for_release(group, "W", 0.05)

    assert woken is None, f"W was granted fencing token {woken.fencing_token}, handed to it before"
    assert backend.cancel_wait(group, "W") is None
    assert list(deadlines(backend, group)) == ["X"]


class ForceReleasedBeforeTheWait(RedisThrottleBackend):
    """Runs ``before_first_wait(token)`` just before the first ``wait_for_release``."""

    before_first_wait = None

    def wait_for_release(self, group, token, timeout):
        hook, self.before_first_wait = self.before_first_wait, None
        if hook is not None:
            hook(token)
        return super().wait_for_release(group, token, timeout)


def test_a_waiter_whose_handed_slot_was_force_released_before_it_woke_does_not_run(client):
    """The same through the public API: the waiter's slot is handed over and
    force-released between its refused attempt and its wait. It must not come out of
    ``acquire`` with a lease on a slot that another caller holds."""
    name = unique_name("force")
    group = SlotGroup(name)
    backend = ForceReleasedBeforeTheWait(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
    throttle_module._backends[(os.getpid(), get_setting("CACHE"))] = backend
    holder = throttle(name=name, ttl=30).acquire()

    def hand_over_and_force_release(waiter: str) -> None:
        assert not backend.acquire(group, "next", 1, 30.0, meta(group)).acquired  # behind the waiter
        holder.release()  # handed to the waiter
        [handed] = [slot for slot in backend.held_slots() if slot.group == group]
        assert handed.token == waiter
        assert force_release([handed.ref], actor="test") == [(group, waiter, True)]

    backend.before_first_wait = hand_over_and_force_release
    try:
        try:
            lease = throttle(name=name, ttl=30, wait=0.3).acquire()
        except ThrottleTimeout:
            lease = None
        else:
            lease.release()
        assert backend.before_first_wait is None, "the waiter never waited"
        assert lease is None, f"the waiter ran on a force-released slot (fence {lease.fencing_token})"
        assert list(deadlines(backend, group)) == ["next"]
    finally:
        client.delete(*backend._keys(group))


def test_a_handoff_announcement_expires_before_the_claim_it_announces(client):
    """A waiter that wakes after its handed claim lapsed (the slot may be someone else's
    by then) must not find the announcement: the wake entry expires before the claim's
    deadline by the server's clock (a key lives through the millisecond of its expiry, a
    lease does not). The first version let both end in the same millisecond."""
    backend = ShortClaims(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
    group = SlotGroup(unique_name())
    try:
        assert backend.acquire(group, "H", 1, 60.0, meta(group)).acquired
        for token in ("W", "X"):
            assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
        assert backend.release(group, "H")  # handed to W under a 300 ms claim
        claim_ends = client.zscore(backend._keys(group)[0], "W")
        announced_until = client.pexpiretime(backend._keys(group)[7])  # the group's wake list
        assert 0 < announced_until < claim_ends

        wait_for(lambda: deadlines(backend, group)["W"] <= 0, message="W's claim never lapsed")
        assert backend.acquire(group, "X", 1, 60.0, meta(group)).acquired  # the lapsed slot
        assert not backend.acquire(group, "W", 1, 60.0, meta(group)).acquired
        assert backend.wait_for_release(group, "W", 0.05) is None
    finally:
        client.delete(*backend._keys(group))


def test_a_waiter_that_finds_its_handed_slot_by_attempting_has_no_announcement_left(backend, client):
    """The acquire that finds a handed slot confirms it: the wake entry goes with it."""
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "H", 1, 60.0, meta(group)).acquired
    assert not backend.acquire(group, "W", 1, 60.0, meta(group)).acquired
    assert backend.release(group, "H")  # handed to W
    assert backend.acquire(group, "W", 1, 60.0, meta(group)).acquired  # the own-slot path
    assert not client.exists(backend._wake_key(group, "W"))
    assert not client.exists(backend._keys(group)[7])  # nor on the group's list


def test_a_waiter_that_pops_another_waiters_handoff_passes_it_on(backend, client):
    """Every waiter blocks on the group's wake list too; Redis serves whoever blocked
    longest. A waiter that pops an announcement naming another waiter passes it on to that
    waiter's own list (still owed: once, with its fencing token) and attempts again."""
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "H", 1, 60.0, meta(group)).acquired
    for token in ("first", "second"):
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    assert backend.release(group, "H")  # handed to "first", announced on the group's list
    [fence] = [slot.fencing_token for slot in backend.held_slots() if slot.group == group]

    assert backend.wait_for_release(group, "second", 0.05) is None  # popped it: passes it on
    assert client.lrange(backend._wake_key(group, "first"), 0, -1) == [str(fence).encode()]
    handed = backend.wait_for_release(group, "first", 0.05)
    assert handed is not None
    assert handed.fencing_token == fence
    assert backend.wait_for_release(group, "first", 0.01) is None  # told once
    assert backend.waiting(group) == ["second"]


def test_a_handoff_passed_on_after_its_slot_was_force_released_is_dropped(backend, client):
    group = SlotGroup(unique_name())
    assert backend.acquire(group, "H", 1, 60.0, meta(group)).acquired
    for token in ("first", "second"):
        assert not backend.acquire(group, token, 1, 60.0, meta(group)).acquired
    assert backend.release(group, "H")  # handed to "first"
    popped = client.lpop(backend._keys(group)[7])  # "second" popped it ... (as BLPOP would)
    waiter, _, fence = popped.partition(b" ")
    assert backend.release(group, "first")  # ... the operator force-releases "first" ...
    backend._pass_on(group, waiter.decode(), fence)  # ... then "second" passes it on
    assert not client.exists(backend._wake_key(group, "first"))
    assert backend.wait_for_release(group, "first", 0.01) is None
