"""Shared fixtures: a clean Redis test database, real Celery workers, task events.

The worker fixtures are for tests marked ``services`` that also use
``@pytest.mark.django_db(transaction=True)``: a worker is another process with its
own database connection, so it only sees rows the test committed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.workers import TaskEvents, WorkerProcess, database_url, iter_workers, stop_workers


def _services_configured() -> bool:
    """True when the tests run on PostgreSQL and Redis (not ``TEST_DATABASE=sqlite``)."""
    return settings.DATABASES["default"][
        "ENGINE"
    ] == "django.db.backends.postgresql" and settings.REDIS_URL.startswith("redis://")


@pytest.fixture(scope="session", autouse=True)
def redis_test_db_flushed() -> bool:
    """Flush the test Redis database (broker, results, cache) once, at session start,
    so messages and slots left by an earlier run cannot leak into this one. Returns
    whether it was flushed (False without Redis)."""
    if not settings.REDIS_URL.startswith("redis://"):
        return False
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        # Tests that need Redis fail on their own; the others can still run.
        warnings.warn(f"could not flush {settings.REDIS_URL}: {exc}", stacklevel=1)
        return False
    finally:
        client.close()
    return True


@pytest.fixture(scope="session")
def celery_app():
    from example_project.celery import app

    return app


@pytest.fixture(scope="session")
def task_events(celery_app, redis_test_db_flushed):
    """Task events of every worker, collected from the start of the session."""
    if not _services_configured():
        pytest.skip("needs PostgreSQL and Redis")
    with TaskEvents(celery_app) as events:
        yield events


@pytest.fixture(scope="session")
def example_worker(django_db_setup, django_db_blocker, celery_app, task_events, redis_test_db_flushed):
    """One real ``celery worker`` (prefork, 2 processes, queue ``celery``) for the
    session, on the test database that ``django_db_setup`` created (it is started
    after that, and stopped before the database is dropped)."""
    from django.db import connection

    if not _services_configured():
        pytest.skip("needs PostgreSQL and Redis")
    worker = WorkerProcess(
        celery_app,
        env={
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(connection.settings_dict),
            "REDIS_URL": settings.REDIS_URL,
            "EXAMPLE_BACKEND_DELAY": str(settings.EXAMPLE_BACKEND_DELAY),
        },
        name="e2e",
        queues=("celery",),
        concurrency=2,
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def worker_env(django_db_setup, django_db_blocker, redis_test_db_flushed) -> dict[str, str]:
    """The environment of a worker on the test database and the test Redis (what
    ``example_worker`` gets); add your own variables to it for a dedicated worker."""
    from django.db import connection

    if not _services_configured():
        pytest.skip("needs PostgreSQL and Redis")
    return {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(connection.settings_dict),
        "REDIS_URL": settings.REDIS_URL,
        "EXAMPLE_BACKEND_DELAY": str(settings.EXAMPLE_BACKEND_DELAY),
    }


@pytest.fixture(scope="module")
def module_workers() -> Iterator[list[WorkerProcess]]:
    """Workers a test module started (append them): stopped together, in parallel, when
    the module ends (a warm shutdown takes seconds; one after the other adds up)."""
    started: list[WorkerProcess] = []
    yield started
    stop_workers(*started)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the end of the log of every worker a failed test used (``example_worker``
    and any fixture value holding ``WorkerProcess`` objects, see ``iter_workers``)."""
    report = yield
    if report.failed:
        seen: set[int] = set()
        for value in getattr(item, "funcargs", {}).values():
            for worker in iter_workers(value):
                if id(worker) in seen:
                    continue
                seen.add(id(worker))
                alive = (
                    "running"
                    if worker.alive()
                    else f"exited ({worker.process and worker.process.returncode})"
                )
                report.sections.append(
                    (f"celery worker {worker.hostname}: {alive}, log {worker.log_path}", worker.log_tail())
                )
    return report


@pytest.fixture(scope="session")
def cache_tables(django_db_setup, django_db_blocker) -> None:
    """The tables of every ``DatabaseCache`` in ``CACHES``, created once for the session
    and committed (pytest-django creates model tables only; ``createcachetable`` skips
    tables that exist and caches that are not database caches). On the SQLite run the
    default cache, and so the throttle slots, live in one of these."""
    from django.core.management import call_command

    with django_db_blocker.unblock():
        call_command("createcachetable", verbosity=0)


#: DatabaseCache tables that tests add as lock caches of their own (see ``committed_cache_tables``).
TEST_LOCK_TABLES = ("tw_test_throttle_api", "tw_cmd_test_locks")


@pytest.fixture(scope="session")
def committed_cache_tables(django_db_setup, django_db_blocker) -> tuple[str, ...]:
    """The tables of ``TEST_LOCK_TABLES``, created once and committed: the DatabaseCache
    throttle backend works on private connections, which do not see a table created
    inside a test's transaction. (Session-scoped, so it is set up before any test's
    transaction begins.)"""
    from django.core.management import call_command

    with django_db_blocker.unblock():
        for table in TEST_LOCK_TABLES:
            call_command("createcachetable", table, verbosity=0)
    return TEST_LOCK_TABLES


@pytest.fixture(scope="session", autouse=True)
def _close_throttle_connections(request) -> Iterator[None]:
    """The DatabaseCache throttle backend keeps private connections per thread: close them
    before the test database is dropped (after every test of the session)."""
    yield
    from task_workflow.throttle.database_backend import close_private_connections

    close_private_connections()
