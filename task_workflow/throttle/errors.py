"""What the throttle raises, and which errors mean "the slot store is unreachable"."""

from __future__ import annotations

from django.db import DatabaseError
from redis.exceptions import RedisError

from ..exceptions import TaskWorkflowError


def _client_errors() -> tuple[type[Exception], ...]:
    """The error classes of the Memcached clients Django supports, where installed."""
    found: list[type[Exception]] = []
    try:
        from pymemcache.exceptions import MemcacheError

        found.append(MemcacheError)
    except ImportError:
        pass
    try:
        import pylibmc

        found.append(pylibmc.Error)
    except ImportError:
        pass
    return tuple(found)


#: What "the slot store is unreachable (or failing)" looks like: socket errors, Redis
#: errors, database errors, Memcached client errors. Only these fail closed into a
#: re-queue; anything else (a soft time limit, worker shutdown, ``KeyboardInterrupt``, a
#: bug) propagates, after the waiter left the line.
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, RedisError, DatabaseError, *_client_errors())


class ThrottleTimeout(TaskWorkflowError):
    """No slot freed within ``wait`` seconds, outside a task (inside one it is re-queued)."""


class ThrottleUnavailable(TaskWorkflowError):
    """The slot store could not be reached, outside a task (inside one it is re-queued)."""
