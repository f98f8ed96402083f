"""``throttle``: at most N holders per (task name, key) across every worker.

As a context manager inside a running task::

    with throttle(key=backend_id):          # one at a time per (task name, key)
        ...

and as a decorator under ``@shared_task``::

    @shared_task()
    @throttle(concurrency=3)
    def dangerous(): ...

A caller waits up to ``wait`` seconds for a slot (woken when one frees), then the task is
re-queued with jittered backoff, keeping its place in its chain and without using up its
``max_retries``. If the slot store cannot be reached the guarded code does not run: the
task is re-queued and the error logged (fail closed).

The package, one job per module: ``limiter`` (the ``throttle`` class), ``lease`` (leases
and their renewer thread), ``requeue`` (re-queueing with backoff), ``errors`` (what it
raises, and what counts as an unreachable store), ``factory`` (which backend a cache
gets, and the Redis client it runs on), ``base`` (the backend interface and the protocol's
invariants) and one module per backend, the Redis one with its Lua scripts in
``scripts/``.
"""

from __future__ import annotations

# Besides the names in ``__all__``, importable from here as before the package was split
# (``X as X`` marks a re-export): the re-queue header and function, the store errors, the
# settings default, the Redis client builder, and the per-process backend registry (tests
# clear it).
from .base import HeldSlot, SlotGroup, ThrottleBackend, WaitingCall
from .cache_backend import CacheThrottleBackend
from .database_backend import DatabaseCacheThrottleBackend
from .errors import STORE_ERRORS as STORE_ERRORS
from .errors import ReplicationNotAcknowledged, ThrottleTimeout, ThrottleUnavailable
from .factory import _backends as _backends
from .factory import get_backend
from .factory import throttle_client as throttle_client
from .lease import Lease
from .limiter import FROM_SETTINGS as FROM_SETTINGS
from .limiter import throttle
from .redis_backend import RedisThrottleBackend
from .requeue import THROTTLE_ATTEMPT_HEADER as THROTTLE_ATTEMPT_HEADER
from .requeue import requeue as requeue

__all__ = [
    "CacheThrottleBackend",
    "DatabaseCacheThrottleBackend",
    "HeldSlot",
    "Lease",
    "RedisThrottleBackend",
    "ReplicationNotAcknowledged",
    "SlotGroup",
    "ThrottleBackend",
    "ThrottleTimeout",
    "ThrottleUnavailable",
    "WaitingCall",
    "get_backend",
    "throttle",
]
