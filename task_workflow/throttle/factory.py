"""Which throttle backend a cache alias gets, and the Redis client it runs on.

One backend per (process, cache alias), built on first use: a django-redis cache or
Django's own Redis cache gets :class:`RedisThrottleBackend` (Lua scripts), on a client of
the cache's server with a connection pool and socket timeout of its own; a database cache
the row-locked backend; any other cache the generic ``cache.add`` backend.
"""

from __future__ import annotations

import os
import threading
from typing import Any, cast

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache as BuiltinRedisCache
from django_redis.cache import RedisCache as DjangoRedisCache
from redis import BlockingConnectionPool, ConnectionPool, Redis

from ..conf import get_setting
from .base import ThrottleBackend
from .cache_backend import CacheThrottleBackend
from .database_backend import DatabaseCacheThrottleBackend
from .redis_backend import RedisThrottleBackend

#: Backends by (pid, alias): a forked child builds its own (its pools are its own anyway).
_backends: dict[tuple[int, str], ThrottleBackend] = {}
_backends_lock = threading.Lock()


def get_backend(alias: str | None = None) -> ThrottleBackend:
    """The throttle backend for a cache alias (default ``TASK_WORKFLOW['CACHE']``).

    A django-redis cache (or Django's own Redis cache) gets the Lua fast path; any other
    cache the generic ``cache.add`` backend.
    """
    alias = alias or get_setting("CACHE")
    cache_key = (os.getpid(), alias)
    backend = _backends.get(cache_key)
    if backend is None:
        with _backends_lock:
            backend = _backends.get(cache_key) or _build_backend(alias)
            _backends[cache_key] = backend
    return backend


def _build_backend(alias: str) -> ThrottleBackend:
    cache = caches[alias]
    key_prefix = str(cache.make_key("tw:throttle:"))
    if isinstance(cache, DjangoRedisCache):
        return _redis_backend(cache.client.get_client(write=True), key_prefix)
    if isinstance(cache, BuiltinRedisCache):
        return _redis_backend(cache._cache.get_client(None, write=True), key_prefix)
    if DatabaseCacheThrottleBackend.supports(cache):
        return DatabaseCacheThrottleBackend(cast(Any, cache), alias=alias)
    return CacheThrottleBackend(cache, alias=alias)


def _redis_backend(client: Redis, key_prefix: str) -> RedisThrottleBackend:
    grace = get_setting("THROTTLE_RESTART_GRACE")
    return RedisThrottleBackend(
        throttle_client(client, float(get_setting("THROTTLE_SOCKET_TIMEOUT"))),
        key_prefix,
        restart_grace=float(get_setting("LOCK_TTL") if grace is None else grace),
    )


def throttle_client(client: Redis, timeout: float) -> Redis:
    """A client of ``client``'s server on a connection pool of its own, whose every call
    gives up after ``timeout`` seconds (or the cache's own shorter socket timeout).

    One call that hangs on a half-open connection must not stall the lease renewer, and
    the cache's own calls keep the timeouts the cache was configured with. The new pool
    is of the cache pool's class and built from its ``connection_class`` and
    ``connection_kwargs`` (the documented arguments a pool is constructed with, which
    redis-py keeps as attributes of the same names), so host, database, password, TLS,
    ``retry`` and health checks are the cache's; only the two timeouts differ. redis-py's
    pool is thread-safe and resets itself in a forked child (it compares the pid on every
    checkout), so the client is shared by the whole process.

    A pool of another kind (e.g. Sentinel's, which finds the master itself) is used as it
    is, with the cache's timeouts.
    """
    pool = client.connection_pool
    if type(pool) not in (ConnectionPool, BlockingConnectionPool):
        return client
    kwargs = dict(pool.connection_kwargs)
    for name in ("socket_timeout", "socket_connect_timeout"):
        configured = kwargs.get(name)
        kwargs[name] = timeout if configured is None else min(float(configured), timeout)
    own_pool = type(pool)(
        connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs
    )
    return Redis(connection_pool=own_pool)
