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


class ReplicationNotAcknowledged(RedisError):
    """Fewer replicas than ``THROTTLE_REPLICAS`` acknowledged a throttle write in time.

    The primary applied the grant, renewal or release, but it may be lost in a failover,
    so it does not count: a :class:`~redis.exceptions.RedisError`, hence a store failure
    (the throttle fails closed, and gives back a grant it was not sure of).
    """

    def __init__(self, operation: str, acknowledged: int, required: int, timeout: float) -> None:
        self.operation = operation
        self.acknowledged = acknowledged
        self.required = required
        self.timeout = timeout
        super().__init__(
            f"throttle {operation}: {acknowledged} of {required} required replicas acknowledged "
            f"it within {timeout:g} s (THROTTLE_REPLICAS, THROTTLE_REPLICAS_TIMEOUT)"
        )

    def __reduce__(self) -> tuple[type[ReplicationNotAcknowledged], tuple[str, int, int, float]]:
        # Rebuilt from its fields, not from the message (pickling, e.g. a task's result).
        return (type(self), (self.operation, self.acknowledged, self.required, self.timeout))
