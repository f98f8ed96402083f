"""Settings of the workers of tests/e2e/test_not_permitted_logging.py and
tests/e2e/test_heavy_consumer_warning.py: tests.settings, plus the tasks of
``tests.e2e.mistakes_tasks``, task_workflow's log records at every level in the worker's
log (with their level: the tests assert levels), the heavy-consumer grace period from ``MISTAKES_HEAVY_GRACE`` and ``IF_NOT_PERMITTED`` from
``MISTAKES_IF_NOT_PERMITTED``."""

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
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"task_workflow": {"level": "DEBUG"}},
}
