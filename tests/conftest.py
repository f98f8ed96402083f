"""Shared fixtures: a clean Redis test database, real Celery workers, task events.

The worker fixtures are for tests marked ``services`` that also use
``@pytest.mark.django_db(transaction=True)``: a worker is another process with its
own database connection, so it only sees rows the test committed.
"""

from __future__ import annotations

import warnings

import pytest
from django.conf import settings

from tests.workers import TaskEvents, WorkerProcess, database_url


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the end of the worker's log to the report of a failed test that used it."""
    report = yield
    worker = getattr(item, "funcargs", {}).get("example_worker")
    if report.failed and isinstance(worker, WorkerProcess):
        alive = "running" if worker.alive() else f"exited ({worker.process and worker.process.returncode})"
        report.sections.append(
            (f"celery worker {worker.hostname}: {alive}, log {worker.log_path}", worker.log_tail())
        )
    return report
