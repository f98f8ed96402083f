"""The throttle backends' slot semantics, in-process, on both backends.

``backend`` is a :class:`RedisThrottleBackend` on a raw client of the test Redis (db 15,
a fresh key prefix per test) and a :class:`CacheThrottleBackend` on a Django
``DatabaseCache`` (its own table, a fresh key prefix per test). Tests call the backend
directly, as ``throttle`` does: ``acquire`` / ``release`` / ``renew`` / ``held_slots``.

``DatabaseCache`` stores expiry times in whole seconds (it drops the microseconds), so a
lease there lives between ``ttl - 1`` and ``ttl`` seconds: tests that depend on expiry
use longer TTLs on that backend (see :func:`timing`).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass

import pytest
import redis
from django.conf import settings
from django.core.cache.backends.db import DatabaseCache
from django.core.management import call_command
from django.db import connections
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

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"
CACHE_TABLE = "tw_test_throttle_backends"


# --- Backends ----------------------------------------------------------------------------


def redis_backend():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    prefix = f"tw-test:{uuid.uuid4().hex}:"
    try:
        yield RedisThrottleBackend(client, prefix)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def database_cache_backend(backend_class=CacheThrottleBackend):
    """A generic backend (or the upsert one) on a DatabaseCache (the test provides
    database access)."""
    call_command("createcachetable", CACHE_TABLE, verbosity=0)
    # No culling: DatabaseCache deletes live entries once it holds more than MAX_ENTRIES.
    cache = DatabaseCache(CACHE_TABLE, {"KEY_PREFIX": uuid.uuid4().hex, "OPTIONS": {"MAX_ENTRIES": 10**9}})
    try:
        yield backend_class(cache)
    finally:
        cache.clear()


def backend_params(*, threads: bool):
    # The database cache in the test's transaction; committed when other threads (with
    # their own connections) use it.
    database = pytest.mark.django_db(transaction=True) if threads else pytest.mark.django_db
    return [
        pytest.param("redis", marks=pytest.mark.services),
        pytest.param("database-cache", marks=database),
        pytest.param("database-upsert", marks=database),
    ]


def make_backend(kind):
    if kind == "redis":
        yield from redis_backend()
    elif kind == "database-upsert":
        yield from database_cache_backend(DatabaseCacheThrottleBackend)
    else:
        yield from database_cache_backend()


@pytest.fixture(params=backend_params(threads=False))
def backend(request):
    yield from make_backend(request.param)


@pytest.fixture(params=backend_params(threads=True))
def threaded_backend(request):
    yield from make_backend(request.param)


@pytest.fixture
def redis_only_backend():
    yield from redis_backend()


@dataclass(frozen=True)
class Timing:
    """TTLs that work at the backend's clock resolution."""

    short_ttl: float  # for tests that wait for a lease to run out
    granularity: float  # how much earlier than its TTL a lease may run out


def timing(backend: ThrottleBackend) -> Timing:
    if isinstance(backend, RedisThrottleBackend):
        return Timing(short_ttl=0.3, granularity=0.0)
    return Timing(short_ttl=1.5, granularity=1.0)


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


def acquire(backend, group, concurrency=1, ttl=30.0, token=None, **extra):
    """(Holder, AcquireResult) for one acquire attempt with a fresh token by a caller that
    does not wait when refused: it cancels its wait, as ``throttle`` does when its
    ``wait`` runs out (a refused caller may be queued for a handoff until then)."""
    token = token or uuid.uuid4().hex
    result = backend.acquire(group, token, concurrency, ttl, metadata(group, concurrency, ttl, **extra))
    if not result.acquired:
        assert backend.cancel_wait(group, token) is False, "handed a slot while nobody released"
    return Holder(token, result.slot), result


def take(backend, group, concurrency=1, ttl=30.0, **extra) -> Holder:
    holder, result = acquire(backend, group, concurrency, ttl, **extra)
    assert result.acquired, f"expected a free slot in {group} (concurrency {concurrency})"
    return holder


def tokens_of(backend, group) -> set[str]:
    return {slot.token for slot in backend.held_slots() if slot.group == group}


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


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


# --- Renew and expiry --------------------------------------------------------------------


def test_renew_extends_the_lease(backend):
    if isinstance(backend, RedisThrottleBackend):
        ttl, check_at = 0.5, 0.6  # renewed at 0.3: runs to 0.8
    else:
        ttl, check_at = 2.5, 2.75  # renewed at 1.5: runs to at least 3.0 at 1 s resolution
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
    if isinstance(backend, RedisThrottleBackend):
        # Redis keeps an expired lease until the next acquire of its group: shown as expired.
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
    released_at: list[float] = []

    def release_later():
        time.sleep(0.3)
        released_at.append(time.monotonic())
        backend.release(group, holder.token, holder.slot)

    thread = threading.Thread(target=release_later)
    start = time.monotonic()
    thread.start()
    handed_over = backend.wait_for_release(group, waiter, 5.0)
    woke = time.monotonic()
    thread.join(5)

    assert released_at, "the release thread did not run"
    assert woke - start >= 0.25, "woken before anything was released"
    assert woke - released_at[0] < 0.5, f"woken {woke - released_at[0]:.2f}s after the release"
    # The release handed the slot to the waiter: it holds it now, and only it.
    assert handed_over is True
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
    holds = result.acquired or backend.wait_for_release(group, waiter, 0.5)
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
    assert handed_over is False
    assert backend.cancel_wait(group, waiter) is False


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

    assert handed_over is False  # no handoff: the caller acquires again
    assert 0.18 <= polled < 0.6
    assert 0.04 <= shorter < 0.15


# --- DatabaseCache listing ---------------------------------------------------------------


def upsert_backend_on(options: dict) -> DatabaseCacheThrottleBackend:
    call_command("createcachetable", CACHE_TABLE, verbosity=0)
    cache = DatabaseCache(CACHE_TABLE, {"OPTIONS": {"MAX_ENTRIES": 10**9}, **options})
    return DatabaseCacheThrottleBackend(cache)


@pytest.mark.django_db
def test_database_cache_lists_by_scanning_its_table_without_a_registry():
    """The listing reads the throttle's rows of the table: no group registry is written,
    and a key prefix with LIKE wildcards matches only its own rows."""
    backend = upsert_backend_on({"KEY_PREFIX": "tw_50%"})
    lookalike = upsert_backend_on({"KEY_PREFIX": "twX50X"})  # '_' and '%' would match this
    try:
        groups = [new_group(str(n)) for n in range(30)]
        holders = {take(backend, group, 2).token for group in groups}
        other = take(lookalike, new_group(), 1)
        backend.cache.set("tw:throttle:not-a-lease", {"something": "else"})

        assert {slot.token for slot in backend.held_slots()} == holders
        assert {slot.token for slot in lookalike.held_slots()} == {other.token}
        assert backend.cache.get(REGISTRY_KEY) is None
    finally:
        backend.cache.clear()
        lookalike.cache.clear()


def reversed_key(key: str, key_prefix: str, version: int) -> str:
    """A KEY_FUNCTION that does not keep keys as a prefix + the key."""
    return f"{key_prefix}:{version}:{key}"[::-1]


@pytest.mark.django_db
def test_database_cache_with_a_custom_key_function_lists_through_the_registry():
    backend = upsert_backend_on({"KEY_PREFIX": uuid.uuid4().hex, "KEY_FUNCTION": reversed_key})
    try:
        holder = take(backend, new_group(), 1)
        assert [slot.token for slot in backend.held_slots()] == [holder.token]
        assert backend.cache.get(REGISTRY_KEY)
    finally:
        backend.cache.clear()


# --- Under contention --------------------------------------------------------------------


def test_concurrent_holders_never_exceed_the_limit(threaded_backend):
    backend = threaded_backend
    threads_count, cycles, concurrency = 16, 50, 3
    group = new_group()
    lock = threading.Lock()
    state = {"current": 0, "max": 0, "cycles": 0, "late_releases": 0}
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)
    stop = threading.Event()

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
                        return
                    if backend.wait_for_release(group, token, 0.02):
                        result = AcquireResult(True)
                    else:
                        result = backend.acquire(group, token, concurrency, 30.0, meta)
                with lock:
                    state["current"] += 1
                    state["max"] = max(state["max"], state["current"])
                time.sleep(0.005)
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
    deadline = time.monotonic() + 15
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()  # a stuck run fails here instead of hanging
    for thread in workers:
        thread.join(5)

    assert not errors, errors
    assert not any(thread.is_alive() for thread in workers), "a worker thread is stuck"
    assert state["cycles"] == threads_count * cycles, (
        f"only {state['cycles']} of {threads_count * cycles} cycles in 15 s; "
        f"slots still held: {tokens_of(backend, group)}"
    )
    assert state["max"] <= concurrency
    assert state["max"] == concurrency, "the limit was never reached: the test proves nothing"
    assert state["late_releases"] == 0
    assert tokens_of(backend, group) == set()


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
    assert backend.wait_for_release(group, waiter, 1.0) is True
    [slot] = [s for s in backend.held_slots() if s.group == group]
    assert slot.token == waiter
    assert slot.expires_in <= backend.CLAIM_MS / 1000 + 0.1

    assert backend.renew(group, waiter, "", 60.0)
    [slot] = [s for s in backend.held_slots() if s.group == group]
    assert slot.expires_in > 50
    # Its own release does not hand the slot back to itself.
    assert backend.release(group, waiter, "")
    assert tokens_of(backend, group) == set()
