"""Settings of the workers of tests/e2e/test_not_permitted_logging.py and
tests/e2e/test_heavy_consumer_warning.py: tests.settings, plus the tasks of
``tests.e2e.mistakes_tasks``, a log format that shows each line's level and logger (the
tests assert levels), and the heavy-consumer grace period from ``MISTAKES_HEAVY_GRACE``."""

import os

from tests.settings import *  # noqa: F403

CELERY_IMPORTS = ["tests.e2e.mistakes_tasks"]

TASK_WORKFLOW = {
    **TASK_WORKFLOW,  # noqa: F405
    "HEAVY_CONSUMER_GRACE": float(os.environ.get("MISTAKES_HEAVY_GRACE", "30")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"levelled": {"format": "[%(levelname)s %(name)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "levelled"}},
    "loggers": {"task_workflow": {"handlers": ["console"], "level": "DEBUG"}},
}
