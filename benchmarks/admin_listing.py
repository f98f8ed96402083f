"""The admin's throttle locks page and ``manage.py throttle_locks --json`` with 10,000 held slots.

How to run (needs Redis on 127.0.0.1:6379, uses and FLUSHES db 12, and PostgreSQL for the
admin's auth tables)::

    .venv/bin/python benchmarks/admin_listing.py [--renders 10] [--slots 10000] [--no-database-cache]

``BENCH_DATABASE_URL`` selects the database (default
``postgres://postgres@127.0.0.1:5432/task_workflow_bench``); it is created when missing and
migrated. Settings are ``tests.settings`` with ``REDIS_URL=redis://127.0.0.1:6379/12`` and
``DEBUG`` off; ``BENCH_REDIS_URL`` picks another Redis database (flushed as well).

Two layouts of ``--slots`` held slots (20 task names, keys ``entity-N``, a 15-minute lease):

- ``2,000 groups x 5``: 2,000 slot groups of concurrency 5, every slot taken;
- ``10,000 groups x 1``: 10,000 groups of concurrency 1.

Slots are taken with the backend's own ``acquire`` (``get_backend().acquire()``, with the
metadata ``throttle()`` stores). Then, as a logged-in superuser through Django's test
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
table (filling it takes a few milliseconds per slot); the cost of one acquire + release of
a new group with the table full is measured beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import harness

NAME = "admin_listing"
#: Flushed at the start and between layouts; ``BENCH_REDIS_URL`` overrides it.
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/12"
TARGET_S = 1.0
TTL = 900.0
TASK_NAMES = 20
DB_CACHE_ALIAS = "bench_db_locks"


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


def fill(groups: int, per_group: int) -> float:
    """Take every slot through the backend's ``acquire``; seconds taken."""
    from task_workflow.throttle import SlotGroup, get_backend

    backend = get_backend()
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


def report(title: str, fill_s: float, fill_note: str, results: list[tuple[str, float, str]]) -> float:
    """Print one layout's figures; return the slowest, in seconds."""
    print(f"\n{title}  (filled in {fill_s:.1f} s, {fill_note})")
    for label, ms, note in results:
        under = ms < TARGET_S * 1000
        print(f"  {label:<36} {ms:9.1f} ms   {'under' if under else 'OVER '} 1 s   ({note})")
    return max(ms for _, ms, _ in results) / 1000


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

    harness.setup_django("tests.settings", redis_url=REDIS_URL)
    from django.conf import settings
    from django.core.cache import caches
    from django.core.management import call_command
    from django.test.utils import override_settings

    print(
        f"{args.slots:,} held slots per layout, median of {args.renders} renders after a warm-up; "
        f"100 rows per admin page; Redis {REDIS_URL}, database {settings.DATABASES['default']['NAME']}"
    )
    slowest = 0.0
    for label, groups, per_group in layouts(args.slots):
        harness.redis_client(REDIS_URL, flush=True)
        fill_s = fill(groups, per_group)
        note = f"{groups * per_group / fill_s:,.0f} acquires/s"
        results = measure(args.renders, groups * per_group)
        slowest = max(slowest, report(f"Redis backend, {label}", fill_s, note, results))
    harness.redis_client(REDIS_URL, flush=True)

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
                caches[DB_CACHE_ALIAS].clear()
                fill_s = fill(groups, per_group)
                acquire_ms = new_group_acquire_ms()
                note = f"one acquire+release of a new group: {acquire_ms:.1f} ms"
                results = measure(args.renders, groups * per_group)
                slowest = max(slowest, report(f"DatabaseCache backend, {label}", fill_s, note, results))
            caches[DB_CACHE_ALIAS].clear()

    harness.verdict(NAME, "slowest median (page, command or listing)", slowest, TARGET_S, unit=" s")


if __name__ == "__main__":
    main()
