"""The example project's Celery app (``celery -A example_project worker``)."""

import os
from typing import Any

from celery import Celery, signals
from django.db import close_old_connections

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def close_obsolete_connections(sender: Any = None, **kwargs: Any) -> None:
    """What Django does around each request and Celery never does: with
    ``CELERY_DB_REUSE_MAX`` a worker keeps its connections, so drop the ones that failed
    (and, with ``CONN_HEALTH_CHECKS``, check the others before their next use) or outlived
    ``CONN_MAX_AGE``. Not for eager tasks: they run inside the caller's transaction."""
    if not getattr(getattr(sender, "request", None), "is_eager", False):
        close_old_connections()
