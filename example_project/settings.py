"""Settings of the example project.

Embedded defaults need no server: SQLite for Django, a Celery broker and result store in
SQLite files of their own (kombu's SQLAlchemy transport and Celery's database result
backend: SQLAlchemy, the ``demo`` extra) and Django's database cache, all under ``var/``.
Set ``DATABASE_URL`` (``postgres://user@host:port/name``) and ``REDIS_URL``
(``redis://host:port/db``) to run the same on PostgreSQL and Redis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("TASK_WORKFLOW_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_fsm",  # templates of the admin transition buttons
    "task_workflow",
    "example_project.apps.ExampleConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = None
STATIC_URL = "static/"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database_from_url(url: str) -> dict[str, Any]:
    """A ``DATABASES`` entry from ``postgres://…`` or ``sqlite:///path`` URLs."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": unquote(parts.path[1:]) if parts.path not in ("", "/") else ":memory:",
            # Worker processes write concurrently: wait for the lock instead of failing,
            # and take it at BEGIN so read-then-write transactions cannot deadlock.
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
            "TEST": {"NAME": str(VAR_DIR / "test.sqlite3")},
        }
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            # Keep connections and check them before reuse (workers: with CELERY_DB_REUSE_MAX
            # below and the task signal handler in celery.py): one the server dropped is
            # replaced, not failed on.
            "CONN_MAX_AGE": 600,
            "CONN_HEALTH_CHECKS": True,
        }
    raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r} in {url!r}")


DATABASES = {
    "default": database_from_url(os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'example.sqlite3'}")
}

REDIS_URL = os.environ.get("REDIS_URL", "")

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
    # Longer than any task here may run, so a running acks_late task is not redelivered.
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {"visibility_timeout": 3600}
else:
    try:
        from sqlalchemy.pool import NullPool
    except ImportError as exc:  # say what to install rather than a bare ModuleNotFoundError
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            "the embedded broker needs SQLAlchemy: pip install -e '.[demo]' (or set REDIS_URL)"
        ) from exc

    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "task_workflow_cache",
            # Culling past MAX_ENTRIES (default 300) would drop live throttle slots.
            "OPTIONS": {"MAX_ENTRIES": 1_000_000},
        }
    }
    # The broker: kombu's SQLAlchemy transport on a SQLite file of its own. A consumer takes
    # a message in one BEGIN IMMEDIATE transaction that marks it invisible, so two processes
    # never take the same one, and nothing reads a message before its INSERT committed (the
    # filesystem transport's reader could: JSONDecodeError, kombu issue #1551). A message
    # taken by a worker that then dies is not delivered again. Its own file, not Django's:
    # the consumers' polls take SQLite's write lock, which Django's writes would wait for.
    BROKER_DB = VAR_DIR / "broker.sqlite3"
    CELERY_BROKER_URL = f"sqlite:///{BROKER_DB}"
    CELERY_BROKER_TRANSPORT = "example_project.broker:SQLiteBrokerTransport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # create_engine() arguments: wait up to 30 s for SQLite's lock instead of 5 s, and
        # keep no connection open between transactions (none is inherited across a fork).
        "connect_args": {"timeout": 30},
        "poolclass": NullPool,
    }
    # Results in a SQLite file through Celery's database backend: each written in a
    # transaction, so no process reads a half-written one (the file backend's could).
    RESULTS_DB = VAR_DIR / "results.sqlite3"
    CELERY_RESULT_BACKEND = f"db+sqlite:///{RESULTS_DB}"
    CELERY_DATABASE_ENGINE_OPTIONS = {"connect_args": {"timeout": 30}}

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ALWAYS_EAGER = os.environ.get("CELERY_TASK_ALWAYS_EAGER") == "1"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Keep each worker process's database connection for 1000 tasks: by default Celery closes
# it before and after every task (docs/howto/production.md, check task_workflow.W006).
CELERY_DB_REUSE_MAX = 1000

TASK_WORKFLOW = {
    "CACHE": "default",
    "LOCK_TTL": 30,
}

# Seconds the example's throttled "slow" task works.
EXAMPLE_SLOW_SECONDS = float(os.environ.get("EXAMPLE_SLOW_SECONDS", "1.0"))

# Seconds the simulated cloud backend takes per call.
EXAMPLE_BACKEND_DELAY = float(os.environ.get("EXAMPLE_BACKEND_DELAY", "0.5"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"task_workflow": {"handlers": ["console"], "level": "INFO"}},
}

# Write the demo's cross-process timeline (var/timeline.jsonl).
EXAMPLE_TIMELINE = os.environ.get("EXAMPLE_TIMELINE") == "1"
