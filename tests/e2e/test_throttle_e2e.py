"""The throttle on real Celery workers (prefork), Redis and PostgreSQL.

Workers run the tasks of ``tests/testapp/throttle_tasks.py`` from queues of their own
(so the session's ``example_worker`` never takes them). An independent recorder, a
raw Redis client appending JSON to lists of the broker's Redis, tells the test what
ran, where and when; Celery events and the result backend tell how each task ended.
The test waits for those (``BLPOP`` on a recorder list, task events), never for a
fixed time, except where the passing of time is what is tested (lease expiry and
renewal), and then the window is bounded and asserted.

Two slot stores:

- ``redis``: the test Redis (``TASK_WORKFLOW['CACHE'] = 'default'``, django-redis):
  the Lua backend. Two workers (4 + 2 pool processes) share the queue.
- ``database``: a worker started with ``THROTTLE_CACHE=database`` (tests/settings.py),
  so its slots live in a ``DatabaseCache`` table of the test database: the generic
  ``cache.add`` backend. This process reaches the same table through a cache alias it
  adds for the test.

Fail-closed runs a third worker whose slots live in a throwaway ``redis-server`` that
the test stops and restarts (``THROTTLE_REDIS_URL``), while the broker stays up.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
from celery.result import ResultSet
from django.core.management import call_command

from task_workflow.throttle import (
    HeldSlot,
    SlotGroup,
    ThrottleBackend,
    ThrottleTimeout,
    get_backend,
    throttle,
)
from tests.testapp import throttle_tasks
from tests.testapp.throttle_tasks import max_overlap, read_records, recorder
from tests.workers import HANG_TIMEOUT, RedisServer, TaskEvents, WorkerProcess, free_port, start_workers

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

REDIS_QUEUE = "e2e-throttle"
DATABASE_QUEUE = "e2e-throttle-dbcache"
FAIL_CLOSED_QUEUE = "e2e-throttle-fail-closed"

#: The DatabaseCache table of ``THROTTLE_CACHE=database`` in tests/settings.py.
DATABASE_CACHE_TABLE = "task_workflow_test_locks"
#: The alias under which this process reaches that table during a test.
DATABASE_CACHE_ALIAS = "e2e_throttle_db_locks"

#: Upper bound for anything a worker does here in well under a second.
TIMEOUT = HANG_TIMEOUT


# -- where the slots live --------------------------------------------------------------------


@dataclass
class Target:
    """A slot store, the workers whose throttles use it, and how this process reaches
    the same store (``cache_alias`` for ``throttle(cache=...)`` / ``get_backend``)."""

    label: str
    queue: str
    workers: tuple[WorkerProcess, ...]
    cache_alias: str | None
    #: How much earlier than the deadline ``held_slots()`` reports a slot may free.
    #: DatabaseCache stores expiry times in whole seconds, rounded *down* (see the
    #: report: leases there are up to 1 s shorter than asked).
    deadline_slack: float

    def backend(self) -> ThrottleBackend:
        return get_backend(self.cache_alias)

    def held(self, name: str, key: str) -> list[HeldSlot]:
        group = SlotGroup(name, key)
        return [slot for slot in self.backend().held_slots() if slot.group == group]

    def gate(self, name: str, key: str, *, ttl: float, wait: float | None) -> throttle:
        """The same slot group as a worker's ``throttle(name=name, key=key)``, from here."""
        return throttle(key=key, name=name, ttl=ttl, wait=wait, cache=self.cache_alias)


@pytest.fixture(scope="module")
def redis_workers(celery_app, task_events, worker_env, module_workers) -> tuple[WorkerProcess, ...]:
    """Two workers, 4 + 2 prefork processes, on one queue; slots in the test Redis."""
    workers = start_workers(
        WorkerProcess(celery_app, env=worker_env, name="throttle-a", queues=(REDIS_QUEUE,), concurrency=4),
        WorkerProcess(celery_app, env=worker_env, name="throttle-b", queues=(REDIS_QUEUE,), concurrency=2),
    )
    module_workers.extend(workers)
    return workers


@pytest.fixture(scope="module")
def database_workers(
    celery_app, task_events, worker_env, module_workers, django_db_blocker
) -> tuple[WorkerProcess, ...]:
    """One worker, 4 prefork processes, whose slots live in a DatabaseCache table."""
    with django_db_blocker.unblock():
        call_command("createcachetable", DATABASE_CACHE_TABLE, database="default", verbosity=0)
    env = {**worker_env, "THROTTLE_CACHE": "database"}
    workers = start_workers(
        WorkerProcess(celery_app, env=env, name="throttle-db", queues=(DATABASE_QUEUE,), concurrency=6)
    )
    module_workers.extend(workers)
    return workers


@pytest.fixture(params=["redis", "database"])
def target(request, settings) -> Target:
    if request.param == "redis":
        workers = request.getfixturevalue("redis_workers")
        return Target("redis", REDIS_QUEUE, workers, cache_alias=None, deadline_slack=0.0)
    workers = request.getfixturevalue("database_workers")
    settings.CACHES = {
        **settings.CACHES,
        DATABASE_CACHE_ALIAS: {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": DATABASE_CACHE_TABLE,
        },
    }
    return Target("database", DATABASE_QUEUE, workers, DATABASE_CACHE_ALIAS, deadline_slack=1.0)


# -- helpers -----------------------------------------------------------------------------------


def new_run() -> str:
    return uuid.uuid4().hex[:10]


def wait_until_holding(channel: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """What ``hold_until_told`` announced once it took its slot (pid, task id, token)."""
    popped = recorder().blpop([f"{channel}:holding"], timeout=timeout)
    assert popped is not None, f"no worker took the slot of {channel} within {timeout}s"
    return json.loads(popped[1])


def tell_to_release(channel: str) -> None:
    recorder().rpush(f"{channel}:go", "1")


def final_result(event: dict[str, Any]) -> Any:
    """The return value of a succeeded task, from the repr its event carries."""
    assert event["type"] == "task-succeeded", event
    return ast.literal_eval(event["result"])


# -- 1. the invariant under load -----------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    shared_task: Any  # a task under @throttle(concurrency=shared_limit): group = its name
    shared_limit: int
    shared_count: int
    exclusive_count: int  # tests.throttle.exclusive: concurrency 1 per key
    keys: int
    bursts: int


LOAD_PLANS = {
    "redis": LoadPlan(throttle_tasks.triple, 3, shared_count=100, exclusive_count=200, keys=4, bursts=5),
    "database": LoadPlan(throttle_tasks.pair, 2, shared_count=24, exclusive_count=36, keys=2, bursts=3),
}


def test_at_most_concurrency_holders_per_group_under_load(target: Target):
    """Hundreds of short throttled tasks on every pool process: per slot group, the
    recorded holds never overlap more than the group's limit, the shared group reaches
    its limit, and every task ran exactly once and succeeded."""
    plan = LOAD_PLANS[target.label]
    run = new_run()
    list_key = f"tw-test:intervals:{run}"
    rng = random.Random(run)
    keys = [f"{run}-k{n}" for n in range(plan.keys)]
    assert not [s for s in target.backend().held_slots() if s.group.task_name == plan.shared_task.name]

    def hold() -> float:
        return rng.uniform(0.02, 0.05)

    # The shared group's tasks come in bursts, so every free process takes one at once
    # (the limit must be reached, not only respected); the per-key tasks in between.
    signatures = []
    for _ in range(plan.bursts):
        signatures += [plan.shared_task.s(list_key, hold()) for _ in range(plan.shared_count // plan.bursts)]
        signatures += [
            throttle_tasks.exclusive.s(list_key, rng.choice(keys), hold())
            for _ in range(plan.exclusive_count // plan.bursts)
        ]
    started = time.monotonic()
    results = [signature.apply_async(queue=target.queue) for signature in signatures]
    ResultSet(results).join_native(timeout=60, propagate=False)
    elapsed = time.monotonic() - started

    states = Counter(result.state for result in results)
    assert states == {"SUCCESS": len(results)}, states
    records = read_records(list_key)
    runs = Counter(record["task_id"] for record in records)
    sent = {result.id for result in results}
    assert sent - set(runs) == set(), "tasks whose throttled body never ran"
    assert set(runs) - sent == set(), "bodies of tasks nobody sent"
    assert [task_id for task_id, count in runs.items() if count > 1] == [], "bodies that ran twice"

    limits = {plan.shared_task.name: plan.shared_limit} | {
        f"{throttle_tasks.exclusive.name}[{key}]": 1 for key in keys
    }
    holds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        holds[record["group"]].append(record)
    assert set(holds) == set(limits)
    overlaps = {group: max_overlap([(r["start"], r["end"]) for r in rs]) for group, rs in holds.items()}
    assert overlaps == limits, f"most simultaneous holders per group (expected: the limits {limits})"

    # Non-vacuous: the load spread over every worker and most processes, and tasks of
    # one key did wait for each other (asked for the slot while another held it).
    assert {record["hostname"] for record in records} == {worker.hostname for worker in target.workers}
    assert len({(record["hostname"], record["pid"]) for record in records}) >= 4
    waited = 0
    for group, rs in holds.items():
        if limits[group] == 1:
            rs.sort(key=lambda r: r["start"])
            waited += sum(later["requested"] < earlier["end"] for earlier, later in itertools.pairwise(rs))
    assert waited > 0, "no task of a key ever had to wait: the load did not test the limit"
    assert elapsed < 60


# -- 2. a holder killed with SIGKILL ----------------------------------------------------------------

SIGKILL_TTL = 2.0


def test_a_holder_killed_with_sigkill_frees_its_slot_within_one_ttl(target: Target, task_events: TaskEvents):
    """The pool process holding a slot is SIGKILLed: its lease is not renewed any more,
    so the slot stays held until the lease deadline, then frees (within one TTL)."""
    run = new_run()
    name, key, channel = f"tests.e2e.sigkill.{run}", "k", f"tw-test:hold:{run}"
    result = throttle_tasks.hold_until_told.apply_async(
        args=(channel, name, key, SIGKILL_TTL), kwargs={"max_seconds": 60}, queue=target.queue
    )
    holding = wait_until_holding(channel)
    pid = holding["pid"]
    assert pid not in {worker.process.pid for worker in target.workers if worker.process}, "not a pool child"

    # The listing reads the store's clock before it reads the leases: a renewal during a
    # slow listing makes "remaining" count from the start of the look, not from its end.
    look_started = time.monotonic()
    (slot,) = target.held(name, key)
    assert (slot.pid, slot.task_id, slot.token) == (pid, result.id, holding["token"])
    assert not slot.expired
    # The slot cannot free before this deadline (renewals only push it later). Renewed
    # every ttl/3, a live lease has between 2/3 of its TTL and all of it left.
    remaining = slot.lease_deadline - slot.now
    assert SIGKILL_TTL / 2 <= remaining <= SIGKILL_TTL + 0.05, (
        f"a {SIGKILL_TTL}s lease with {remaining:.2f}s left"
    )
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    assert [s.token for s in target.held(name, key) if not s.expired] == [slot.token], (
        "right after the kill the slot must still be held"
    )
    with target.gate(name, key, ttl=SIGKILL_TTL, wait=SIGKILL_TTL + 2) as lease:
        acquired_at = time.monotonic()
        assert not lease.lost
    assert target.held(name, key) == [], "after our own release the slot must be free"

    freed_after = acquired_at - killed_at
    assert freed_after <= SIGKILL_TTL + 1.0, f"the dead holder's slot freed {freed_after:.2f}s after the kill"
    assert acquired_at - look_started >= remaining - target.deadline_slack - 0.05, (
        f"the slot freed {acquired_at - look_started:.2f}s after a look that left {remaining:.2f}s of lease"
    )

    # The worker saw its process die, reported the task failed and carries on.
    final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
    assert final["type"] == "task-failed", final
    (worker,) = [w for w in target.workers if w.hostname == final["hostname"]]
    assert f"pid:{pid} exited with 'signal 9 (SIGKILL)'" in worker.log_path.read_text(errors="replace")
    assert all(w.alive() for w in target.workers)


# -- 3. a task longer than its TTL --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "ttl"),
    [
        ("redis", 1.0),
        ("database", 2.0),
        # Django's DatabaseCache keeps whole seconds; the throttle's own statements do not.
        pytest.param("database", 0.5, id="database-subsecond-ttl"),
    ],
    indirect=["target"],
)
def test_a_task_longer_than_its_ttl_keeps_its_slot(target: Target, ttl: float, task_events: TaskEvents):
    """The holder runs for more than two TTLs: renewals keep its slot (a competitor
    with ``wait=0`` is refused and the lease deadline is still ahead); once it ends,
    the slot is free."""
    run = new_run()
    name, key, channel = f"tests.e2e.long.{run}", "k", f"tw-test:hold:{run}"
    result = throttle_tasks.hold_until_told.apply_async(
        args=(channel, name, key, ttl), kwargs={"max_seconds": TIMEOUT}, queue=target.queue
    )
    try:
        holding = wait_until_holding(channel)
        # What is tested is the passing of time: hold past two whole TTLs.
        time.sleep(max(0.0, holding["acquired"] + 2.2 * ttl - time.time()))
        slots = target.held(name, key)
        checked_at = time.time()
        assert checked_at - holding["acquired"] > 2 * ttl
        assert [(s.token, s.pid, s.task_id) for s in slots] == [
            (holding["token"], holding["pid"], result.id)
        ], "the holder must still be listed"
        assert slots[0].lease_deadline > slots[0].now, "its lease must still run"
        assert slots[0].lease_deadline > holding["acquired"] + ttl, "its lease must have been renewed"
        with pytest.raises(ThrottleTimeout), target.gate(name, key, ttl=ttl, wait=0):
            raise AssertionError("acquired a slot that a live holder renews")
    finally:
        tell_to_release(channel)

    outcome = final_result(task_events.wait_for_id(result.id, timeout=TIMEOUT))
    assert outcome == {"pid": holding["pid"], "told": True, "lost": False, "released": True}
    with target.gate(name, key, ttl=ttl, wait=0) as lease:
        assert not lease.lost
    assert target.held(name, key) == []


# -- 4. a release by someone else ------------------------------------------------------------------------


def test_a_release_by_a_non_owner_changes_nothing(target: Target, task_events: TaskEvents):
    """``release`` with a token that does not hold the slot removes nothing; the real
    holder's own release still works afterwards."""
    run = new_run()
    name, key, channel = f"tests.e2e.owner.{run}", "k", f"tw-test:hold:{run}"
    result = throttle_tasks.hold_until_told.apply_async(
        args=(channel, name, key, 10.0), kwargs={"max_seconds": TIMEOUT}, queue=target.queue
    )
    try:
        holding = wait_until_holding(channel)
        (slot,) = target.held(name, key)
        assert slot.token == holding["token"]

        assert target.backend().release(SlotGroup(name, key), "not-the-token", slot.slot) is False

        assert [s.token for s in target.held(name, key)] == [holding["token"]]
        with pytest.raises(ThrottleTimeout), target.gate(name, key, ttl=10.0, wait=0):
            raise AssertionError("acquired a slot whose holder was only released by a stranger")
    finally:
        tell_to_release(channel)

    outcome = final_result(task_events.wait_for_id(result.id, timeout=TIMEOUT))
    assert outcome == {"pid": holding["pid"], "told": True, "lost": False, "released": True}
    assert target.held(name, key) == []


# -- 5. a burst of contenders after a lease ran out -------------------------------------------------------

BURST_ROUNDS = 10


@pytest.mark.parametrize(
    "target",
    [
        "redis",
        # Django's DatabaseCache.add() over an expired row is not atomic; the throttle's
        # conditional upsert is.
        "database",
    ],
    indirect=True,
)
def test_contenders_after_a_lease_ran_out_take_the_slot_one_at_a_time(
    target: Target, task_events: TaskEvents
):
    """A holder's lease ran out (it died) and nobody looked at the slot since; then pool
    processes released at the same instant all ask for it: one holds it at a time.
    Several rounds, since each is one roll of the dice for a race."""
    # As many contenders as the smallest worker has processes, so none waits in a
    # worker's prefetch buffer behind the others (each must be ready before "go").
    contenders = min(worker.concurrency for worker in target.workers)
    overlaps = []
    for _ in range(BURST_ROUNDS):
        run = new_run()
        name, key, channel = f"tests.e2e.burst.{run}", "k", f"tw-test:burst:{run}"
        results = [
            throttle_tasks.contend.apply_async(args=(channel, name, key, 0.05), queue=target.queue)
            for _ in range(contenders)
        ]
        for _ in range(contenders):
            assert recorder().blpop([f"{channel}:ready"], timeout=TIMEOUT), "a contender did not start"
        died_at = time.time()
        dead = target.backend().acquire(
            SlotGroup(name, key), "dead-holder", 1, 0.001, {"task_name": name, "key": key, "concurrency": 1}
        )
        assert dead.acquired
        # The dead holder's 1 ms lease runs out: at once in Redis; DatabaseCache keeps
        # whole seconds and its add() sees the row as expired from the next second on.
        expired_at = math.floor(died_at + 0.001) + 1.02 if target.label == "database" else died_at + 0.01
        time.sleep(max(0.0, expired_at - time.time()))
        recorder().rpush(f"{channel}:go", *["1"] * contenders)

        finished = task_events.wait_for_ids([result.id for result in results], timeout=TIMEOUT)
        assert {event["type"] for event in finished.values()} == {"task-succeeded"}, finished
        holds = read_records(f"{channel}:holds")
        assert len(holds) == contenders
        overlaps.append(max_overlap([(hold["start"], hold["end"]) for hold in holds]))
        if overlaps[-1] > 1:
            break
    assert overlaps == [1] * BURST_ROUNDS, f"most simultaneous holders of one slot, per round: {overlaps}"


# -- 6. the slot store goes away ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lock_redis():
    """A throwaway redis-server that holds the slots of ``fail_closed_worker``."""
    server = RedisServer(free_port(), name="throttle-locks").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fail_closed_worker(celery_app, task_events, worker_env, module_workers, lock_redis) -> WorkerProcess:
    """A worker whose broker is the test Redis and whose slots live in ``lock_redis``."""
    env = {**worker_env, "THROTTLE_REDIS_URL": lock_redis.url}
    (worker,) = start_workers(
        WorkerProcess(
            celery_app, env=env, name="throttle-failclosed", queues=(FAIL_CLOSED_QUEUE,), concurrency=1
        )
    )
    module_workers.append(worker)
    return worker


def test_the_slot_store_stopped_mid_run_fails_closed_then_recovers(
    fail_closed_worker: WorkerProcess, lock_redis: RedisServer, task_events: TaskEvents
):
    """With its Redis down, a throttled body does not run: the task is re-queued with
    backoff (task-retried) and the error logged; once Redis is back, the same task
    message runs, once, and succeeds."""
    list_key = f"tw-test:guarded:{new_run()}"
    # Mid-run: the worker already works with the store, and holds connections to it.
    first = throttle_tasks.guarded.apply_async(args=(list_key,), queue=FAIL_CLOSED_QUEUE)
    assert task_events.wait_for_id(first.id, timeout=TIMEOUT)["type"] == "task-succeeded"
    assert [r["task_id"] for r in read_records(list_key)] == [first.id]
    store = lock_redis.client()
    try:  # its acquire and release ran their scripts there
        assert store.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) >= 2
    finally:
        store.close()

    lock_redis.stop()
    second = throttle_tasks.guarded.apply_async(args=(list_key,), queue=FAIL_CLOSED_QUEUE)
    task_events.wait_for_id(second.id, ("task-retried",), timeout=TIMEOUT)
    # Re-queued again (backoff), and still fail-closed.
    task_events.wait_for_id(second.id, ("task-retried",), count=2, timeout=TIMEOUT)
    assert [r["task_id"] for r in read_records(list_key)] == [first.id], "ran without its slot store"
    assert not [e for e in task_events.history(second.id) if e["type"] in ("task-succeeded", "task-failed")]
    log = fail_closed_worker.log_path.read_text(errors="replace")
    assert "slot store unreachable" in log
    assert "re-queued in" in log

    lock_redis.start()
    started = time.time()
    done = task_events.wait_for_id(second.id, timeout=TIMEOUT)
    assert done["type"] == "task-succeeded", done
    records = read_records(list_key)
    assert [r["task_id"] for r in records] == [first.id, second.id]
    # The restarted server forgot every lease: it granted nothing within its restart grace
    # (1 s in tests/settings.py; uptime counts whole seconds, so at least that).
    assert records[1]["at"] - started >= 1.0 - 0.2


# -- a soft time limit while waiting ----------------------------------------------------------


def test_a_soft_time_limit_while_waiting_for_a_slot_fails_the_task_and_leaves_the_line(
    target: Target, task_events: TaskEvents
):
    """A time limit is not "slot store unreachable": the task fails with
    SoftTimeLimitExceeded within its limit (it used to be re-queued again and again, and
    end SUCCESS long after), the waiter leaves the line and no slot leaks."""
    run = new_run()
    name, key, channel = f"tests.e2e.softlimit.{run}", "k", f"tw-test:softlimit:{run}"
    with target.gate(name, key, ttl=30, wait=0):  # the slot stays busy throughout
        result = throttle_tasks.wait_past_soft_limit.apply_async(
            args=(channel, name, key), queue=target.queue
        )
        assert recorder().blpop([f"{channel}:waiting"], timeout=TIMEOUT) is not None
        final = task_events.wait_for_id(result.id, timeout=TIMEOUT)
        assert final["type"] == "task-failed", final
        assert "SoftTimeLimitExceeded" in final["exception"], final
        assert target.backend().waiting(SlotGroup(name, key)) == []
        assert len(target.held(name, key)) == 1  # our own slot alone
    assert read_records(f"{channel}:ran") == []
    assert target.held(name, key) == []
