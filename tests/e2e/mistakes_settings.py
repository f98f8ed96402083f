"""Settings of the workers of tests/e2e/test_not_permitted_logging.py and
tests/e2e/test_heavy_consumer_warning.py: tests.settings, plus the tasks of
``tests.e2e.mistakes_tasks``, task_workflow's log records at every level in the worker's
log (with their level: the tests assert levels), the heavy-consumer grace period from
``MISTAKES_HEAVY_GRACE``, ``IF_NOT_PERMITTED`` from ``MISTAKES_IF_NOT_PERMITTED`` and
the default cache's Redis from ``MISTAKES_CACHE_URL``."""

import os

from tests.settings import *  # noqa: F403

CELERY_IMPORTS = ["tests.e2e.mistakes_tasks"]

TASK_WORKFLOW = {
    **TASK_WORKFLOW,  # noqa: F405
    "HEAVY_CONSUMER_GRACE": float(os.environ.get("MISTAKES_HEAVY_GRACE", "30")),
    "IF_NOT_PERMITTED": os.environ.get("MISTAKES_IF_NOT_PERMITTED", "fail"),
}

# Celery's worker logs through the root logger's handler, with each line's level
# ("[time: WARNING/ForkPoolWorker-1] ..."): task_workflow's records go there, DEBUG included.
# A lock cache that is down (the heavy-consumer warning must not fail the worker).
if os.environ.get("MISTAKES_CACHE_URL"):
    CACHES["default"] = {  # noqa: F405
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ["MISTAKES_CACHE_URL"],
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 2},
    }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"task_workflow": {"level": "DEBUG"}},
}
