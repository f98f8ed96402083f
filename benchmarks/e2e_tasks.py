"""Tasks of ``benchmarks/end_to_end.py``; its workers load them with
``--include e2e_tasks`` (this directory on their ``PYTHONPATH``). Not part of the library or
its tests; public APIs of ``task_workflow`` only.

Every task takes ``(subject, round_key, total)`` and does nothing in its body, so what a
variant costs beyond ``bare`` is its decorators' work. ``subject`` is a task index, or
for the transition variants the uuid of an ``online`` example ``Instance``.

Completions are counted after the task, in ``task_postrun`` (outside any throttle slot
and after the transition committed), by one ``EVAL`` on the broker's Redis: ``INCR`` of
the round's counter, and when it reaches ``total`` an ``RPUSH`` to the round's done list,
which the benchmark blocks on (``BLPOP``). Re-queued runs (``RETRY``, a busy slot) are not
counted, their final run is; anything but ``SUCCESS`` is also listed under
``<round_key>:failed``, so the benchmark can refuse a round that did not run cleanly.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from typing import Any

from celery import shared_task
from celery.signals import task_postrun
from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import transaction

import task_workflow
from example_project.models import Instance
from task_workflow.models import TransitionRecord
from task_workflow.tasks import throttle, transition
from task_workflow.throttle import SlotGroup, get_backend

# end_to_end.py reads this line from the worker's log: which copy of the library it measured.
print(f"e2e_tasks: task_workflow: {task_workflow.__file__}", file=sys.stderr, flush=True)

#: Throttle groups and slots per group of the throttled variants.
KEYS, CONCURRENCY = 20, 4
PREFIX = "bench.e2e."

COUNT_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if ARGV[2] ~= 'SUCCESS' then
  redis.call('RPUSH', KEYS[3], ARGV[3])
end
if n == tonumber(ARGV[1]) then
  redis.call('RPUSH', KEYS[2], n)
end
return n
"""

_clients: dict[int, Any] = {}


def _client() -> Any:
    """A Redis client of this process (made after the pool's fork)."""
    client = _clients.get(os.getpid())
    if client is None:
        import redis

        client = _clients[os.getpid()] = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    return client


def count(client: Any, round_key: str, total: int, state: str, detail: str) -> int:
    """One completion of the round; ``EVAL``, not ``EVALSHA``: tests sharing the Redis
    server may flush its script cache at any moment."""
    keys = [round_key, f"{round_key}:done", f"{round_key}:failed"]
    return int(client.eval(COUNT_SCRIPT, len(keys), *keys, total, state, detail))


@task_postrun.connect
def count_completion(
    sender: Any = None, args: Any = None, state: str | None = None, retval: Any = None, **_: Any
) -> None:
    name = getattr(sender, "name", "") or ""
    if not name.startswith(PREFIX) or state == "RETRY" or not args or len(args) < 3:
        return
    count(_client(), str(args[1]), int(args[2]), state or "", f"{name} {state}: {retval!r}"[:500])


@shared_task(name=f"{PREFIX}bare")
def bare(subject: int, round_key: str, total: int) -> None:
    """No decorator: the baseline."""


@shared_task(name=f"{PREFIX}transition")
@transition(Instance, "begin_stopping")
def transitioned(
    instance_uuid: str, round_key: str, total: int, transition_entity: Instance | None = None
) -> None:
    """``@transition``: lock the row, online -> stopping, commit, then this empty body."""


#: The fields ``begin_stopping`` changes (``apply_transition`` saves those).
FLOOR_FIELDS = ["state", "state_changed_at"]


@shared_task(name=f"{PREFIX}orm_floor")
def orm_floor(instance_uuid: str, round_key: str, total: int) -> None:
    """The floor of ``@transition``: its transaction written by hand with the public ORM
    (the locked read, the transition method, the save of the fields it changed, the
    history record), no decorator."""
    with transaction.atomic():
        entity = Instance.objects.select_for_update().get(uuid=instance_uuid)
        source = entity.state
        entity.begin_stopping()
        entity.save(update_fields=FLOOR_FIELDS)
        TransitionRecord.objects.create(
            content_type=ContentType.objects.get_for_model(Instance, for_concrete_model=False),
            object_id=str(entity.pk),
            entity_uuid=entity.uuid,
            transition="begin_stopping",
            source_state=source,
            target_state=entity.state,
            task_name=orm_floor.name,
            task_id=orm_floor.request.id or "",
        )


@shared_task(name=f"{PREFIX}throttle_key")
def throttled_with_key(subject: int, round_key: str, total: int) -> None:
    """``with throttle(key=..., concurrency=4)`` around an empty body, 20 keys."""
    with throttle(key=f"k{subject % KEYS}", concurrency=CONCURRENCY):
        pass


#: The slot groups of ``throttle_floor``: the ones ``@throttle`` makes for 20 task names.
_FLOOR_GROUPS = [SlotGroup(f"{PREFIX}throttle_floor.{group}", None) for group in range(KEYS)]


@shared_task(name=f"{PREFIX}throttle_floor")
def throttle_floor(subject: int, round_key: str, total: int) -> None:
    """The floor of ``@throttle``: the two calls it makes to the slot store
    (``get_backend().acquire()`` and ``.release()``, with a token and metadata of the same
    shape), and nothing else: no ``Lease``, no lease renewer, no signals, no running-task
    lookup. 20 groups of 4 slots, as ``throttle``."""
    group = _FLOOR_GROUPS[subject % KEYS]
    backend = get_backend()
    token = secrets.token_hex(16)
    ttl = float(getattr(settings, "TASK_WORKFLOW", {}).get("LOCK_TTL", 60))  # the lease @throttle takes
    request = throttle_floor.request
    metadata = {
        "task_name": group.task_name,
        "key": group.key,
        "concurrency": CONCURRENCY,
        "task_id": request.id,
        "hostname": request.hostname,
        "pid": os.getpid(),
        "ttl": ttl,
        "acquired_at": time.time(),
    }
    result = backend.acquire(group, token, CONCURRENCY, ttl, metadata)
    if not result.acquired:
        raise RuntimeError(f"throttle_floor: no free slot of {group}")
    backend.release(group, token, result.slot)


def _throttled(group: int) -> Any:
    @shared_task(name=f"{PREFIX}throttle.{group}")
    @throttle(concurrency=CONCURRENCY)
    def throttled(subject: int, round_key: str, total: int) -> None:
        """``@throttle(concurrency=4)``; one of 20 task names, so 20 slot groups."""

    return throttled


def _both(group: int) -> Any:
    @shared_task(name=f"{PREFIX}both.{group}")
    @throttle(concurrency=CONCURRENCY)
    @transition(Instance, "begin_stopping")
    def both(
        instance_uuid: str, round_key: str, total: int, transition_entity: Instance | None = None
    ) -> None:
        """``@throttle(concurrency=4)`` over ``@transition``: take the slot, then the
        transition; one of 20 task names, so 20 slot groups."""

    return both


THROTTLED = [_throttled(group) for group in range(KEYS)]
BOTH = [_both(group) for group in range(KEYS)]


def task_name(variant: str, index: int) -> str:
    """The task that runs the ``index``-th task of a round of ``variant``."""
    if variant in ("throttle", "both"):
        return f"{PREFIX}{variant}.{index % KEYS}"
    return f"{PREFIX}{variant}"
