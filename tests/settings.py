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
