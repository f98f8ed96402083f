"""Settings of the fault campaign's holder processes: the test settings, with the lease
and the Redis-restart grace of the campaign (``TWF_TTL``, ``TWF_GRACE``, seconds).

The environment gives ``DATABASE_URL`` and ``THROTTLE_REDIS_URL`` (addresses in the
campaign's services namespace); tests/settings.py makes the latter the throttle store.
"""

import os

from tests.settings import *  # noqa: F403

DEBUG = False  # no query log growing through a long run
TASK_WORKFLOW = {
    **TASK_WORKFLOW,  # noqa: F405
    "LOCK_TTL": float(os.environ.get("TWF_TTL", "1.5")),
    "THROTTLE_RESTART_GRACE": float(os.environ.get("TWF_GRACE", os.environ.get("TWF_TTL", "1.5"))),
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"task_workflow": {"handlers": ["console"], "level": "WARNING"}},
}
