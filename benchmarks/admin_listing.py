"""The admin's throttle locks page and ``manage.py throttle_locks --json`` with 10,000 held slots.

How to run (needs Redis on 127.0.0.1:6379, uses and FLUSHES db 12, and PostgreSQL for the
admin's auth tables)::

    .venv/bin/python benchmarks/admin_listing.py [--renders 10] [--slots 10000] [--no-database-cache]

``DATABASE_URL`` selects the database (default
``postgres://postgres@127.0.0.1:5432/task_workflow_bench``); it is created when missing and
migrated. Settings are ``tests.settings`` with ``REDIS_URL=redis://127.0.0.1:6379/12`` and
``DEBUG`` off; ``BENCH_REDIS_URL`` picks another Redis database (flushed as well).

Two layouts of ``--slots`` held slots (20 task names, keys ``entity-N``, a 15-minute lease):

- ``2,000 groups x 5``: 2,000 slot groups of concurrency 5, every slot taken;
- ``10,000 groups x 1``: 10,000 groups of concurrency 1.

Redis slots are taken with the backend's own ``acquire`` (one EVALSHA each), exactly as
``throttle()`` stores them. Then, as a logged-in superuser through Django's test
``Client`` (the full request: middleware, session, admin view, template), the median of
``--renders`` renders (after one warm-up) of:

- page 1 of the unfiltered list (100 rows per page; the page also shows the per-group
  usage table);
- page 1 filtered by one task name (``?task=bench.task_3``) and page 1 of a search
  (``?q=entity-42``);
- ``manage.py throttle_locks --json`` (``call_command``, output to a buffer) and, to
  separate store from presentation, ``backend.held_slots()`` alone.

Target: every median under 1 s. The same is repeated on Django's DatabaseCache (skip
with ``--no-database-cache``), whose backend lists slots with one ``SELECT`` over its
table. There the slots are written in bulk (``set_many`` of the values ``acquire``
writes), which is quicker to set up than 10,000 upserts; the cost of one acquire +
release of a new group with the table full is measured beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/task_workflow_bench"
#: Flushed at the start and between layouts; ``BENCH_REDIS_URL`` overrides it.
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/12"
TARGET_S = 1.0
TTL = 900.0
TASK_NAMES = 20
DB_CACHE_ALIAS = "bench_db_locks"


def setup_django(url: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in ("THROTTLE_REDIS_URL", "THROTTLE_CACHE", "TEST_DATABASE"):
        os.environ.pop(name, None)
    os.environ["DATABASE_URL"] = url
    os.environ["REDIS_URL"] = REDIS_URL
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ["DJANGO_DEBUG"] = "0"  # DEBUG keeps every query in memory: not production
    os.environ.setdefault("TASK_WORKFLOW_VAR_DIR", str(Path(tempfile.gettempdir()) / "task_workflow_bench"))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def layouts(slots: int) -> list[tuple[str, int, int]]:
    """(label, groups, slots per group)."""
    return [
        (f"{slots // 5:,} groups x 5", slots // 5, 5),
        (f"{slots:,} groups x 1", slots, 1),
    ]


def group_of(index: int) -> tuple[str, str]:
    return f"bench.task_{index % TASK_NAMES}", f"entity-{index}"


def metadata_for(task_name: str, key: str, concurrency: int, index: int = 0) -> dict[str, Any]:
    """What ``throttle()`` stores with each lease."""
    return {
        "task_name": task_name,
        "key": key,
        "concurrency": concurrency,
        "task_id": str(uuid.uuid4()),
        "hostname": f"celery@worker-{index % 8}",
        "pid": 1000 + index % 5000,
        "ttl": TTL,
        "acquired_at": time.time() - index % 600,
    }


def fill_redis(groups: int, per_group: int) -> float:
    """Take every slot through ``RedisThrottleBackend.acquire``; seconds taken."""
    import redis

    from task_workflow.throttle import RedisThrottleBackend, SlotGroup, get_backend

    redis.Redis.from_url(REDIS_URL).flushdb()
    backend = get_backend()
    assert isinstance(backend, RedisThrottleBackend), f"expected the Redis backend, got {backend!r}"
    start = time.perf_counter()
    for index in range(groups):
        task_name, key = group_of(index)
        group = SlotGroup(task_name, key)
        for _ in range(per_group):
            result = backend.acquire(
                group, uuid.uuid4().hex, per_group, TTL, metadata_for(task_name, key, per_group, index)
            )
            assert result.acquired
    return time.perf_counter() - start


def fill_database_cache(groups: int, per_group: int) -> float:
    """Write the records the backend's ``acquire`` would write, in bulk; seconds taken.

    The DatabaseCache backend keeps one record per group (``GroupRecord``); the generic
    backend one key per slot and a registry of groups.
    """
    from django.core.cache import caches

    from task_workflow.throttle import (
        CacheThrottleBackend,
        DatabaseCacheThrottleBackend,
        SlotGroup,
        get_backend,
    )
    from task_workflow.throttle.cache_backend import REGISTRY_KEY
    from task_workflow.throttle.database_backend import GROUP_KEY_PREFIX, GroupRecord

    backend = get_backend()
    assert isinstance(backend, CacheThrottleBackend | DatabaseCacheThrottleBackend), (
        f"expected a cache backend, got {backend!r}"
    )
    cache = caches[DB_CACHE_ALIAS]
    cache.clear()
    start = time.perf_counter()
    registry: dict[str, dict[str, Any]] = {}
    values: dict[str, Any] = {}
    fence = int(time.time() * 1_000_000)
    for index in range(groups):
        task_name, key = group_of(index)
        group = SlotGroup(task_name, key)
        metadata = metadata_for(task_name, key, per_group, index)
        if isinstance(backend, DatabaseCacheThrottleBackend):
            record = GroupRecord(task_name, key)
            for slot in range(per_group):
                fence += 1
                record.holders[uuid.uuid4().hex] = {
                    **metadata,
                    "deadline": time.time() + TTL,
                    "fencing_token": fence,
                    "slot": slot,
                }
            record.counter = fence
            values[GROUP_KEY_PREFIX + group.digest] = record.dump()
        else:
            registry[group.digest] = {"task_name": task_name, "key": key, "concurrency": per_group}
            for slot in range(per_group):
                values[backend._slot_key(group, slot)] = {
                    "token": uuid.uuid4().hex,
                    "deadline": time.time() + TTL,
                    **metadata,
                }
        if len(values) >= 1000:
            cache.set_many(values, timeout=TTL)
            values = {}
    if values:
        cache.set_many(values, timeout=TTL)
    if not isinstance(backend, DatabaseCacheThrottleBackend):  # that one scans its table instead
        cache.set(REGISTRY_KEY, registry, timeout=None)
    return time.perf_counter() - start


def median_ms(fn: Callable[[], Any], renders: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(renders):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(renders: int, expected_total: int) -> list[tuple[str, float, str]]:
    """(what, median ms, note) for the admin pages, the CLI and the bare listing."""
    from io import StringIO

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse

    from task_workflow.throttle import get_backend

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench-admin").first() or user_model.objects.create_superuser(
        "bench-admin", "bench@example.invalid", "bench"
    )
    client = Client()
    client.force_login(user)
    url = reverse("admin:task_workflow_throttlelock_changelist")
    sizes: dict[str, int] = {}

    def page(query: str, expect: str) -> Callable[[], None]:
        def get() -> None:
            response = client.get(url + query)
            assert response.status_code == 200, response.status_code
            body = response.content
            assert expect.encode() in body, f"{expect!r} not on {query or 'page 1'}"
            sizes[query] = len(body)

        return get

    cli_size: list[int] = []

    def cli() -> None:
        out = StringIO()
        call_command("throttle_locks", "--json", stdout=out)
        cli_size[:] = [len(out.getvalue())]

    results = []
    for label, query, expect in (
        ("admin page 1 (unfiltered)", "", f"{expected_total} held slots match"),
        ("admin page 1, ?task=bench.task_3", "?task=bench.task_3", "held slots match"),
        ("admin page 1, ?q=entity-42", "?q=entity-42", "held slot"),
    ):
        ms = median_ms(page(query, expect), renders)
        results.append((label, ms, f"{sizes[query] / 1024:,.0f} KiB HTML"))
    ms = median_ms(cli, renders)
    results.append(("manage.py throttle_locks --json", ms, f"{cli_size[0] / 1024:,.0f} KiB JSON"))
    backend = get_backend()
    count: list[int] = []
    ms = median_ms(lambda: count.append(len(backend.held_slots())), renders)
    if count[-1] != expected_total:
        raise RuntimeError(
            f"{count[-1]:,} slots listed, {expected_total:,} taken: did another process flush or use "
            f"{REDIS_URL}? (set BENCH_REDIS_URL to an unused database)"
        )
    results.append(("backend.held_slots() alone", ms, f"{count[-1]:,} slots"))
    return results


def report(title: str, fill_s: float, fill_note: str, results: list[tuple[str, float, str]]) -> bool:
    print(f"\n{title}  (filled in {fill_s:.1f} s, {fill_note})")
    ok = True
    for label, ms, note in results:
        under = ms < TARGET_S * 1000
        ok = ok and under
        print(f"  {label:<36} {ms:9.1f} ms   {'under' if under else 'OVER '} 1 s   ({note})")
    return ok


def new_group_acquire_ms(samples: int = 20) -> float:
    """Median ms of one DatabaseCache-backend acquire + release of a new group, table full."""
    from task_workflow.throttle import SlotGroup, get_backend

    backend = get_backend()
    times = []
    for _ in range(samples):
        group = SlotGroup("bench.new_group", uuid.uuid4().hex)
        token = uuid.uuid4().hex
        start = time.perf_counter()
        result = backend.acquire(group, token, 1, TTL, metadata_for(group.task_name, group.key or "", 1))
        backend.release(group, token, result.slot)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--renders", type=int, default=10, help="timed renders per figure (median)")
    parser.add_argument("--slots", type=int, default=10_000, help="held slots per layout")
    parser.add_argument("--no-database-cache", action="store_true", help="skip the DatabaseCache run")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.support import ensure_database

    ensure_database(url)
    setup_django(url)
    from django.conf import settings
    from django.core.management import call_command
    from django.test.utils import override_settings

    print(
        f"{args.slots:,} held slots per layout, median of {args.renders} renders after a warm-up; "
        f"100 rows per admin page; Redis {REDIS_URL}, database {settings.DATABASES['default']['NAME']}"
    )
    all_ok = True
    for label, groups, per_group in layouts(args.slots):
        fill_s = fill_redis(groups, per_group)
        note = f"{groups * per_group / fill_s:,.0f} acquires/s"
        all_ok &= report(f"Redis backend, {label}", fill_s, note, measure(args.renders, groups * per_group))
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()

    if not args.no_database_cache:
        caches_setting = {
            **settings.CACHES,
            DB_CACHE_ALIAS: {
                "BACKEND": "django.core.cache.backends.db.DatabaseCache",
                "LOCATION": "tw_bench_locks",
                # Django culls a DatabaseCache past MAX_ENTRIES (default 300), live locks too.
                "OPTIONS": {"MAX_ENTRIES": 10**8},
            },
        }
        workflow = {**settings.TASK_WORKFLOW, "CACHE": DB_CACHE_ALIAS}
        with override_settings(CACHES=caches_setting, TASK_WORKFLOW=workflow):
            call_command("createcachetable", verbosity=0)
            for label, groups, per_group in layouts(args.slots):
                fill_s = fill_database_cache(groups, per_group)
                acquire_ms = new_group_acquire_ms()
                note = f"bulk set_many; one acquire+release of a new group: {acquire_ms:.1f} ms"
                all_ok &= report(
                    f"DatabaseCache backend, {label}",
                    fill_s,
                    note,
                    measure(args.renders, groups * per_group),
                )
            from django.core.cache import caches

            caches[DB_CACHE_ALIAS].clear()

    print(f"\nall figures under {TARGET_S:.0f} s: {'yes' if all_ok else 'NO'}")


if __name__ == "__main__":
    main()
