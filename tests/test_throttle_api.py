"""The public ``throttle`` (``task_workflow.tasks.throttle``), in-process.

Outside a task it raises ``ThrottleTimeout`` / ``ThrottleUnavailable``; inside a task
(Celery's eager ``apply()`` here) it re-queues through ``requeue``. Tests that touch a
slot store run on both backends (``store``): Redis through django-redis, and the generic
backend on a ``DatabaseCache``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from celery import shared_task
from celery.canvas import Signature
from celery.exceptions import Retry
from django.conf import settings
from django.core.cache import caches
from django.db import connections
from django.test import override_settings

import task_workflow.throttle as throttle_module
from task_workflow.signals import slot_acquired, slot_released, slot_waiting
from task_workflow.tasks import (
    ImproperlyDecorated,
    ThrottleTimeout,
    ThrottleUnavailable,
    TransitionNotPermitted,
    throttle,
    transition,
)
from task_workflow.throttle import (
    THROTTLE_ATTEMPT_HEADER,
    CacheThrottleBackend,
    DatabaseCacheThrottleBackend,
    Lease,
    RedisThrottleBackend,
    SlotGroup,
    get_backend,
    requeue,
)
from task_workflow.throttle.lease import LeaseRenewer, lease_renewer
from task_workflow.transitions import APPLIED_TRANSITIONS_HEADER, Application
from tests.testapp.models import BodyRun, Volume

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"
CACHE_TABLE = "tw_test_throttle_api"
DEAD_CACHE = {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens there
    "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
}

S = Volume.States


def unique_name(label: str = "group") -> str:
    return f"tests.api.{label}.{uuid.uuid4().hex[:12]}"


# --- Fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_backends():
    """Backends are memoised per (pid, cache alias): forget those built under other
    settings."""
    throttle_module._backends.clear()
    yield
    throttle_module._backends.clear()


@dataclass
class Store:
    alias: str
    backend: object

    @property
    def is_redis(self) -> bool:
        return isinstance(self.backend, RedisThrottleBackend)

    def tokens(self, name: str, *, live_only: bool = True) -> set[str]:
        return {
            slot.token
            for slot in self.backend.held_slots()
            if slot.group.task_name == name and not (live_only and slot.expired)
        }


def close_renewer_connections() -> None:
    """Close the database connection the lease renewer thread opened (for the
    DatabaseCache), so the test database can be flushed and dropped: a fake lease whose
    'renewal' runs there and closes it."""
    done = threading.Event()

    class Closer:
        def renew(self, group, token, slot, ttl):
            connections.close_all()
            done.set()
            return True

    lease = Lease(backend=Closer(), group=SlotGroup("tests.api.closer"), token="closer", slot="", ttl=0.003)
    lease_renewer.add(lease)
    done.wait(5)
    lease_renewer.discard(lease)


def store_params(*, threads: bool):
    # The database cache in the test's transaction; committed when other threads (the
    # lease renewer too) use it with their own connections.
    database = pytest.mark.django_db(transaction=True) if threads else pytest.mark.django_db
    return [
        pytest.param("redis", marks=[pytest.mark.services, pytest.mark.django_db]),
        pytest.param("database-cache", marks=database),
    ]


@pytest.fixture(params=store_params(threads=False))
def store(request, committed_cache_tables):
    """A slot store used by this thread only."""
    yield from make_store(request.param)


@pytest.fixture(params=store_params(threads=True))
def threaded_store(request, committed_cache_tables):
    """A slot store used by other threads too (waiters, the lease renewer)."""
    yield from make_store(request.param)


@pytest.fixture
def redis_store():
    """The Redis slot store alone (handoffs exist there only)."""
    yield from make_store("redis")


def make_store(kind):
    """TASK_WORKFLOW['CACHE'] pointed at a fresh cache alias of the given kind."""
    alias = "tw_api_store"
    prefix = uuid.uuid4().hex
    if kind == "redis":
        config = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": prefix}
    else:
        config = {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": CACHE_TABLE,
            "KEY_PREFIX": prefix,
            "OPTIONS": {"MAX_ENTRIES": 10**9},  # no culling of live leases
        }
    with override_settings(
        CACHES={**settings.CACHES, alias: config},
        TASK_WORKFLOW={**settings.TASK_WORKFLOW, "CACHE": alias},
    ):
        backend = get_backend()
        expected = (
            RedisThrottleBackend if kind == "redis" else (CacheThrottleBackend, DatabaseCacheThrottleBackend)
        )
        assert isinstance(backend, expected)
        try:
            yield Store(alias, backend)
        finally:
            assert not [lease for lease in lease_renewer.held() if lease.backend is backend], (
                "a lease of this test is still held"
            )
            if kind == "redis":
                client = backend.client
                keys = list(client.scan_iter(match=f"*{prefix}*"))
                if keys:
                    client.delete(*keys)
            else:
                close_renewer_connections()
                caches[alias].clear()


def ttl_for_renewal(store: Store) -> float:
    """A TTL short enough to need renewals within a test. DatabaseCache keeps expiry
    times in whole seconds, so a lease there may end up to 1 s early: longer TTL."""
    return 0.6 if store.is_redis else 2.4


def run_in_thread(target, *args):
    """Start ``target`` in a thread that closes its database connections; return the
    thread and a list that receives its result or exception."""
    outcome: list = []

    def run():
        try:
            outcome.append(target(*args))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# --- Argument validation -----------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [0, -1, True, False, "2", 1.5, None])
def test_concurrency_must_be_an_int_of_at_least_one(concurrency):
    with pytest.raises(ValueError, match="concurrency"):
        throttle(name="x", concurrency=concurrency)


@pytest.mark.parametrize(
    "key", [1.5, ["a"], {"a": 1}, True, False, object(), b"bytes", ("a",)], ids=lambda k: type(k).__name__
)
def test_key_of_another_type_is_a_type_error_naming_it(key):
    with pytest.raises(TypeError, match=f"got {type(key).__name__}") as raised:
        throttle(key=key, name="x")
    assert not isinstance(raised.value, ImproperlyDecorated)


@pytest.mark.parametrize(
    ("key", "stored"),
    [
        ("backend-1", "backend-1"),
        (42, "42"),
        (uuid.UUID(int=7), str(uuid.UUID(int=7))),
        ("", ""),
        (None, None),
    ],
)
def test_str_int_and_uuid_keys_are_kept_as_str(key, stored):
    assert throttle(key=key, name="x").key == stored


@pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5, True, "5", None])
def test_ttl_must_be_positive_seconds(ttl):
    with pytest.raises(ValueError, match="ttl"):
        throttle(name="x", ttl=ttl)


@pytest.mark.parametrize("wait", [-1, -0.01, True, "5"])
def test_wait_must_be_seconds_or_none(wait):
    with pytest.raises(ValueError, match="wait"):
        throttle(name="x", wait=wait)


@pytest.mark.parametrize("wait", [0, 0.5, 10, None])
def test_valid_waits_are_accepted(wait):
    assert throttle(name="x", wait=wait).wait == wait


@pytest.mark.parametrize("name", ["", 5, b"x"])
def test_name_must_be_a_non_empty_str(name):
    with pytest.raises(ValueError, match="name"):
        throttle(name=name)


# --- Misuse ------------------------------------------------------------------------------


def test_outside_a_task_name_is_required():
    guarded = throttle(key="k")

    with pytest.raises(ImproperlyDecorated, match=r"name=") as raised, guarded:
        pytest.fail("ran without a slot")
    assert "outside a running Celery task" in str(raised.value)


def test_decorated_function_called_outside_a_task_needs_name():
    ran = []

    @throttle(concurrency=2)
    def work():
        ran.append(1)

    with pytest.raises(ImproperlyDecorated, match=r"name="):
        work()
    assert ran == []


def test_decorator_above_shared_task_is_refused():
    with pytest.raises(ImproperlyDecorated, match="under @shared_task"):

        @throttle(name="x")
        @shared_task(name="tests.api.decorated_in_the_wrong_order")
        def wrong_order():
            pass


def test_decorating_something_not_callable_is_refused():
    with pytest.raises(ImproperlyDecorated):
        throttle(name="x")("not a function")


# --- Outside a task ----------------------------------------------------------------------


def test_busy_slot_times_out_after_wait(store):
    name = unique_name()
    with throttle(name=name):
        start = time.monotonic()
        with pytest.raises(ThrottleTimeout, match=name) as raised, throttle(name=name, wait=0.1):
            pytest.fail("a second holder got in")
        elapsed = time.monotonic() - start

    assert 0.09 <= elapsed < 1.0
    assert "within 0.1s" in str(raised.value)
    # The refused caller left nothing behind: the slot is free again for one holder.
    assert store.tokens(name) == set()
    with throttle(name=name, wait=0):
        assert len(store.tokens(name)) == 1


def test_wait_none_waits_until_another_thread_releases(threaded_store):
    store = threaded_store
    name = unique_name()
    holder = throttle(name=name).acquire()
    acquired_at: list[float] = []

    def wait_for_slot():
        with throttle(name=name, wait=None) as lease:
            acquired_at.append(time.monotonic())
            return lease.token

    thread, outcome = run_in_thread(wait_for_slot)
    time.sleep(0.4)
    assert acquired_at == [], "got a slot while it was held"
    released_at = time.monotonic()
    holder.release()
    thread.join(5)

    assert not thread.is_alive()
    assert isinstance(outcome[0], str), outcome
    assert 0 <= acquired_at[0] - released_at < 0.5
    assert store.tokens(name) == set()


def handoff_with_recorded_renewals(store: Store, monkeypatch) -> tuple[str, list[tuple[str, str]]]:
    """A waiter thread blocks for a slot; the holder releases; the slot is handed over.

    Returns the waiter's token and the renewals made (token, thread name) until the
    waiter's lease was first renewed."""
    name = unique_name()
    backend = store.backend
    renewals: list[tuple[str, str]] = []
    renewed, waiting = threading.Event(), threading.Event()
    renew, wait_for_release = backend.renew, backend.wait_for_release

    def recording_renew(group, token, slot, ttl):
        result = renew(group, token, slot, ttl)
        renewals.append((token, threading.current_thread().name))
        renewed.set()
        return result

    def signalling_wait(group, token, timeout):
        waiting.set()
        return wait_for_release(group, token, timeout)

    monkeypatch.setattr(backend, "renew", recording_renew)
    monkeypatch.setattr(backend, "wait_for_release", signalling_wait)
    holder = throttle(name=name, ttl=30).acquire()

    def wait_for_slot():
        with throttle(name=name, wait=None, ttl=30) as lease:
            assert renewed.wait(5), "the handed-over claim was never extended"
            [slot] = [s for s in backend.held_slots() if s.token == lease.token]
            assert slot.expires_in > 25, "the claim was not extended to the holder's lease"
            return lease.token

    thread, outcome = run_in_thread(wait_for_slot)
    assert waiting.wait(5)
    holder.release()
    thread.join(10)
    assert isinstance(outcome[0], str), outcome
    return outcome[0], renewals


@pytest.mark.services
@pytest.mark.django_db
def test_handed_over_slot_is_held_at_once_and_its_claim_extended_in_the_background(redis_store, monkeypatch):
    """On Redis a release hands the slot to the waiter under a short claim. The waiter
    holds it when woken; the lease renewer, not the waiter, extends the claim."""
    token, renewals = handoff_with_recorded_renewals(redis_store, monkeypatch)
    assert renewals[0] == (token, "task-workflow-lease-renewer")


@pytest.mark.services
@pytest.mark.django_db
def test_handed_over_slot_woken_late_is_extended_before_it_is_used(redis_store, monkeypatch):
    """A waiter woken long after the release (as if descheduled for most of the claim)
    extends the claim itself before it counts as holding the slot."""
    # No claim left to trust: every wake-up is "late" now.
    monkeypatch.setattr(RedisThrottleBackend, "handoff_claim", 0.0)
    token, renewals = handoff_with_recorded_renewals(redis_store, monkeypatch)
    assert renewals[0][0] == token
    assert renewals[0][1] != "task-workflow-lease-renewer"


def test_defaults_are_read_from_settings_at_call_time(store):
    name = unique_name()
    guarded = throttle(name=name)  # wait and ttl from TASK_WORKFLOW, when used
    tw = {**settings.TASK_WORKFLOW, "THROTTLE_WAIT": 0.1, "LOCK_TTL": 7}
    with override_settings(TASK_WORKFLOW=tw), guarded as lease:
        assert lease.ttl == 7
        start = time.monotonic()
        with pytest.raises(ThrottleTimeout):
            throttle(name=name).acquire()
        assert time.monotonic() - start < 1.0


def test_unreachable_store_fails_closed_outside_a_task():
    ran = []
    names = [unique_name(), unique_name()]
    with override_settings(
        CACHES={**settings.CACHES, "dead": DEAD_CACHE},
        TASK_WORKFLOW={**settings.TASK_WORKFLOW, "CACHE": "dead"},
    ):
        # Named explicitly, and through TASK_WORKFLOW['CACHE'].
        for guarded in (throttle(name=names[0], cache="dead"), throttle(name=names[1])):
            start = time.monotonic()
            with pytest.raises(ThrottleUnavailable, match="unreachable"), guarded:
                ran.append(1)
            assert time.monotonic() - start < 5

    assert ran == []
    assert not [lease for lease in lease_renewer.held() if lease.group.task_name in names]


# --- One throttle object, many holders ---------------------------------------------------


def test_decorator_object_is_shared_by_threads_without_shared_state(threaded_store):
    store = threaded_store
    name = unique_name()
    shared = throttle(name=name, concurrency=2, wait=5)
    both_inside = threading.Barrier(3, timeout=5)

    @shared
    def work():
        both_inside.wait()  # both threads hold a slot at once...
        both_inside.wait()  # ...until the test has looked
        return threading.get_ident()

    threads = [run_in_thread(work) for _ in range(2)]
    both_inside.wait()
    held_meanwhile = store.tokens(name)
    with pytest.raises(ThrottleTimeout):
        throttle(name=name, concurrency=2, wait=0).acquire()
    both_inside.wait()
    for thread, _ in threads:
        thread.join(5)

    results = [outcome[0] for _, outcome in threads]
    assert all(isinstance(result, int) for result in results), results
    assert len(set(results)) == 2
    assert len(held_meanwhile) == 2
    assert store.tokens(name) == set()


def test_context_manager_object_is_shared_by_threads(threaded_store):
    store = threaded_store
    name = unique_name()
    shared = throttle(name=name, concurrency=2, wait=5)
    both_inside = threading.Barrier(2, timeout=5)

    def hold():
        with shared as lease:
            both_inside.wait()
            token = lease.token
            both_inside.wait()
        return token, lease.released

    threads = [run_in_thread(hold) for _ in range(2)]
    for thread, _ in threads:
        thread.join(10)

    results = [outcome[0] for _, outcome in threads]
    assert all(isinstance(result, tuple) for result in results), results
    assert results[0][0] != results[1][0]
    assert all(released for _, released in results)
    assert store.tokens(name) == set()


def test_nested_use_of_one_object_in_one_thread(store):
    name = unique_name()
    guarded = throttle(name=name, concurrency=2, wait=0)

    with guarded as outer:
        with guarded as inner:
            assert inner is not outer
            assert store.tokens(name) == {outer.token, inner.token}
            with pytest.raises(ThrottleTimeout):
                throttle(name=name, concurrency=2, wait=0).acquire()
        # The inner exit released the inner lease, not the outer one.
        assert inner.released
        assert not outer.released
        assert store.tokens(name) == {outer.token}
    assert outer.released
    assert store.tokens(name) == set()


# --- Leases ------------------------------------------------------------------------------


def test_background_renewal_keeps_a_lease_longer_than_its_ttl(threaded_store):
    store = threaded_store
    name = unique_name()
    ttl = ttl_for_renewal(store)
    hold = 2.0 if store.is_redis else 3.0

    with throttle(name=name, ttl=ttl, wait=0) as lease:
        time.sleep(hold)  # holding past the TTL is what is tested
        assert lease in lease_renewer.held()
        assert not lease.lost
        assert store.tokens(name) == {lease.token}
        with pytest.raises(ThrottleTimeout):
            throttle(name=name, wait=0).acquire()

    assert lease not in lease_renewer.held()
    assert store.tokens(name, live_only=False) == set()


def test_force_released_lease_is_flagged_lost_and_its_late_release_is_harmless(threaded_store):
    store = threaded_store
    name = unique_name()
    ttl = ttl_for_renewal(store)
    lease = throttle(name=name, ttl=ttl, wait=0).acquire()

    # An operator (or an expiry) takes the slot away from the running holder.
    assert store.backend.release(lease.group, lease.token, lease.slot) is True
    deadline = time.monotonic() + ttl + 1.0  # the next renewal is due within ttl / 3
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.02)

    assert lease.lost
    assert lease not in lease_renewer.held()
    successor = throttle(name=name, wait=0).acquire()
    try:
        assert lease.release() is False
        # The late release did not free the successor's slot.
        assert store.tokens(name) == {successor.token}
    finally:
        successor.release()


class RecordingRenewals:
    """A fake backend for the renewer alone: records which tokens were renewed, and when."""

    def __init__(self) -> None:
        self.renewed: dict[str, threading.Event] = {}

    def lease(self, token: str, ttl: float) -> Lease:
        self.renewed[token] = threading.Event()
        return Lease(backend=self, group=SlotGroup("tests.api.renewer"), token=token, slot="", ttl=ttl)

    def renew(self, group, token, slot, ttl):
        self.renewed[token].set()
        return True


class CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        super().notify(n)


@pytest.fixture
def renewer():
    """A private renewer whose wake-ups (notify calls) are counted."""
    renewer = LeaseRenewer()
    renewer._condition = CountingCondition()
    yield renewer
    with renewer._condition:
        renewer._due.clear()


def wait_until_sleeping(renewer: LeaseRenewer, until: float) -> None:
    """Until the renewer thread has gone to sleep with its next wake-up at ``until``."""
    deadline = time.monotonic() + 5
    while not (renewer._wake_at == until and renewer._condition._waiters):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the renewer thread never went to sleep"
        time.sleep(0.005)


def test_renewer_is_woken_only_by_a_lease_due_before_its_next_wake_up(renewer):
    backend = RecordingRenewals()
    first = backend.lease("first", ttl=30.0)
    renewer.add(first)  # starts the thread
    wait_until_sleeping(renewer, renewer._due[first])
    woken = renewer._condition.notified

    # Same TTL, taken later: due after the thread's wake-up, so it is not woken.
    for n in range(20):
        renewer.add(backend.lease(f"same-{n}", ttl=30.0))
    assert renewer._condition.notified == woken

    # A shorter lease is due first: the thread is woken and renews it in time.
    short = backend.lease("short", ttl=0.3)
    renewer.add(short)
    assert renewer._condition.notified == woken + 1
    assert backend.renewed["short"].wait(5)
    assert not backend.renewed["first"].is_set()


def test_idle_renewer_sleeps_its_idle_period_and_renews_a_new_lease_in_time(renewer):
    backend = RecordingRenewals()
    lease = backend.lease("one", ttl=3.0)  # renewed every second: the idle period
    renewer.add(lease)
    assert backend.renewed["one"].wait(5)
    renewer.discard(lease)
    # Idle now: it wakes on its own after the idle period, not for every new lease.
    deadline = time.monotonic() + 5
    while not (renewer._condition._waiters and not renewer._due and renewer._wake_at > time.monotonic()):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the renewer thread never went idle"
        time.sleep(0.005)
    woken = renewer._condition.notified

    again = backend.lease("again", ttl=3.0)
    renewer.add(again)

    assert renewer._condition.notified == woken
    assert backend.renewed["again"].wait(5), "a lease taken while the renewer slept was not renewed"


def test_signals_are_sent_once_per_acquire_and_release(store):
    name = unique_name()
    acquired, released = [], []

    def on_acquired(sender, lease, **kwargs):
        if sender.task_name == name:
            acquired.append((sender, lease))

    def on_released(sender, lease, **kwargs):
        if sender.task_name == name:
            released.append((sender, lease))

    slot_acquired.connect(on_acquired, weak=False)
    slot_released.connect(on_released, weak=False)
    try:
        with throttle(name=name, key="k") as lease:
            assert acquired == [(SlotGroup(name, "k"), lease)]
            assert released == []
            with pytest.raises(ThrottleTimeout):  # a refused caller sends nothing
                throttle(name=name, key="k", wait=0).acquire()
        assert lease.release() is False  # a second release: no second signal
    finally:
        slot_acquired.disconnect(on_acquired)
        slot_released.disconnect(on_released)

    assert acquired == [(SlotGroup(name, "k"), lease)]
    assert released == [(SlotGroup(name, "k"), lease)]


def test_slot_waiting_is_sent_once_by_a_caller_that_waits_and_never_by_one_that_gives_up_at_once(
    threaded_store,
):
    """A caller that finds the slot taken and waits sends ``slot_waiting`` once (with the
    group, the limit and when it asked), before its ``slot_acquired``; a caller with
    ``wait=0`` and a caller granted at once send none."""
    name = unique_name()
    events: list[tuple[str, Any]] = []
    started_waiting = threading.Event()

    def on_waiting(sender, concurrency, waiting_since, **kwargs):
        if sender.task_name == name:
            events.append(("waiting", (sender, concurrency, waiting_since)))
            started_waiting.set()

    def on_acquired(sender, lease, **kwargs):
        if sender.task_name == name:
            events.append(("acquired", threading.get_ident()))

    slot_waiting.connect(on_waiting, weak=False)
    slot_acquired.connect(on_acquired, weak=False)
    try:
        holder = throttle(name=name, key="k").acquire()
        with pytest.raises(ThrottleTimeout):
            throttle(name=name, key="k", wait=0).acquire()
        assert [kind for kind, _ in events] == ["acquired"]

        asked_at = time.time()
        results: list[Any] = []
        waiter = threading.Thread(
            target=lambda: results.append(throttle(name=name, key="k", wait=10).acquire())
        )
        waiter.start()
        try:
            assert started_waiting.wait(10), "the waiting caller sent no slot_waiting"
        finally:
            holder.release()
            waiter.join(15)
        assert results, "the waiting caller did not get the slot"
        results[0].release()
    finally:
        slot_waiting.disconnect(on_waiting)
        slot_acquired.disconnect(on_acquired)

    kinds = [kind for kind, _ in events]
    assert kinds == ["acquired", "waiting", "acquired"]
    group, concurrency, waiting_since = events[1][1]
    assert (group, concurrency) == (SlotGroup(name, "k"), 1)
    assert asked_at - 1 <= waiting_since <= time.time()
    assert events[2][1] == waiter.ident


def test_both_signals_are_sent_while_the_store_still_counts_the_slot_as_held(store):
    """Invariant: receivers see a hold nested in the real one, so intervals between
    ``slot_acquired`` and ``slot_released`` of one group never overlap beyond the limit
    (a timeline built from them can be trusted); the released one comes before the store
    can give the slot to the next caller."""
    name = unique_name()
    held_when_sent: dict[str, bool] = {}

    def check(signal_name):
        def receiver(sender, lease, **kwargs):
            if sender.task_name == name:
                tokens = {slot.token for slot in get_backend().held_slots() if slot.group == sender}
                held_when_sent[signal_name] = lease.token in tokens

        return receiver

    on_acquired, on_released = check("acquired"), check("released")
    slot_acquired.connect(on_acquired, weak=False)
    slot_released.connect(on_released, weak=False)
    try:
        with throttle(name=name, key="k"):
            pass
    finally:
        slot_acquired.disconnect(on_acquired)
        slot_released.disconnect(on_released)

    assert held_when_sent == {"acquired": True, "released": True}


def test_a_slot_released_receiver_interrupted_by_a_base_exception_still_frees_the_slot(store):
    """``send_robust`` stops ``Exception`` only; a worker shutdown (``SystemExit``) raised in
    a receiver goes on up, and the store is still told."""
    name = unique_name()

    def interrupted(sender, lease, **kwargs):
        if sender.task_name == name:
            raise SystemExit("worker shutting down")

    slot_released.connect(interrupted, weak=False)
    try:
        lease = throttle(name=name, key="k").acquire()
        with pytest.raises(SystemExit):
            lease.release()
    finally:
        slot_released.disconnect(interrupted)
    assert [slot for slot in get_backend().held_slots() if slot.group.task_name == name] == []


# --- Inside a task (eager apply) ---------------------------------------------------------


@shared_task(name="tests.api.hold_in_task", bind=True)
def hold_in_task(self, key):
    """Take a slot of (this task's name, key) and describe it."""
    with throttle(key=key, wait=0) as lease:
        listed = [slot for slot in get_backend().held_slots() if slot.token == lease.token]
        return {
            "group": lease.group,
            "listed": listed,
            "request_id": self.request.id,
            "request_hostname": self.request.hostname,
        }


@shared_task(name="tests.api.guarded_in_task", bind=True)
def guarded_in_task(self, key, cache=None):
    """Run a guarded block; report the throttle's Retry instead of raising it (eager
    apply would run the re-queued task again at once, and again...)."""
    try:
        with throttle(key=key, wait=0, cache=cache):
            return {"ran": True}
    except Retry as exc:
        return {"ran": False, "retry": exc, "request_id": self.request.id, "cause": exc.__cause__}


def test_inside_a_task_the_group_is_the_task_name_and_the_task_is_recorded(store):
    key = uuid.uuid4().hex
    result = hold_in_task.apply(args=(key,))

    assert result.successful(), result.traceback
    info = result.result
    assert info["group"] == SlotGroup("tests.api.hold_in_task", key)
    [slot] = info["listed"]
    assert slot.group == SlotGroup("tests.api.hold_in_task", key)
    assert slot.task_id == info["request_id"]
    assert slot.hostname == info["request_hostname"]
    assert slot.pid == os.getpid()
    assert store.tokens("tests.api.hold_in_task") == set()


def test_busy_slot_inside_a_task_requeues_instead_of_timing_out(store):
    key = uuid.uuid4().hex
    with throttle(name=guarded_in_task.name, key=key):
        result = guarded_in_task.apply(args=(key,))

    assert result.successful(), result.traceback
    info = result.result
    assert info["ran"] is False
    retry = info["retry"]
    assert isinstance(retry, Retry)
    assert "slots busy" in str(retry)
    assert retry.sig.id == info["request_id"]
    assert retry.sig.options["headers"][THROTTLE_ATTEMPT_HEADER] == 1
    # Once the slot is free, the task runs.
    assert guarded_in_task.apply(args=(key,)).result == {"ran": True}


def test_unreachable_store_inside_a_task_requeues():
    with override_settings(CACHES={**settings.CACHES, "dead": DEAD_CACHE}):
        result = guarded_in_task.apply(args=("k",), kwargs={"cache": "dead"})

    assert result.successful(), result.traceback
    info = result.result
    assert info["ran"] is False
    assert isinstance(info["retry"], Retry)
    assert "unreachable" in str(info["retry"])
    assert info["retry"].sig.id == info["request_id"]
    assert info["cause"] is not None


# --- requeue -----------------------------------------------------------------------------

REQUEUED: dict[str, object] = {}


@shared_task(name="tests.api.requeue_me", bind=True)
def requeue_me(self, number, word="w", send=False):
    """Build the throttle's re-queue from inside a running task; report it."""
    REQUEUED["request"] = {
        "id": self.request.id,
        "retries": self.request.retries,
        "headers": dict(self.request.headers or {}),
    }
    if send:  # as on a worker: the re-queue is sent, not run again by apply()
        self.request.is_eager = False
    REQUEUED["retry"] = requeue(self, "slot busy")
    return "done"


@pytest.mark.parametrize(
    ("attempt_header", "retries", "attempt", "ceiling"),
    [
        (None, 0, 1, 2.0),  # backoff 2 * 2**0
        (2, 3, 3, 8.0),  # 2 * 2**2
        (9, 1, 10, 20.0),  # 2 * 2**9 = 1024, capped at 20
    ],
)
def test_requeue_keeps_id_and_retries_and_backs_off(attempt_header, retries, attempt, ceiling, monkeypatch):
    sent = []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **kw: sent.append(sig))
    headers = {"custom": "kept"}
    if attempt_header is not None:
        headers[THROTTLE_ATTEMPT_HEADER] = attempt_header
    tw = {**settings.TASK_WORKFLOW, "THROTTLE_RETRY_BACKOFF": 2, "THROTTLE_RETRY_BACKOFF_MAX": 20}
    with override_settings(TASK_WORKFLOW=tw):
        result = requeue_me.apply(args=(5,), kwargs={"word": "x"}, retries=retries, headers=headers)

    assert result.successful(), result.traceback
    request, retry = REQUEUED["request"], REQUEUED["retry"]
    assert isinstance(retry, Retry)
    sig = retry.sig
    assert sig.id == request["id"]
    assert sig.task == "tests.api.requeue_me"
    assert tuple(sig.args) == (5,)
    assert sig.kwargs == {"word": "x"}
    assert sig.options["retries"] == request["retries"] == retries  # not retries + 1
    assert sig.options["headers"][THROTTLE_ATTEMPT_HEADER] == attempt
    assert sig.options["headers"]["custom"] == "kept"
    countdown = sig.options["countdown"]
    assert ceiling / 2 <= countdown <= ceiling
    assert retry.when == countdown
    assert f"throttle attempt {attempt}" in str(retry)
    assert sent == []  # eager: apply() runs the signature itself, nothing is sent


def test_requeue_on_a_worker_sends_the_task_once(monkeypatch):
    sent = []
    monkeypatch.setattr(Signature, "apply_async", lambda sig, *a, **kw: sent.append(sig))

    requeue_me.apply(args=(1,), kwargs={"send": True})

    retry = REQUEUED["retry"]
    assert sent == [retry.sig]
    assert retry.sig.id == REQUEUED["request"]["id"]


# --- transition + throttle ---------------------------------------------------------------

#: Slots the tests hold, by throttle key: the task frees one when it is re-queued.
BLOCKERS: dict[str, Lease] = {}
RUNS: list[dict] = []


@shared_task(name="tests.api.update_volume_throttled", bind=True)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_volume_throttled(self, volume_uuid, key, transition_entity=None):
    """update_scheduled -> updating, then a throttled block with wait=0."""
    RUNS.append(
        {
            "headers": dict(self.request.headers or {}),
            "state": Volume.objects.get(uuid=volume_uuid).state,
            "error_message": Volume.objects.get(uuid=volume_uuid).error_message,
        }
    )
    BodyRun.objects.create(task=self.name, entity_uuid=volume_uuid, state_seen=transition_entity.state)
    try:
        with throttle(key=key, wait=0):
            return "updated"
    except Retry:
        # The slot frees while the task waits to run again (eager apply re-runs it now).
        blocker = BLOCKERS.pop(key, None)
        if blocker is not None:
            blocker.release()
        raise


def marker_key(volume: Volume, transition_name: str = "begin_updating") -> str:
    return f"{Volume._meta.label}:{volume.uuid}:{transition_name}"


@pytest.fixture
def runs():
    RUNS.clear()
    BLOCKERS.clear()
    yield RUNS
    for lease in BLOCKERS.values():
        lease.release()
    BLOCKERS.clear()


def test_throttle_retry_in_a_transition_body_is_not_an_error(store, runs):
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    key = uuid.uuid4().hex
    BLOCKERS[key] = throttle(name=update_volume_throttled.name, key=key).acquire()

    result = update_volume_throttled.apply(args=(str(volume.uuid), key))

    assert result.successful(), result.traceback
    assert result.result == "updated"
    # The first run applied the transition, met a busy slot and was re-queued; the
    # re-run skipped the transition (recorded in the headers) and ran the body.
    assert len(runs) == 2
    # The first run's transition recorded itself in the request headers, which the
    # re-queue carries to the re-run.
    applied = runs[0]["headers"][APPLIED_TRANSITIONS_HEADER]
    assert applied == {marker_key(volume): Application.of(Volume.objects.get(pk=volume.pk)).as_header()}
    assert applied[marker_key(volume)]["state"] == S.UPDATING
    assert THROTTLE_ATTEMPT_HEADER not in runs[0]["headers"]
    assert runs[1]["headers"][APPLIED_TRANSITIONS_HEADER] == applied
    assert runs[1]["headers"][THROTTLE_ATTEMPT_HEADER] == 1
    # on_error was never applied: the re-run found the entity at the target, no error.
    assert runs[1]["state"] == S.UPDATING
    assert runs[1]["error_message"] == ""
    volume.refresh_from_db()
    assert volume.state == S.UPDATING
    assert volume.error_message == ""
    assert BodyRun.objects.filter(entity_uuid=volume.uuid).count() == 2


def test_rerun_with_the_applied_marker_skips_the_transition(store, runs):
    volume = Volume.objects.create(state=S.UPDATING)  # as the earlier run left it
    key = uuid.uuid4().hex
    args = (str(volume.uuid), key)

    # Without the marker the transition is attempted again, from its own target.
    refused = update_volume_throttled.apply(args=args)
    assert isinstance(refused.result, TransitionNotPermitted)
    assert runs == []

    result = update_volume_throttled.apply(
        args=args, headers={APPLIED_TRANSITIONS_HEADER: {marker_key(volume): S.UPDATING}}
    )

    assert result.successful(), result.traceback
    assert result.result == "updated"
    assert len(runs) == 1
    volume.refresh_from_db()
    assert volume.state == S.UPDATING
    assert BodyRun.objects.filter(entity_uuid=volume.uuid).count() == 1


def test_rerun_refuses_an_entity_that_moved_since_the_earlier_run(store, runs):
    volume = Volume.objects.create(state=S.OK)  # moved on after the earlier run
    key = uuid.uuid4().hex

    result = update_volume_throttled.apply(
        args=(str(volume.uuid), key), headers={APPLIED_TRANSITIONS_HEADER: {marker_key(volume): S.UPDATING}}
    )

    assert isinstance(result.result, TransitionNotPermitted)
    assert "earlier run" in str(result.result)
    assert runs == []
    volume.refresh_from_db()
    assert volume.state == S.OK
    assert volume.error_message == ""


@shared_task(name="tests.api.guarded_plain", bind=True)
def guarded_plain(self, key):
    """A guarded block that lets the throttle's Retry propagate."""
    with throttle(key=key, wait=0):
        return "ran"


def test_eager_requeues_are_bounded_while_the_slot_stays_busy(store):
    """Eager apply() re-runs a re-queued task at once; while the slot stays busy the
    throttle gives up after a few re-runs with ThrottleTimeout instead of recursing."""
    key = uuid.uuid4().hex
    with throttle(name=guarded_plain.name, key=key):
        result = guarded_plain.apply(args=(key,))
    assert result.failed()
    assert isinstance(result.result, ThrottleTimeout)
    assert "gave up after 3 eager re-runs" in str(result.result)
    assert guarded_plain.apply(args=(key,)).result == "ran"


# --- broker and slot store down at once ------------------------------------------------------


@shared_task(name="tests.api.update_volume_store_down", bind=True)
@transition(Volume, "begin_updating", on_error="set_erred")
def update_volume_store_down(self, volume_uuid, transition_entity=None):
    """A transition body whose throttle finds the slot store unreachable."""
    with throttle(key="store-down", cache="dead"):
        return "ran"


@pytest.mark.django_db
def test_broker_down_too_rejects_the_message_back_and_does_not_err_the_entity(monkeypatch):
    """Redis is the broker and the slot store and it is down: the fail-closed re-queue
    cannot publish. That is an outage, not an error of the entity: Celery's Reject
    (requeue) goes back to the broker; the entity stays where the transition put it."""
    from celery._state import _task_stack
    from celery.exceptions import Reject
    from kombu.exceptions import OperationalError

    def broker_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to broker: Connection refused")

    monkeypatch.setattr(Signature, "apply_async", broker_down)
    volume = Volume.objects.create(state=Volume.States.UPDATE_SCHEDULED)
    task = update_volume_store_down
    with override_settings(CACHES={**settings.CACHES, "dead": DEAD_CACHE}):
        # As a worker runs it (not eager: a real re-queue is published).
        _task_stack.push(task)
        task.push_request(id=str(uuid.uuid4()), is_eager=False, called_directly=False, retries=0, headers={})
        try:
            with pytest.raises(Reject) as raised:
                task.run(str(volume.uuid))
        finally:
            task.pop_request()
            _task_stack.pop()
    assert raised.value.requeue is True
    assert "could not take the re-queued task" in str(raised.value.reason)
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (Volume.States.UPDATING, "")
