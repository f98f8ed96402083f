"""The throttle backends' slot semantics, in-process, on every backend.

``backend`` is, in turn:

- ``redis``: a :class:`RedisThrottleBackend` on a raw client of the test Redis (a fresh
  key prefix per test);
- ``database``: the :class:`DatabaseCacheThrottleBackend` on a Django ``DatabaseCache``
  (its own table, a fresh key prefix per test) of the test database, PostgreSQL or SQLite;
- ``generic-locmem`` and ``generic-database-cache``: the generic
  :class:`CacheThrottleBackend` on a ``LocMemCache`` alias (one client per thread) and on
  a ``DatabaseCache``.

Tests call the backend directly, as ``throttle`` does: ``acquire`` / ``wait_for_release``
/ ``cancel_wait`` / ``release`` / ``renew`` / ``held_slots`` / ``waiting``. The database
backend works on connections of its own, so its tests commit (``transaction=True``).

``DatabaseCache`` stores expiry times in whole seconds (it drops the microseconds), so a
lease of the generic backend there lives between ``ttl - 1`` and ``ttl`` seconds: tests
that depend on expiry use longer TTLs on that backend (see :func:`timing`).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.db import DatabaseCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.test import override_settings
from redis.crc import key_slot

from task_workflow.throttle import (
    CacheThrottleBackend,
    DatabaseCacheThrottleBackend,
    RedisThrottleBackend,
    SlotGroup,
    ThrottleBackend,
)
from task_workflow.throttle.base import AcquireResult
from task_workflow.throttle.cache_backend import REGISTRY_KEY
from task_workflow.throttle.database_backend import GroupRecord
from tests.waiting import wait_until

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"
CACHE_TABLE = "tw_test_throttle_backends"
LOCMEM_ALIAS = "tw_test_throttle_locmem"
THREAD_BOUND_ALIAS = "tw_test_throttle_thread_bound"


# --- Backends ----------------------------------------------------------------------------


def redis_backend() -> Iterator[RedisThrottleBackend]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    prefix = f"tw-test:{uuid.uuid4().hex}:"
    try:
        yield RedisThrottleBackend(client, prefix)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def database_cache(options: dict | None = None) -> DatabaseCache:
    """A DatabaseCache on the test table (committed: the test must be transactional)."""
    call_command("createcachetable", CACHE_TABLE, verbosity=0)
    # No culling: DatabaseCache deletes live entries once it holds more than MAX_ENTRIES.
    return DatabaseCache(
        CACHE_TABLE,
        {"KEY_PREFIX": uuid.uuid4().hex, "OPTIONS": {"MAX_ENTRIES": 10**9}, **(options or {})},
    )


def database_backend(options: dict | None = None) -> Iterator[DatabaseCacheThrottleBackend]:
    backend = DatabaseCacheThrottleBackend(database_cache(options))
    try:
        yield backend
    finally:
        dispose(backend)


def dispose(backend: DatabaseCacheThrottleBackend) -> None:
    backend.close()  # its connections, of every thread: the test database is dropped later
    backend.cache.clear()


def generic_database_cache_backend() -> Iterator[CacheThrottleBackend]:
    cache = database_cache()
    try:
        yield CacheThrottleBackend(cache)
    finally:
        cache.clear()


def generic_locmem_backend() -> Iterator[CacheThrottleBackend]:
    location = f"tw-test-{uuid.uuid4().hex}"
    config = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": location}
    with override_settings(
        CACHES={**settings.CACHES, LOCMEM_ALIAS: {**config, "OPTIONS": {"MAX_ENTRIES": 10**6}}}
    ):
        backend = CacheThrottleBackend(caches[LOCMEM_ALIAS], alias=LOCMEM_ALIAS)
        try:
            yield backend
        finally:
            backend.cache.clear()


BACKENDS: dict[str, Callable[[], Iterator[ThrottleBackend]]] = {
    "redis": redis_backend,
    "database": database_backend,
    "generic-locmem": generic_locmem_backend,
    "generic-database-cache": generic_database_cache_backend,
}


def backend_params(kinds=tuple(BACKENDS)):
    marks = {
        "redis": [pytest.mark.services],
        # Committed: the database backend uses connections of its own, as do other threads.
        "database": [pytest.mark.django_db(transaction=True)],
        "generic-locmem": [],
        "generic-database-cache": [pytest.mark.django_db(transaction=True)],
    }
    return [pytest.param(kind, marks=marks[kind]) for kind in kinds]


@pytest.fixture(params=backend_params())
def backend(request):
    yield from BACKENDS[request.param]()


@pytest.fixture(params=backend_params(("database", "generic-locmem", "generic-database-cache")))
def polling_backend(request):
    """The backends whose waiters poll (no handoff), so the line's liveness is theirs."""
    yield from BACKENDS[request.param]()


@pytest.fixture
def redis_only_backend():
    yield from redis_backend()


@pytest.fixture
def db_backend(transactional_db):
    yield from database_backend()


@dataclass(frozen=True)
class Timing:
    """TTLs that work at the backend's clock resolution."""

    short_ttl: float  # for tests that wait for a lease to run out
    granularity: float  # how much earlier than its TTL a lease may run out


def timing(backend: ThrottleBackend) -> Timing:
    if isinstance(backend, CacheThrottleBackend) and isinstance(backend.cache, DatabaseCache):
        return Timing(short_ttl=1.5, granularity=1.0)
    return Timing(short_ttl=0.3, granularity=0.0)


# --- Helpers -----------------------------------------------------------------------------


def new_group(key: str | None = "k") -> SlotGroup:
    return SlotGroup(f"tests.backends.{uuid.uuid4().hex[:12]}", key)


def metadata(group: SlotGroup, concurrency: int, ttl: float, **extra) -> dict:
    """What ``throttle`` stores with a lease."""
    return {
        "task_name": group.task_name,
        "key": group.key,
        "concurrency": concurrency,
        "task_id": None,
        "hostname": "test-host",
        "pid": 4242,
        "ttl": ttl,
        "acquired_at": time.time(),
        **extra,
    }


@dataclass
class Holder:
    token: str
    slot: str
    fencing_token: int = 0


def acquire(backend, group, concurrency=1, ttl=30.0, token=None, **extra):
    """(Holder, AcquireResult) for one acquire attempt with a fresh token by a caller that
    does not wait when refused: it cancels its wait, as ``throttle`` does when its
    ``wait`` runs out (a refused caller may be queued for a handoff until then)."""
    token = token or uuid.uuid4().hex
    result = backend.acquire(group, token, concurrency, ttl, metadata(group, concurrency, ttl, **extra))
    if not result.acquired:
        assert backend.cancel_wait(group, token) is None, "handed a slot while nobody released"
    return Holder(token, result.slot, result.fencing_token), result


def take(backend, group, concurrency=1, ttl=30.0, **extra) -> Holder:
    holder, result = acquire(backend, group, concurrency, ttl, **extra)
    assert result.acquired, f"expected a free slot in {group} (concurrency {concurrency})"
    return holder


def refuse(backend, group, token, concurrency=1, ttl=30.0) -> AcquireResult:
    """One refused attempt by a caller that stays in line (it does not cancel)."""
    result = backend.acquire(group, token, concurrency, ttl, metadata(group, concurrency, ttl))
    assert not result.acquired, f"{token} was granted a slot; expected a refusal"
    return result


def attempt(backend, group, token, concurrency=1, ttl=30.0) -> AcquireResult:
    """A waiter's next step as ``throttle`` takes it: a short wait (which may hand it the
    slot, on Redis), then, if nothing was handed over, another acquire."""
    handed = backend.wait_for_release(group, token, 0.05)
    return handed or backend.acquire(group, token, concurrency, ttl, metadata(group, concurrency, ttl))


def tokens_of(backend, group) -> set[str]:
    return {slot.token for slot in backend.held_slots() if slot.group == group}


def deadline_of(backend, group, token) -> float:
    [slot] = [slot for slot in backend.held_slots() if slot.group == group and slot.token == token]
    return slot.lease_deadline


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` for another thread: its database connections are closed when it ends."""

    def run() -> Any:
        try:
            return fn()
        finally:
            connections.close_all()

    return run


def forget_group(backend: ThrottleBackend, group: SlotGroup) -> None:
    """Drop every record the store keeps for ``group`` (as if it had expired)."""
    if isinstance(backend, RedisThrottleBackend):
        backend.client.delete(*backend._keys(group))
    elif isinstance(backend, DatabaseCacheThrottleBackend):
        backend.cache.delete(f"tw:throttle:{group.digest}")
    else:
        assert isinstance(backend, CacheThrottleBackend)
        backend.cache.delete_many([backend._group_key(group, name) for name in ("fence", "tickets", "floor")])


# --- At most N holders -------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
def test_at_most_concurrency_holders(backend, concurrency):
    group = new_group()
    ttl = 30.0
    holders = [take(backend, group, concurrency, ttl) for _ in range(concurrency)]

    _, refused = acquire(backend, group, concurrency, ttl)

    assert not refused.acquired
    assert refused.retry_after is not None
    assert 0 < refused.retry_after <= ttl
    assert tokens_of(backend, group) == {h.token for h in holders}
    # A freed slot can be taken again, and only one.
    assert backend.release(group, holders[0].token, holders[0].slot) is True
    take(backend, group, concurrency, ttl)
    assert not acquire(backend, group, concurrency, ttl)[1].acquired


def test_retry_after_points_at_the_earliest_lease_end(backend):
    group = new_group()
    take(backend, group, 2, ttl=30.0)
    take(backend, group, 2, ttl=10.0)

    _, refused = acquire(backend, group, 2, ttl=30.0)

    assert not refused.acquired
    assert 8.0 < refused.retry_after <= 10.0


# --- Release -----------------------------------------------------------------------------


def test_release_only_by_the_owner_and_only_once(backend):
    group = new_group()
    first = take(backend, group, 2)
    second = take(backend, group, 2)

    # Someone else's token, even naming the right slot, removes nothing.
    assert backend.release(group, uuid.uuid4().hex, first.slot) is False
    assert backend.release(group, uuid.uuid4().hex, second.slot) is False
    assert tokens_of(backend, group) == {first.token, second.token}
    assert not acquire(backend, group, 2)[1].acquired, "a non-owner release freed a slot"

    assert backend.release(group, first.token, first.slot) is True
    assert tokens_of(backend, group) == {second.token}
    # A second release of the same token is harmless: it frees nothing more.
    assert backend.release(group, first.token, first.slot) is False
    assert tokens_of(backend, group) == {second.token}
    third = take(backend, group, 2)
    assert not acquire(backend, group, 2)[1].acquired
    assert tokens_of(backend, group) == {second.token, third.token}


def test_release_of_another_groups_holder_frees_nothing(backend):
    group, other = new_group("a"), new_group("b")
    holder = take(backend, group)

    assert backend.release(other, holder.token, holder.slot) is False
    assert tokens_of(backend, group) == {holder.token}


def test_no_release_or_sweep_changes_another_holders_deadline(backend):
    """Invariant 2: only a holder's own acquire or renewal moves its deadline."""
    short_ttl = timing(backend).short_ttl
    group = new_group()
    steady = take(backend, group, 3, ttl=30.0)
    before = deadline_of(backend, group, steady.token)

    passing = take(backend, group, 3, ttl=short_ttl)
    assert backend.renew(group, passing.token, passing.slot, short_ttl)
    assert backend.release(group, passing.token, passing.slot)
    expiring = take(backend, group, 3, ttl=short_ttl)
    time.sleep(short_ttl + 0.15)  # letting the lease run out is what is tested here
    newcomer = take(backend, group, 3, ttl=short_ttl)  # sweeps the expired lease
    backend.release(group, expiring.token, expiring.slot)  # a late release (it may sweep)
    assert backend.release(group, newcomer.token, newcomer.slot)
    take(backend, new_group(), 1)  # another group entirely

    assert deadline_of(backend, group, steady.token) == pytest.approx(before, abs=1e-6)


# --- Renew and expiry --------------------------------------------------------------------


def test_renew_extends_the_lease(backend):
    if timing(backend).granularity:
        ttl, check_at = 2.5, 2.75  # renewed at 1.5: runs to at least 3.0 at 1 s resolution
    else:
        ttl, check_at = 0.5, 0.6  # renewed at 0.3: runs to 0.8
    group = new_group()
    start = time.monotonic()
    holder = take(backend, group, ttl=ttl)

    sleep_until(start + ttl * 0.6)
    assert backend.renew(group, holder.token, holder.slot, ttl) is True
    sleep_until(start + check_at)

    # Past the original lease end, the renewed lease still holds the only slot.
    assert time.monotonic() - start > ttl
    assert not acquire(backend, group, ttl=ttl)[1].acquired
    held = [slot for slot in backend.held_slots() if slot.token == holder.token]
    assert len(held) == 1
    assert not held[0].expired
    assert backend.release(group, holder.token, holder.slot) is True


def test_renew_of_unknown_released_or_expired_token_fails(backend):
    short_ttl = timing(backend).short_ttl
    group = new_group()
    assert backend.renew(group, uuid.uuid4().hex, "0", 30.0) is False

    released = take(backend, group, 2)
    backend.release(group, released.token, released.slot)
    assert backend.renew(group, released.token, released.slot, 30.0) is False

    expiring = take(backend, group, 2, ttl=short_ttl)
    time.sleep(short_ttl + 0.15)  # letting the lease run out is what is tested here
    assert backend.renew(group, expiring.token, expiring.slot, 30.0) is False
    # The failed renewal did not bring the lease back.
    assert expiring.token not in {s.token for s in backend.held_slots() if not s.expired}
    take(backend, group, 1)


def test_expired_lease_frees_its_slot_for_another_token(backend):
    t = timing(backend)
    group = new_group()
    start = time.monotonic()
    dead = take(backend, group, ttl=t.short_ttl)
    assert not acquire(backend, group, ttl=t.short_ttl)[1].acquired

    deadline = start + t.short_ttl + t.granularity + 2.0
    while True:
        successor, result = acquire(backend, group, ttl=30.0)
        if result.acquired or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - start

    assert result.acquired, "the expired lease never freed its slot"
    assert elapsed >= t.short_ttl - t.granularity - 0.05, "the slot was free before the lease ran out"
    # The dead holder's late release must not free its successor's slot.
    assert backend.release(group, dead.token, dead.slot) is False
    assert tokens_of(backend, group) == {successor.token}
    assert not acquire(backend, group, ttl=30.0)[1].acquired


# --- held_slots --------------------------------------------------------------------------


def test_held_slots_describe_each_holder(backend):
    group = new_group("volume-7")
    ttl = 30.0
    before = time.time()
    first = take(backend, group, 2, ttl, task_id="task-1", hostname="worker-a", pid=101, acquired_at=before)
    second = take(backend, group, 2, ttl, task_id="task-2", hostname="worker-b", pid=202)
    after = time.time()
    take(backend, new_group("another"), 1)  # listed too, but as its own group

    held = {slot.token: slot for slot in backend.held_slots() if slot.group == group}

    assert set(held) == {first.token, second.token}
    one, two = held[first.token], held[second.token]
    for slot in (one, two):
        assert slot.group.task_name == group.task_name
        assert slot.group.key == "volume-7"
        assert slot.concurrency == 2
        assert before - 1 <= slot.lease_deadline - ttl <= after + 1
        assert abs(slot.now - time.time()) < 1
        assert slot.expired is False
    assert (one.task_id, one.hostname, one.pid, one.acquired_at) == ("task-1", "worker-a", 101, before)
    assert (two.task_id, two.hostname, two.pid) == ("task-2", "worker-b", 202)
    assert before <= two.acquired_at <= after
    assert one.slot != two.slot
    assert (one.fencing_token, two.fencing_token) == (first.fencing_token, second.fencing_token)

    backend.release(group, first.token, first.slot)
    assert {slot.token for slot in backend.held_slots() if slot.group == group} == {second.token}


def test_held_slots_flag_expired_leases(backend):
    short_ttl = timing(backend).short_ttl
    group = new_group()
    alive = take(backend, group, 2, ttl=30.0)
    expiring = take(backend, group, 2, ttl=short_ttl)
    assert {s.token: s.expired for s in backend.held_slots() if s.group == group} == {
        alive.token: False,
        expiring.token: False,
    }

    time.sleep(short_ttl + 0.15)  # letting the lease run out is what is tested here
    held = {s.token: s for s in backend.held_slots() if s.group == group}

    assert held[alive.token].expired is False
    if isinstance(backend, RedisThrottleBackend | DatabaseCacheThrottleBackend):
        # The group's record keeps an expired lease until its next change: shown as expired.
        assert held[expiring.token].expired is True
        assert held[expiring.token].lease_deadline <= held[expiring.token].now
    else:
        # A cache drops expired entries: the lease is gone, not shown as live.
        assert expiring.token not in held


# --- Groups ------------------------------------------------------------------------------

ODD_KEYS = [
    "x" * 1000,
    "ключ-🔑-ü",
    "with spaces\tand tabs ",
    "{braces}",
    "{",
    "}{",
    "a:b:c::",
    "*?[glob]",
    "",
]


def test_odd_and_long_keys_are_groups_of_their_own(backend):
    name = f"tests.backends.odd {{name}}: ü {uuid.uuid4().hex[:8]}"
    groups = [SlotGroup(name, key) for key in ODD_KEYS] + [SlotGroup(name, None)]
    holders = {group: take(backend, group, 1) for group in groups}

    for group in groups:
        assert not acquire(backend, group, 1)[1].acquired, f"second holder admitted for key {group.key!r}"
    held = {slot.token: slot for slot in backend.held_slots()}
    for group, holder in holders.items():
        assert held[holder.token].group.task_name == name
        assert held[holder.token].group.key == group.key  # the original form, for display
        assert held[holder.token].group == group
    for group, holder in holders.items():
        assert backend.release(group, holder.token, holder.slot) is True
    assert not any(slot.group.task_name == name for slot in backend.held_slots())


def test_different_keys_and_names_are_independent(backend):
    name = new_group().task_name
    groups = [
        SlotGroup(name, "a"),
        SlotGroup(name, "b"),
        SlotGroup(name, None),
        SlotGroup(name, "A"),
        SlotGroup(name + ".other", "a"),
    ]
    holders = [take(backend, group, 1) for group in groups]
    for group in groups:
        assert not acquire(backend, group, 1)[1].acquired

    # Freeing one group frees nothing in the others.
    backend.release(groups[0], holders[0].token, holders[0].slot)
    take(backend, groups[0], 1)
    for group in groups[1:]:
        assert not acquire(backend, group, 1)[1].acquired


# --- The line of waiters (FIFO) ----------------------------------------------------------


def test_a_newcomer_does_not_take_a_free_slot_from_an_earlier_waiter(backend):
    group = new_group()
    holder = take(backend, group)
    waiter = uuid.uuid4().hex
    refuse(backend, group, waiter)
    assert backend.waiting(group) == [waiter]

    assert backend.release(group, holder.token, holder.slot)
    # The slot is free (polling backends) or handed to the waiter (Redis): either way
    # not the newcomer's.
    _, newcomer = acquire(backend, group)
    assert not newcomer.acquired, "a newcomer overtook a live waiter"

    granted = attempt(backend, group, waiter)
    assert granted.acquired
    assert tokens_of(backend, group) == {waiter}
    assert backend.waiting(group) == [], "a granted waiter is still in line"


def test_attempting_again_keeps_a_waiters_place_in_line(backend):
    group = new_group()
    holder = take(backend, group)
    first, second, third = (f"{n}-{uuid.uuid4().hex}" for n in ("first", "second", "third"))
    for token in (first, second, third):
        refuse(backend, group, token)
    # Attempts in another order (the latest attempt last in time) change nothing.
    for token in (third, second, first, third, second):
        refuse(backend, group, token)
    assert backend.waiting(group) == [first, second, third]

    assert backend.release(group, holder.token, holder.slot)
    # Only the first in line gets the slot, whoever attempts first.
    for token in (third, second):
        assert not attempt(backend, group, token).acquired
    assert attempt(backend, group, first).acquired
    assert backend.waiting(group) == [second, third]
    for token in (second, third):
        assert backend.cancel_wait(group, token) is None
    assert backend.waiting(group) == []


def test_a_waiter_that_gives_up_leaves_the_line_without_moving_anybody(backend):
    group = new_group()
    holder = take(backend, group, 2)
    other = take(backend, group, 2)
    tokens = [f"w{n}-{uuid.uuid4().hex}" for n in range(4)]
    for token in tokens:
        refuse(backend, group, token, 2)

    assert backend.cancel_wait(group, tokens[1]) is None
    assert backend.waiting(group) == [tokens[0], tokens[2], tokens[3]]

    # Two slots free up: the first two live waiters get them, the last one does not.
    assert backend.release(group, holder.token, holder.slot)
    assert backend.release(group, other.token, other.slot)
    assert not attempt(backend, group, tokens[3], 2).acquired
    assert attempt(backend, group, tokens[2], 2).acquired
    assert attempt(backend, group, tokens[0], 2).acquired
    assert backend.waiting(group) == [tokens[3]]
    assert backend.cancel_wait(group, tokens[3]) is None


def test_a_waiter_that_stops_attempting_drops_out_of_line(polling_backend):
    backend = polling_backend
    # A short window, to let it pass (DatabaseCache keeps whole seconds of expiry).
    window = 2.0 if timing(backend).granularity else 0.4
    backend.WAITER_MS = int(window * 1000)  # type: ignore[attr-defined]
    group = new_group()
    holder = take(backend, group)
    gone, staying = f"gone-{uuid.uuid4().hex}", f"staying-{uuid.uuid4().hex}"
    refuse(backend, group, gone)
    refuse(backend, group, staying)
    assert backend.waiting(group) == [gone, staying]

    # ``gone`` stops attempting (died); ``staying`` goes on, every 50 ms.
    until = time.monotonic() + window * 1.5
    while time.monotonic() < until:
        refuse(backend, group, staying)
        time.sleep(0.05)

    assert backend.waiting(group) == [staying]
    assert backend.release(group, holder.token, holder.slot)
    assert attempt(backend, group, staying).acquired
    # Coming back after that, it is a newcomer: at the back of the line.
    refuse(backend, group, gone)
    assert backend.waiting(group) == [gone]


def test_waiters_are_served_in_order_of_first_arrival(backend, monkeypatch):
    """Invariant 4: 20 callers arrive one after the other and keep attempting (as
    ``throttle`` does); each freed slot goes to the next in line.

    Liveness is not what is tested here (``test_a_waiter_that_stops_attempting_drops_out_of_line``): the
    polling backends count a waiter live for 30 s instead of 3 s, since on SQLite 20 threads
    contend for one file lock and a loaded machine (CI, beside two matrix sessions) once
    held a waiter's attempt longer than 3 s: it dropped out of line and was served last."""
    if not isinstance(backend, RedisThrottleBackend):  # Redis's is fixed in its scripts' ARGV
        monkeypatch.setattr(backend, "WAITER_MS", 30_000)
    count, ttl = 20, 30.0
    group = new_group()
    holder = take(backend, group, 1, ttl)
    tokens = [f"waiter-{n:02d}-{uuid.uuid4().hex}" for n in range(count)]
    queued = [threading.Event() for _ in range(count)]
    served: list[int] = []
    stop = threading.Event()

    def waiter(n: int) -> None:
        if n:
            assert queued[n - 1].wait(10), f"waiter {n - 1} never queued"
        token = tokens[n]
        result = backend.acquire(group, token, 1, ttl, metadata(group, 1, ttl))
        assert not result.acquired, f"waiter {n} was granted a held slot"
        queued[n].set()
        while not result.acquired:
            if stop.is_set():
                backend.cancel_wait(group, token)
                return
            result = attempt(backend, group, token, 1, ttl)
        served.append(n)
        assert backend.release(group, token, result.slot)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(in_thread(lambda n=n: waiter(n))) for n in range(count)]
        try:
            assert queued[-1].wait(20), "not every waiter queued"
            assert backend.waiting(group) == tokens
            assert backend.release(group, holder.token, holder.slot)
            concurrent.futures.wait(futures, timeout=30)
        finally:
            stop.set()
        for future in futures:
            future.result(timeout=5)

    assert served == list(range(count))
    assert backend.waiting(group) == []
    assert tokens_of(backend, group) == set()


# --- Fencing tokens ----------------------------------------------------------------------


def test_fencing_tokens_increase_with_every_grant(backend):
    group, other = new_group("a"), new_group("b")
    tokens = []
    for _ in range(5):
        holder = take(backend, group, 2)
        tokens.append(holder.fencing_token)
        take(backend, other, 1 + len(tokens))  # another group's grants in between
        assert backend.release(group, holder.token, holder.slot)
    pair = [take(backend, group, 2), take(backend, group, 2)]
    tokens += [holder.fencing_token for holder in pair]

    assert all(isinstance(token, int) and token > 0 for token in tokens)
    assert tokens == sorted(set(tokens)), f"not strictly increasing: {tokens}"
    listed = {slot.token: slot.fencing_token for slot in backend.held_slots() if slot.group == group}
    assert listed == {holder.token: holder.fencing_token for holder in pair}


def test_fencing_tokens_increase_after_the_groups_records_are_gone(backend):
    group = new_group()
    first = take(backend, group)
    assert backend.release(group, first.token, first.slot)
    forget_group(backend, group)

    second = take(backend, group)

    assert second.fencing_token > first.fencing_token
    assert backend.release(group, second.token, second.slot)
    third = take(backend, group)
    assert third.fencing_token > second.fencing_token


# --- Redis specifics ---------------------------------------------------------------------

HASH_TAG = re.compile(r"\{([^}]+)\}")  # Redis Cluster: the first non-empty {...} of a key


@pytest.mark.services
def test_redis_keys_of_a_group_share_one_hash_tag(redis_only_backend):
    backend = redis_only_backend
    group = SlotGroup("tests.backends.{tag}:name", "{evil}:key}")
    first = take(backend, group, 1)
    waiter = uuid.uuid4().hex
    assert not backend.acquire(group, waiter, 1, 30.0, metadata(group, 1, 30.0)).acquired
    backend.release(group, first.token, first.slot)  # hands the slot to the waiter: wakes it

    keys = sorted(k.decode() for k in backend.client.scan_iter(match=f"{backend.key_prefix}*"))

    assert any(k.endswith(":holders") for k in keys), keys
    assert any(k.endswith(":meta") for k in keys), keys
    assert any(":wake" in k for k in keys), keys
    assert {HASH_TAG.search(k).group(1) for k in keys} == {group.digest}
    assert len({key_slot(k.encode()) for k in keys}) == 1


@pytest.mark.services
def test_redis_scripts_flushed_from_the_server_are_loaded_again(redis_only_backend):
    """A Redis restart or failover forgets loaded scripts (``EVALSHA`` answers NOSCRIPT):
    acquire and release load them again instead of failing."""
    backend = redis_only_backend
    group = new_group()
    backend.client.script_flush()
    holder = take(backend, group, 1)
    assert not acquire(backend, group, 1)[1].acquired
    backend.client.script_flush()
    assert backend.release(group, holder.token, holder.slot) is True
    assert tokens_of(backend, group) == set()


@pytest.mark.services
def test_redis_refused_acquire_reports_when_the_earliest_lease_runs_out(redis_only_backend):
    backend = redis_only_backend
    group = new_group()
    take(backend, group, 1, ttl=30.0)
    waiter = uuid.uuid4().hex
    result = backend.acquire(group, waiter, 1, 30.0, metadata(group, 1, 30.0))
    backend.cancel_wait(group, waiter)
    assert result.acquired is False
    assert 28.0 < result.retry_after <= 30.0


@pytest.mark.services
def test_redis_wait_for_release_wakes_on_a_release(redis_only_backend):
    backend = redis_only_backend
    assert backend.wakes_waiters is True
    group = new_group()
    holder = take(backend, group, 1)
    # As ``throttle`` does: a refused acquire (which registers the caller as a waiter),
    # then a wait.
    waiter = uuid.uuid4().hex
    assert not backend.acquire(group, waiter, 1, 30.0, metadata(group, 1, 30.0)).acquired
    released = threading.Event()
    released_at: list[float] = []

    def release_once_waiting():
        # The waiter is blocked by now (or blocks right after): a release wakes it either way.
        time.sleep(0.3)
        released_at.append(time.monotonic())
        backend.release(group, holder.token, holder.slot)
        released.set()

    thread = threading.Thread(target=release_once_waiting)
    start = time.monotonic()
    thread.start()
    handed_over = backend.wait_for_release(group, waiter, 5.0)
    woke = time.monotonic()
    thread.join(5)

    assert released.is_set(), "the release thread did not run"
    assert woke - start >= 0.25, "woken before anything was released"
    assert woke - released_at[0] < 0.5, f"woken {woke - released_at[0]:.2f}s after the release"
    # The release handed the slot to the waiter: it holds it now, and only it.
    assert handed_over is not None
    assert handed_over.acquired
    assert handed_over.handed_over
    assert handed_over.fencing_token > holder.fencing_token
    assert tokens_of(backend, group) == {waiter}
    assert not acquire(backend, group, 1)[1].acquired
    assert backend.release(group, waiter, "") is True


@pytest.mark.services
def test_redis_handoff_to_a_caller_that_acquired_again_leaves_no_ghost_holder(redis_only_backend):
    """A waiter whose wait timed out just before a release handed it the slot acquires
    again (as ``throttle`` does after each wait): it must hold one slot, and after its
    release hold none."""
    backend = redis_only_backend
    group = new_group()
    holder = take(backend, group, 1)
    waiter = uuid.uuid4().hex
    meta = metadata(group, 1, 30.0)
    assert not backend.acquire(group, waiter, 1, 30.0, meta).acquired  # registers as waiter
    backend.release(group, holder.token, holder.slot)  # hands the slot to the waiter
    # ...whose wait had just timed out, so it tries again, and waits again:
    result = backend.acquire(group, waiter, 1, 30.0, meta)
    holds = result.acquired or backend.wait_for_release(group, waiter, 0.5) is not None
    assert holds
    assert tokens_of(backend, group) == {waiter}

    assert backend.release(group, waiter, "") is True

    assert tokens_of(backend, group) == set(), "the released token still holds the slot"
    take(backend, group, 1)


@pytest.mark.services
def test_redis_wait_for_release_times_out(redis_only_backend):
    backend = redis_only_backend
    group = new_group()
    take(backend, group, 1)
    waiter = uuid.uuid4().hex
    assert not backend.acquire(group, waiter, 1, 30.0, metadata(group, 1, 30.0)).acquired

    start = time.monotonic()
    handed_over = backend.wait_for_release(group, waiter, 0.2)

    assert 0.15 <= time.monotonic() - start < 1.0
    assert handed_over is None
    assert backend.cancel_wait(group, waiter) is None


@pytest.mark.services
def test_redis_handoff_gives_a_short_claim_that_the_waiter_extends(redis_only_backend):
    """A release hands the slot to a registered waiter with a claim of at most CLAIM_MS
    (a waiter that died while blocked does not sit on it for its whole lease); the woken
    waiter holds the slot without another acquire and extends the claim to its lease."""
    backend = redis_only_backend
    group = new_group()
    holder = take(backend, group, ttl=60.0)
    waiter = uuid.uuid4().hex
    refused = backend.acquire(group, waiter, 1, 60.0, metadata(group, 1, 60.0))
    assert not refused.acquired

    assert backend.release(group, holder.token, holder.slot)
    assert backend.wait_for_release(group, waiter, 1.0) is not None
    [slot] = [s for s in backend.held_slots() if s.group == group]
    assert slot.token == waiter
    assert slot.expires_in <= backend.CLAIM_MS / 1000 + 0.1

    assert backend.renew(group, waiter, "", 60.0)
    [slot] = [s for s in backend.held_slots() if s.group == group]
    assert slot.expires_in > 50
    # Its own release does not hand the slot back to itself.
    assert backend.release(group, waiter, "")
    assert tokens_of(backend, group) == set()


# --- Polling backends --------------------------------------------------------------------


def test_generic_wait_for_release_polls():
    backend = CacheThrottleBackend(cache=None, poll_interval=0.2)  # waiting touches no cache
    assert backend.wakes_waiters is False
    group = new_group()

    start = time.monotonic()
    handed_over = backend.wait_for_release(group, "token", 5.0)
    polled = time.monotonic() - start
    start = time.monotonic()
    backend.wait_for_release(group, "token", 0.05)
    shorter = time.monotonic() - start

    assert handed_over is None  # no handoff: the caller acquires again
    assert 0.18 <= polled < 0.6
    assert 0.04 <= shorter < 0.15


class ThreadBoundCache(LocMemCache):
    """A cache client that, like some Memcached clients, must stay in its own thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = threading.get_ident()

    def __getattribute__(self, name: str) -> Any:
        if name in {"add", "get", "set", "get_many", "delete", "delete_many", "incr", "touch"}:
            owner = object.__getattribute__(self, "owner")
            if threading.get_ident() != owner:
                raise RuntimeError(f"a cache client of thread {owner} used by thread {threading.get_ident()}")
        return super().__getattribute__(name)


def test_generic_backend_uses_each_threads_own_cache_client():
    """The lease renewer is another thread: it must not share the caller's client."""
    config = {"BACKEND": f"{__name__}.ThreadBoundCache", "LOCATION": f"tw-test-{uuid.uuid4().hex}"}
    with override_settings(CACHES={**settings.CACHES, THREAD_BOUND_ALIAS: config}):
        backend = CacheThrottleBackend(caches[THREAD_BOUND_ALIAS], alias=THREAD_BOUND_ALIAS)
        group = new_group()
        holder = take(backend, group)
        with concurrent.futures.ThreadPoolExecutor(1) as renewer:
            assert renewer.submit(backend.renew, group, holder.token, holder.slot, 30.0).result(5) is True
            contender = renewer.submit(acquire, backend, group).result(5)[1]
            assert not contender.acquired
        assert backend.release(group, holder.token, holder.slot)


# --- DatabaseCache backend ---------------------------------------------------------------


def test_database_release_racing_a_renewal_frees_the_slot(db_backend):
    """A release must free the slot even while the holder's renewer renews it (another
    thread, another connection): both change the same lease."""
    backend = db_backend
    # Renewals back to back, so that one lands inside a release. SQLite has one writer: a
    # writer that takes its lock again at once starves the others, so it pauses briefly.
    breath, rounds = (0.0002, 200) if connection.vendor == "sqlite" else (0.0, 40)
    for round_ in range(rounds):
        group = new_group()
        holder = take(backend, group)
        stop, renewed = threading.Event(), threading.Event()

        def renew_until_stopped(group=group, holder=holder, stop=stop, renewed=renewed):
            while not stop.is_set():
                backend.renew(group, holder.token, holder.slot, 30.0)
                renewed.set()
                if breath:
                    time.sleep(breath)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            renewing = pool.submit(in_thread(renew_until_stopped))
            assert renewed.wait(5)
            released = backend.release(group, holder.token, holder.slot)
            stop.set()
            renewing.result(5)

        assert released, f"round {round_}: the release raced a renewal and removed nothing"
        assert tokens_of(backend, group) == set(), f"round {round_}: the slot is still held"
        assert backend.renew(group, holder.token, holder.slot, 30.0) is False


@pytest.mark.postgres
def test_database_slot_taken_inside_an_outer_transaction_is_committed_at_once(db_backend):
    """The backend never works in the caller's transaction: contenders are refused at
    once (not blocked on an uncommitted row) and the renewer thread sees the slot."""
    backend = db_backend
    group = new_group()
    outcome: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as elsewhere:

        def other_thread(name: str, fn: Callable[[], Any]) -> None:
            try:
                outcome[name] = elsewhere.submit(in_thread(fn)).result(timeout=3)
            except concurrent.futures.TimeoutError:
                outcome[name] = "blocked"

        with transaction.atomic():
            holder = take(backend, group)
            other_thread("contender", lambda: acquire(backend, group)[1].acquired)
            other_thread("renewed", lambda: backend.renew(group, holder.token, holder.slot, 30.0))
            other_thread("listed", lambda: tokens_of(backend, group))
            transaction.set_rollback(True)  # the caller's own work is rolled back; the slot is not
        other_thread("after rollback", lambda: tokens_of(backend, group))

    assert outcome == {
        "contender": False,
        "renewed": True,
        "listed": {holder.token},
        "after rollback": {holder.token},
    }
    assert backend.release(group, holder.token, holder.slot)


def test_database_slot_inside_an_outer_transaction_of_the_same_thread(db_backend):
    """Inside the caller's ``atomic()`` the whole cycle works in its thread, on
    PostgreSQL (private connection) and SQLite (the caller's transaction: one writer)."""
    backend = db_backend
    group = new_group()
    with transaction.atomic():
        holder = take(backend, group, 1, ttl=30.0)
        assert not acquire(backend, group)[1].acquired
        assert backend.renew(group, holder.token, holder.slot, 30.0)
        assert tokens_of(backend, group) == {holder.token}
        assert backend.release(group, holder.token, holder.slot)
    assert tokens_of(backend, group) == set()


def stored_expires(backend: DatabaseCacheThrottleBackend, group: SlotGroup) -> float:
    """The ``expires`` column of the group's row, in epoch seconds."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT expires FROM {connection.ops.quote_name(CACHE_TABLE)} WHERE cache_key = %s",
            [backend._row_key(group)],
        )
        [(value,)] = cursor.fetchall()
    if isinstance(value, str):  # SQLite: naive UTC text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def test_database_group_row_outlives_every_live_lease_whatever_the_ttls(db_backend):
    """Invariant 5: a short-lease caller's acquire, renew or release never brings the
    row's expiry (which DatabaseCache's culling obeys) before a longer live lease's end."""
    backend = db_backend
    group = new_group()
    short = take(backend, group, 3, ttl=0.2)
    long = take(backend, group, 3, ttl=120.0)
    long_deadline = deadline_of(backend, group, long.token)
    assert backend.renew(group, short.token, short.slot, 0.2)
    assert backend.release(group, short.token, short.slot)
    brief = take(backend, group, 3, ttl=0.2)
    assert backend.release(group, brief.token, brief.slot)
    assert stored_expires(backend, group) >= long_deadline + backend.RECORD_MARGIN - 0.01

    # What DatabaseCache's culling deletes: rows past their expiry. Not this one.
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {connection.ops.quote_name(CACHE_TABLE)} WHERE expires < %s",
            [connection.ops.adapt_datetimefield_value(datetime.fromtimestamp(time.time() + 60, tz=UTC))],
        )
    assert tokens_of(backend, group) == {long.token}
    assert not acquire(backend, group, 1)[1].acquired


def test_database_cache_lists_by_scanning_its_table_without_a_registry(transactional_db):
    """The listing reads the throttle's rows of the table: no group registry is written,
    and a key prefix with LIKE wildcards matches only its own rows."""
    backend = DatabaseCacheThrottleBackend(database_cache({"KEY_PREFIX": "tw_50%"}))
    # '_' and '%' would match this one's keys
    lookalike = DatabaseCacheThrottleBackend(database_cache({"KEY_PREFIX": "twX50X"}))
    try:
        groups = [new_group(str(n)) for n in range(30)]
        holders = {take(backend, group, 2).token for group in groups}
        other = take(lookalike, new_group(), 1)
        backend.cache.set("tw:throttle:not-a-lease", {"something": "else"})

        assert {slot.token for slot in backend.held_slots()} == holders
        assert {slot.token for slot in lookalike.held_slots()} == {other.token}
        assert backend.cache.get(REGISTRY_KEY) is None
    finally:
        dispose(backend)
        dispose(lookalike)


def reversed_key(key: str, key_prefix: str, version: int) -> str:
    """A KEY_FUNCTION that does not keep keys as a prefix + the key."""
    return f"{key_prefix}:{version}:{key}"[::-1]


def test_database_cache_with_a_custom_key_function_lists_by_reading_the_table(transactional_db):
    backends = [
        DatabaseCacheThrottleBackend(database_cache({"KEY_PREFIX": prefix, "KEY_FUNCTION": reversed_key}))
        for prefix in ("a", "b")
    ]
    try:
        holders = [take(each, new_group(), 1) for each in backends]
        backends[0].cache.set("unrelated", [1, 2, 3])
        for each, holder in zip(backends, holders, strict=True):
            assert [slot.token for slot in each.held_slots()] == [holder.token]
    finally:
        for each in backends:
            dispose(each)


def test_database_backend_recovers_from_a_closed_connection(db_backend):
    """A private connection the server dropped (restart, idle timeout) is replaced."""
    backend = db_backend
    group = new_group()
    holder = take(backend, group)
    backend.close()  # as if the server had closed it: the next call reconnects
    assert backend.renew(group, holder.token, holder.slot, 30.0)
    private = backend._local.connection.wrapper
    private.connection.close()  # behind Django's back: the wrapper still thinks it is open
    assert backend.renew(group, holder.token, holder.slot, 30.0)
    assert backend.release(group, holder.token, holder.slot)


def test_database_operation_interrupted_mid_transaction_leaves_the_group_unlocked(db_backend, monkeypatch):
    """An interrupt (here inside the renewal's rule, with the row locked) rolls back: the
    row lock must not outlive the call and block every other worker."""
    backend = db_backend
    group = new_group()
    holder = take(backend, group)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(GroupRecord, "renew", interrupted)
        with pytest.raises(KeyboardInterrupt):
            backend.renew(group, holder.token, holder.slot, 30.0)
    with concurrent.futures.ThreadPoolExecutor(1) as elsewhere:
        contender = elsewhere.submit(in_thread(lambda: acquire(backend, group)[1].acquired))
        try:
            refused = contender.result(timeout=5) is False
        except concurrent.futures.TimeoutError:
            backend._local.connection.close()  # ends the open transaction: unblocks it
            pytest.fail("the interrupted call left the group's row locked: a contender blocked")
    assert refused
    assert backend.renew(group, holder.token, holder.slot, 30.0)
    assert backend.release(group, holder.token, holder.slot)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_database_backend_in_a_forked_child_uses_a_connection_of_its_own(db_backend):
    """Prefork workers inherit the parent's objects: the child must neither talk on nor
    close the parent's connection."""
    backend = db_backend
    group = new_group()
    holder = take(backend, group)  # the parent's connection is open now
    parents = backend._local.connection
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            other = new_group()
            child = take(backend, other)
            own = backend._local.connection is not parents
            status = 0 if own and backend.release(other, child.token, child.slot) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert backend._local.connection is parents
    assert backend.renew(group, holder.token, holder.slot, 30.0)
    assert backend.release(group, holder.token, holder.slot)


# --- Under contention --------------------------------------------------------------------


#: Seconds a holder waits for the other slots to fill, until they first have.
FILL_WAIT = 5.0


def test_concurrent_holders_never_exceed_the_limit(backend):
    threads_count, cycles, concurrency = 16, 50, 3
    hold = 0.005
    sqlite = isinstance(backend, DatabaseCacheThrottleBackend) and connection.vendor == "sqlite"
    if timing(backend).granularity or sqlite:
        # The generic backend on DatabaseCache makes many calls per attempt; SQLite's
        # writers wait for its one lock in sleeps of up to 100 ms.
        cycles, hold = 20, 0.03
    group = new_group()
    lock = threading.Lock()
    state = {"current": 0, "max": 0, "cycles": 0, "late_releases": 0}
    fences: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)
    stop = threading.Event()
    full = threading.Event()

    def worker():
        try:
            start.wait(10)
            for _ in range(cycles):
                token = uuid.uuid4().hex
                meta = metadata(group, concurrency, 30.0)
                # As ``throttle`` waits: acquire; when refused, wait for a release, which
                # may hand the slot over (Redis), else acquire again.
                result = backend.acquire(group, token, concurrency, 30.0, meta)
                while not result.acquired:
                    if stop.is_set():
                        backend.cancel_wait(group, token)
                        return
                    result = backend.wait_for_release(group, token, 0.02) or backend.acquire(
                        group, token, concurrency, 30.0, meta
                    )
                with lock:
                    state["current"] += 1
                    state["max"] = max(state["max"], state["current"])
                    fences.append(result.fencing_token)
                    if state["current"] == concurrency:
                        full.set()
                # Until every slot was held at once, a holder keeps its slot for the others
                # to fill them (a slow store would otherwise rarely overlap three holders);
                # a backend that refuses below the limit never fills them and fails below.
                full.wait(FILL_WAIT)
                time.sleep(hold)
                with lock:
                    state["current"] -= 1
                    state["cycles"] += 1
                if not backend.release(group, token, result.slot):
                    with lock:
                        state["late_releases"] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=worker) for _ in range(threads_count)]
    for thread in workers:
        thread.start()
    deadline = time.monotonic() + 120  # a budget for a hang, not a speed
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()  # a stuck run fails here instead of hanging
    for thread in workers:
        thread.join(5)

    assert not errors, errors
    assert not any(thread.is_alive() for thread in workers), "a worker thread is stuck"
    assert state["cycles"] == threads_count * cycles, (
        f"only {state['cycles']} of {threads_count * cycles} cycles in 120 s; "
        f"slots still held: {tokens_of(backend, group)}"
    )
    assert state["max"] <= concurrency
    assert state["max"] == concurrency, "the limit was never reached: the test proves nothing"
    assert state["late_releases"] == 0
    assert tokens_of(backend, group) == set()
    if not timing(backend).granularity:  # not the file/database cache: their incr reads then writes
        assert len(set(fences)) == len(fences), "a fencing token was handed out twice"
    assert backend.waiting(group) == []


class _Interrupt(Exception):
    """What a soft time limit looks like here: an ``Exception`` that is no database error
    (Celery's ``SoftTimeLimitExceeded``), raised from a signal handler at any point."""


def test_an_interrupt_that_breaks_the_connection_is_raised_not_retried(db_backend, monkeypatch):
    """A soft time limit that lands mid-query leaves the private connection unusable. The
    one retry on a fresh connection is for a connection found dead by a database error; it
    swallowed the interrupt instead, so a task waiting past its soft limit waited on."""
    calls = []

    def work(cursor):
        calls.append(len(calls))
        if len(calls) == 1:
            raise _Interrupt("soft time limit")
        return "done", False

    monkeypatch.setattr(db_backend, "_recover", lambda private: True)  # the connection died with it
    with pytest.raises(_Interrupt):
        db_backend._run(work, write=True)
    assert calls == [0], "the interrupted change ran again on a fresh connection"


# --- Waiters as operators see them ---------------------------------------------------------


WAITING_ALIAS = "tw_test_waiting_calls"


def test_waiting_calls_list_callers_blocked_in_throttle_in_line_order(backend, monkeypatch):
    """A holder and two callers blocked in ``throttle(...).acquire()`` in threads of their
    own: ``waiting_calls()`` lists both, first come first, places 1 and 2, with when each
    first asked and its host and pid (where the store keeps them); the holder is no waiter.
    When the holder releases, the first takes the slot and the second moves up to place 1."""
    from task_workflow.tasks import throttle
    from task_workflow.throttle import factory

    monkeypatch.setitem(factory._backends, (os.getpid(), WAITING_ALIAS), backend)
    name = f"tests.backends.{uuid.uuid4().hex[:12]}"
    group = SlotGroup(name, "eu-west-1")

    def limiter():
        return throttle(key="eu-west-1", name=name, concurrency=1, wait=60, ttl=30, cache=WAITING_ALIAS)

    def calls_of_group() -> list:
        return [call for call in backend.waiting_calls() if call.group == group]

    started = time.time()
    holder = limiter().acquire()
    leases: dict[str, Any] = {}
    threads = []
    try:
        for label in ("first", "second"):
            thread = threading.Thread(
                target=in_thread(lambda label=label: leases.__setitem__(label, limiter().acquire())),
                daemon=True,
            )
            thread.start()
            threads.append(thread)
            count = len(threads)
            wait_until(lambda count=count: len(calls_of_group()) == count, 10, f"{count} waiter(s) in line")
        # The threads keep attempting (several times a second) while the line is read.
        first, second = calls_of_group()
        assert [first.place, second.place] == [1, 2]
        assert holder.token not in {first.token, second.token}
        assert first.token != second.token
        if isinstance(backend, CacheThrottleBackend):
            assert (first.since, first.pid, first.hostname) == (None, None, None)  # a cache keeps tokens only
        else:
            assert first.since is not None
            assert second.since is not None
            assert started - 1 <= first.since <= second.since <= time.time() + 1
            assert first.waited_for is not None
            assert first.waited_for >= 0
            assert (first.pid, second.pid) == (os.getpid(), os.getpid())
            assert first.hostname == socket.gethostname()
            assert (first.task_id, first.concurrency) == (None, 1)
        assert not any(call.token == holder.token for call in backend.waiting_calls())

        holder.release()
        wait_until(lambda: "first" in leases, 10, "the first waiter to take the slot")
        [moved_up] = wait_until(
            lambda: (calls := calls_of_group()) and len(calls) == 1 and calls, 10, "one waiter left"
        )
        assert (moved_up.token, moved_up.place) == (second.token, 1)
        if moved_up.since is not None:
            assert moved_up.since == pytest.approx(second.since, abs=0.001)  # its first request still
        leases["first"].release()
        wait_until(lambda: "second" in leases, 10, "the second waiter to take the slot")
        assert calls_of_group() == []
    finally:
        holder.release()
        for lease in list(leases.values()):
            lease.release()
        for thread in threads:
            thread.join(15)
    assert not any(thread.is_alive() for thread in threads)
