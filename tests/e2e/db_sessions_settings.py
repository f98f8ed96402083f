"""Settings of the workers of tests/e2e/test_db_sessions_e2e.py: tests.settings (the
example's recommended database settings) with the worker's PostgreSQL sessions named
``DB_SESSIONS_APPLICATION_NAME`` (``application_name``, so the test can tell them apart),
or, with ``DB_SESSIONS_CELERY_DEFAULTS=1``, Celery's and Django's defaults: no
``CELERY_DB_REUSE_MAX`` and ``CONN_MAX_AGE = 0`` (Celery 5.5 closes a connection around a
task only when it is obsolete, so there a ``CONN_MAX_AGE`` alone keeps it; later releases
close it whatever ``CONN_MAX_AGE`` says)."""

import os

from tests.settings import *  # noqa: F403

DATABASES["default"]["OPTIONS"] = {  # noqa: F405
    **DATABASES["default"].get("OPTIONS", {}),  # noqa: F405
    "application_name": os.environ["DB_SESSIONS_APPLICATION_NAME"],
}
if os.environ.get("DB_SESSIONS_CELERY_DEFAULTS") == "1":
    del CELERY_DB_REUSE_MAX  # noqa: F821
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
