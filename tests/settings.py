"""Test settings: the example project on PostgreSQL + Redis, or on SQLite with
``TEST_DATABASE=sqlite`` (the database-level rules run on both)."""

import os

if os.environ.get("TEST_DATABASE") == "sqlite":
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DATABASE_URL", "sqlite:///unused-test-names-its-own.sqlite3")
else:
    os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/task_workflow")
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("EXAMPLE_BACKEND_DELAY", "0.2")

from example_project.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Throttle slots in their own Redis (a test stops and restarts it mid-run) when asked.
if os.environ.get("THROTTLE_REDIS_URL"):
    CACHES["locks"] = {  # noqa: F405
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ["THROTTLE_REDIS_URL"],
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 2},
    }
    # That Redis is started (and restarted) by the test: a short restart grace (README,
    # "When Redis restarts"), so the test need not wait a whole LOCK_TTL after each start.
    TASK_WORKFLOW = {
        **TASK_WORKFLOW,  # noqa: F405
        "CACHE": "locks",
        "THROTTLE_RESTART_GRACE": float(os.environ.get("THROTTLE_RESTART_GRACE", "1")),
    }
# The generic backend on the database cache, for the same semantic tests.
if os.environ.get("THROTTLE_CACHE") == "database":
    CACHES["locks"] = {  # noqa: F405
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "task_workflow_test_locks",
        "OPTIONS": {"MAX_ENTRIES": 1_000_000},
    }
    TASK_WORKFLOW = {**TASK_WORKFLOW, "CACHE": "locks"}
