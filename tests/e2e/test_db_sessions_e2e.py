"""PostgreSQL sessions a real ``celery worker`` (prefork) opens for transition tasks,
counted by PostgreSQL itself.

Celery's Django fixup closes every database connection before and after each task
unless ``CELERY_DB_REUSE_MAX`` is set, whatever ``CONN_MAX_AGE`` says (check
``task_workflow.W006``). The example project sets it, keeps connections
(``CONN_MAX_AGE``), checks them before reuse (``CONN_HEALTH_CHECKS``) and drops broken
or old ones around each task (``example_project/celery.py``): docs/howto/production.md.

``pg_stat_database.sessions`` counts the sessions ever started on the test database.
A backend flushes its statistics when it exits, before it leaves ``pg_stat_activity``;
each worker's sessions carry an ``application_name`` of their own
(tests/e2e/db_sessions_settings.py), so once the stopped worker has no session left
there, the counter holds all of them: no fixed sleep.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connection

from tests.testapp import guard_tasks
from tests.testapp.models import Volume
from tests.workers import TaskEvents, WorkerProcess

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

S = Volume.States
QUEUE = "e2e-db-sessions"
TASKS = 60
CONCURRENCY = 2
TIMEOUT = 120.0


def sessions_started() -> int:
    """``pg_stat_database.sessions`` of the test database, read now (not from this
    transaction's statistics snapshot)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        (sessions,) = cursor.fetchone()
    return int(sessions)


def session_pids(condition: str, params: list) -> list[int]:
    """Backend pids of the sessions of the test database that match ``condition`` (SQL on
    ``pg_stat_activity``), now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            f"SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND {condition}", params
        )
        return [pid for (pid,) in cursor.fetchall()]


def live_sessions(application_name: str) -> list[int]:
    """Backend pids of the sessions named ``application_name``."""
    return session_pids("application_name = %s", [application_name])


def wait_until_ended(condition: str, params: list, timeout: float = 30.0) -> None:
    """Wait until no session matches ``condition``: each flushed its statistics
    (``sessions`` included) as it exited."""
    deadline = time.monotonic() + timeout
    while pids := session_pids(condition, params):
        assert time.monotonic() < deadline, f"sessions {pids} ({condition} {params}) did not end"
        time.sleep(0.05)  # polls pg_stat_activity; PostgreSQL offers no wait for a backend's exit


@contextmanager
def db_worker(celery_app, worker_env, name: str, *, celery_defaults: bool) -> Iterator[str]:
    """A worker on its own queue whose sessions are named by the ``application_name``
    this yields; stopped, and its sessions ended, on exit."""
    application_name = f"tw-db-sessions-{name}-{uuid.uuid4().hex[:8]}"
    env = {
        **worker_env,
        "DJANGO_SETTINGS_MODULE": "tests.e2e.db_sessions_settings",
        "DB_SESSIONS_APPLICATION_NAME": application_name,
        "DB_SESSIONS_CELERY_DEFAULTS": "1" if celery_defaults else "0",
    }
    worker = WorkerProcess(
        celery_app, env=env, name=f"db-sessions-{name}", queues=(QUEUE,), concurrency=CONCURRENCY
    )
    worker.start()
    try:
        yield application_name
    finally:
        worker.stop()
        wait_until_ended("application_name = %s", [application_name])


def run_transition_tasks(task_events: TaskEvents, count: int) -> dict[str, dict]:
    """``count`` transition tasks (``begin_updating`` of a volume each) on ``QUEUE``;
    returns task id -> final event once all finished."""
    volumes = [Volume.objects.create(state=S.UPDATE_SCHEDULED) for _ in range(count)]
    results = [
        guard_tasks.update_then_fail.apply_async(args=(str(volume.uuid), False), queue=QUEUE)
        for volume in volumes
    ]
    finals = task_events.wait_for_ids([result.id for result in results], timeout=TIMEOUT)
    failed = {
        task_id: event.get("exception")
        for task_id, event in finals.items()
        if event["type"] != "task-succeeded"
    }
    assert not failed, f"{len(failed)} of {count} tasks failed: {list(failed.values())[:3]}"
    assert set(Volume.objects.filter(pk__in=[v.pk for v in volumes]).values_list("state", flat=True)) == {
        S.UPDATING
    }
    return finals


def sessions_opened(
    celery_app, worker_env, task_events: TaskEvents, name: str, *, celery_defaults: bool
) -> int:
    """Sessions started on the test database while a worker started, ran ``TASKS``
    transition tasks and stopped."""
    before = sessions_started()
    with db_worker(celery_app, worker_env, name, celery_defaults=celery_defaults):
        run_transition_tasks(task_events, TASKS)
    return sessions_started() - before


def test_recommended_settings_open_one_session_per_pool_process(celery_app, worker_env, task_events):
    opened = sessions_opened(celery_app, worker_env, task_events, "recommended", celery_defaults=False)
    print(f"recommended settings: {opened} sessions for {TASKS} tasks on {CONCURRENCY} pool processes")
    # One per pool process that ran a task (the main process runs no query); at most one
    # more each, were a connection recycled. Here: 2.
    assert 1 <= opened <= 2 * CONCURRENCY, opened


def test_celery_defaults_open_a_session_for_every_task(celery_app, worker_env, task_events):
    """The proof that the count works: without CELERY_DB_REUSE_MAX the fixup closes the
    connection around every task, although CONN_MAX_AGE (600 s) asks to keep it."""
    opened = sessions_opened(celery_app, worker_env, task_events, "defaults", celery_defaults=True)
    print(f"Celery's defaults: {opened} sessions for {TASKS} tasks on {CONCURRENCY} pool processes")
    assert opened >= TASKS, opened


def test_a_session_the_server_ended_between_tasks_is_replaced_without_failing_a_task(
    celery_app, worker_env, task_events
):
    """Reused connections can die while idle (a server restart, a failover, an idle
    timeout). With CONN_HEALTH_CHECKS and close_old_connections around each task, the
    next task checks its connection and opens a new one instead of failing on it."""
    with db_worker(celery_app, worker_env, "server-ended", celery_defaults=False) as application_name:
        run_transition_tasks(task_events, 4 * CONCURRENCY)
        pids = live_sessions(application_name)
        assert 1 <= len(pids) <= CONCURRENCY, pids  # one per pool process that ran a task
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
            assert [ok for (ok,) in cursor.fetchall()] == [True] * len(pids)
        wait_until_ended("pid = ANY(%s)", [pids])

        run_transition_tasks(task_events, 4 * CONCURRENCY)
        replaced = live_sessions(application_name)
        assert replaced, "the tasks after the kill ran without a session?"
        assert not set(replaced) & set(pids), (pids, replaced)
