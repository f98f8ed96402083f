"""Settings of a worker whose broker, result backend and slot store are one Redis that
the test stops and starts again (``OUTAGE_REDIS_URL``): tests.settings with the
recommended delivery settings (``acks_late``, redelivery after ``visibility_timeout``), a
short visibility timeout so the test need not wait long, and a 1 s restart grace."""

import os

os.environ["REDIS_URL"] = os.environ["OUTAGE_REDIS_URL"]

from tests.settings import *  # noqa: F403

CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
TASK_WORKFLOW = {**TASK_WORKFLOW, "THROTTLE_RESTART_GRACE": 1.0, "THROTTLE_WAIT": 5.0}  # noqa: F405
