"""Tasks and an independent recorder for the end-to-end throttle tests
(``tests/e2e/test_throttle_e2e.py``, ``tests/e2e/test_heavy_routing.py``).

The recorder does not go through the throttle: tasks append one JSON object per
observation to a Redis list of the test Redis (``settings.REDIS_URL``, the broker's
database) with a raw client, under a key the test chose (``tw-test:…``, apart from the
throttle's own keys). Timestamps are ``time.time()``: workers and the test run on one
machine, so their clocks are the same clock.

With ``TW_TEST_SLOT_LOG_KEY`` set in a worker's environment, every ``slot_acquired`` /
``slot_released`` signal of that worker is recorded as well (the example's ``slow`` task
cannot be changed to record itself).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import shared_task
from django.conf import settings

from task_workflow.signals import slot_acquired, slot_released
from task_workflow.tasks import throttle

#: Lease of the invariant tasks: far longer than a hold, so only releases free slots.
INVARIANT_TTL = 10.0

#: Environment variable naming the Redis list that receives this process's slot signals.
SLOT_LOG_ENV = "TW_TEST_SLOT_LOG_KEY"

_clients: dict[int, redis.Redis] = {}
_clients_lock = threading.Lock()


def recorder() -> redis.Redis:
    """A raw client of the test Redis, one per process (prefork children get their own)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.get(pid)
            if client is None:
                client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
                _clients[pid] = client
    return client


def record(list_key: str, **fields: Any) -> None:
    """Append one observation (JSON) to the Redis list ``list_key``."""
    recorder().rpush(list_key, json.dumps(fields))


def read_records(list_key: str) -> list[dict[str, Any]]:
    """Every observation appended to ``list_key`` so far, in append order."""
    return [json.loads(raw) for raw in recorder().lrange(list_key, 0, -1)]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one instant.

    An interval that ends at the instant another starts does not overlap it (the
    holder records its end before it releases, the next one its start after it
    acquires).
    """
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, delta in points:  # at equal times -1 sorts before +1: ends first
        open_now += delta
        peak = max(peak, open_now)
    return peak


# -- the invariant under load ------------------------------------------------------------


def _hold_and_record(task: Any, list_key: str, group: str, limit: int, hold: float, requested: float) -> None:
    """Inside the throttled section: hold for ``hold`` seconds, then record the interval."""
    start = time.time()
    time.sleep(hold)
    end = time.time()
    record(
        list_key,
        group=group,
        limit=limit,
        requested=requested,
        start=start,
        end=end,
        task_id=task.request.id,
        pid=os.getpid(),
        hostname=task.request.hostname,
    )


@shared_task(name="tests.throttle.exclusive", bind=True)
def exclusive(self: Any, list_key: str, key: str, hold: float) -> int:
    """One at a time per (task name, key): ``throttle`` as a context manager."""
    requested = time.time()
    with throttle(key=key, wait=None, ttl=INVARIANT_TTL):
        _hold_and_record(self, list_key, f"{self.name}[{key}]", 1, hold, requested)
    return os.getpid()


@shared_task(name="tests.throttle.triple", bind=True)
@throttle(concurrency=3, wait=None, ttl=INVARIANT_TTL)
def triple(self: Any, list_key: str, hold: float) -> int:
    """At most three anywhere: ``throttle`` as a decorator (group = the task name)."""
    _hold_and_record(self, list_key, self.name, 3, hold, requested=0.0)
    return os.getpid()


@shared_task(name="tests.throttle.pair", bind=True)
@throttle(concurrency=2, wait=None, ttl=INVARIANT_TTL)
def pair(self: Any, list_key: str, hold: float) -> int:
    """At most two anywhere: ``throttle`` as a decorator (group = the task name)."""
    _hold_and_record(self, list_key, self.name, 2, hold, requested=0.0)
    return os.getpid()


# -- one holder the test controls ----------------------------------------------------------


@shared_task(name="tests.throttle.hold_until_told", bind=True)
def hold_until_told(
    self: Any, channel: str, name: str, key: str, ttl: float, max_seconds: float = 60.0
) -> dict[str, Any]:
    """Take a slot of (``name``, ``key``) with lease ``ttl``, announce it on
    ``<channel>:holding`` (pid, task id, token), and hold it until the test pushes to
    ``<channel>:go`` (or ``max_seconds`` pass). Returns what the holder saw."""
    lease = throttle(key=key, name=name, ttl=ttl, wait=None).acquire()
    try:
        record(
            f"{channel}:holding",
            pid=os.getpid(),
            task_id=self.request.id,
            token=lease.token,
            slot=lease.slot,
            acquired=time.time(),
        )
        told = recorder().blpop([f"{channel}:go"], timeout=max_seconds) is not None
        lost = lease.lost
    finally:
        released = lease.release()
    return {"pid": os.getpid(), "told": told, "lost": lost, "released": released}


# -- fail closed ---------------------------------------------------------------------------


@shared_task(name="tests.throttle.guarded", bind=True)
def guarded(self: Any, list_key: str) -> int:
    """A throttled body that records each time it runs (to the broker's Redis, which
    stays up while the throttle's store may be down)."""
    with throttle(key="fail-closed", ttl=5):
        record(list_key, task_id=self.request.id, pid=os.getpid(), at=time.time())
    return os.getpid()


# -- slot signals of a worker (the example's tasks) ------------------------------------------


def _record_slot(action: str, sender: Any, lease: Any) -> None:
    record(
        os.environ[SLOT_LOG_ENV],
        action=action,
        group=str(sender),
        token=lease.token,
        pid=os.getpid(),
        at=time.time(),
    )


def _on_slot_acquired(sender: Any, lease: Any, **_: Any) -> None:
    _record_slot("acquired", sender, lease)


def _on_slot_released(sender: Any, lease: Any, **_: Any) -> None:
    _record_slot("released", sender, lease)


if os.environ.get(SLOT_LOG_ENV):
    slot_acquired.connect(_on_slot_acquired, weak=False, dispatch_uid="tw-test-slot-acquired")
    slot_released.connect(_on_slot_released, weak=False, dispatch_uid="tw-test-slot-released")


# -- contenders released at once ---------------------------------------------------------------


@shared_task(name="tests.throttle.contend", bind=True)
def contend(self: Any, channel: str, name: str, key: str, hold: float, ttl: float = INVARIANT_TTL) -> int:
    """Announce readiness on ``<channel>:ready``, wait for ``<channel>:go``, then take a
    slot of (``name``, ``key``) and record the hold on ``<channel>:holds``."""
    record(f"{channel}:ready", task_id=self.request.id, pid=os.getpid())
    if recorder().blpop([f"{channel}:go"], timeout=30) is None:
        raise TimeoutError(f"nobody said go on {channel}")
    requested = time.time()
    with throttle(key=key, name=name, ttl=ttl, wait=None):
        _hold_and_record(self, f"{channel}:holds", f"{name}[{key}]", 1, hold, requested)
    return os.getpid()


# -- a time limit while waiting for a slot ---------------------------------------------------


@shared_task(name="tests.throttle.wait_past_soft_limit", bind=True, soft_time_limit=1)
def wait_past_soft_limit(self: Any, channel: str, name: str, key: str) -> str:
    """Wait for a busy slot (``wait=None``) until the soft time limit interrupts the wait;
    ``<channel>:ran`` records a body that ran anyway."""
    record(f"{channel}:waiting", task_id=self.request.id, pid=os.getpid())
    with throttle(key=key, name=name, ttl=30, wait=None):
        record(f"{channel}:ran", task_id=self.request.id)
    return "ran"
