"""Settings of the ``benchmarks/end_to_end.py`` workers (and of its client process).

The example project's settings on PostgreSQL and Redis (``DATABASE_URL``, ``REDIS_URL``
from the environment), with what a production worker has and a benchmark needs:

- ``DEBUG`` off (Django would keep every query in ``connection.queries``);
- no result backend and results ignored: completions are counted by the benchmark's
  own ``task_postrun`` handler (``benchmarks/e2e_tasks.py``), one Redis call per task;
- a cache key prefix of its own, so the throttle's keys are told apart from others.

``BENCH_E2E_PROFILE`` picks the database connection handling, set here explicitly either
way so the figures do not depend on what the example settings say:

- ``recommended``: the worker keeps its database connection across tasks
  (``CELERY_DB_REUSE_MAX = 1000`` and ``CONN_MAX_AGE = 600``, with
  ``CONN_HEALTH_CHECKS``);
- ``default``: Celery's default: its Django fixup closes the connection before and after
  every task (``CELERY_DB_REUSE_MAX`` unset, ``CONN_MAX_AGE = 0``), so every task that
  touches the database connects again;
- ``production`` (informational): ``recommended`` plus the broker settings of
  docs/howto/production.md ("Broker restarts"): ``acks_late`` with
  ``reject_on_worker_lost``, prefetch 1, a publish retry policy and the Redis transport
  options, the whole production configuration the guide gives;
- ``async-commit`` (for diagnosis, not a recommendation): ``recommended`` with the
  worker's sessions on ``synchronous_commit = off``, so a ``COMMIT`` does not wait for
  the WAL flush: how much of a transition task is the disk.

Both ``recommended`` and ``default`` workers also run ``example_project/celery.py``'s
``close_old_connections()`` around each task (importing ``example_project`` connects it),
as the production settings guide recommends; with ``CONN_MAX_AGE = 0`` it closes the
connection, which the fixup has done already.
"""

from __future__ import annotations

import os

from example_project.settings import *  # noqa: F403
from tests.brokers.profiles import PUBLISH_RETRY_POLICY

DEBUG = False

PROFILES = ("recommended", "default", "production", "async-commit")
PROFILE = os.environ.get("BENCH_E2E_PROFILE", "recommended")
if PROFILE not in PROFILES:
    raise ValueError(f"BENCH_E2E_PROFILE must be one of {PROFILES}, got {PROFILE!r}")

CELERY_RESULT_BACKEND: str | None = None  # type: ignore[no-redef]
CELERY_TASK_IGNORE_RESULT = True
CACHES["default"]["KEY_PREFIX"] = "bench-e2e"  # noqa: F405

if PROFILE in ("recommended", "production", "async-commit"):
    CELERY_DB_REUSE_MAX: int | None = 1000  # type: ignore[no-redef]
    DATABASES["default"]["CONN_MAX_AGE"] = 600  # noqa: F405
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True  # noqa: F405
    if PROFILE == "async-commit":
        DATABASES["default"].setdefault("OPTIONS", {})["options"] = "-c synchronous_commit=off"  # noqa: F405
else:
    CELERY_DB_REUSE_MAX = None  # type: ignore[assignment]
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False  # noqa: F405

if PROFILE == "production":
    # As docs/howto/production.md gives them ("Broker restarts").
    CELERY_TASK_ACKS_LATE = True
    CELERY_TASK_REJECT_ON_WORKER_LOST = True
    CELERY_WORKER_PREFETCH_MULTIPLIER = 1
    CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
    # The policy the guide gives, as the broker-restart test uses it.
    CELERY_TASK_PUBLISH_RETRY_POLICY = dict(PUBLISH_RETRY_POLICY)
    CELERY_BROKER_TRANSPORT_OPTIONS = {  # replaces the example project's
        "visibility_timeout": 600,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
