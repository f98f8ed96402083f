"""Settings of the fault campaign's holder processes: the test settings, with the lease
and the Redis-restart grace of the campaign (``TWF_TTL``, ``TWF_GRACE``, seconds).

The environment gives ``DATABASE_URL`` and either ``THROTTLE_REDIS_URL`` (an address in
the campaign's services namespace; tests/settings.py makes it the throttle store) or, in
the failover campaign, ``TWF_LOCK_CACHE``: the lock cache's ``CACHES`` entry as JSON,
django-redis's documented Sentinel configuration (``SentinelTopology.django_cache()``),
with ``TWF_REPLICAS`` and ``TWF_REPLICAS_TIMEOUT`` for the durable mode.
"""

import json
import os

from tests.settings import *  # noqa: F403

DEBUG = False  # no query log growing through a long run
TASK_WORKFLOW = {
    **TASK_WORKFLOW,  # noqa: F405
    "LOCK_TTL": float(os.environ.get("TWF_TTL", "1.5")),
    "THROTTLE_RESTART_GRACE": float(os.environ.get("TWF_GRACE", os.environ.get("TWF_TTL", "1.5"))),
}
if os.environ.get("TWF_LOCK_CACHE"):
    lock_cache = json.loads(os.environ["TWF_LOCK_CACHE"])
    options = lock_cache.get("OPTIONS", {})
    if "SENTINELS" in options:  # JSON has no tuples; the docs write (host, port) pairs
        options["SENTINELS"] = [(host, int(port)) for host, port in options["SENTINELS"]]
    CACHES["locks"] = lock_cache  # noqa: F405
    TASK_WORKFLOW["CACHE"] = "locks"
if os.environ.get("TWF_REPLICAS"):
    TASK_WORKFLOW["THROTTLE_REPLICAS"] = int(os.environ["TWF_REPLICAS"])
    TASK_WORKFLOW["THROTTLE_REPLICAS_TIMEOUT"] = float(os.environ.get("TWF_REPLICAS_TIMEOUT", "0.3"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"task_workflow": {"handlers": ["console"], "level": "WARNING"}},
}
