"""Which throttle backend a cache alias gets, and the Redis client it runs on.

One backend per (process, cache alias), built on first use: a django-redis cache or
Django's own Redis cache gets :class:`RedisThrottleBackend` (Lua scripts), on a client of
the cache's server with a connection pool and socket timeout of its own (on Sentinel: a
pool of the Sentinel-managed primary, with the primary watch of
:mod:`~task_workflow.throttle.sentinel`); a database cache the row-locked backend; any
other cache the generic ``cache.add`` backend.
"""

from __future__ import annotations

import os
import threading
from typing import Any, cast

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache as BuiltinRedisCache
from django_redis.cache import RedisCache as DjangoRedisCache
from redis import BlockingConnectionPool, ConnectionPool, Redis
from redis.sentinel import SentinelConnectionPool

from ..conf import get_setting
from .base import ThrottleBackend
from .cache_backend import CacheThrottleBackend
from .database_backend import DatabaseCacheThrottleBackend
from .redis_backend import RedisThrottleBackend
from .sentinel import PrimaryWatch, bounded_timeouts, throttle_sentinel_pool

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


def cache_redis_client(cache: Any) -> Redis | None:
    """The redis-py client a django-redis cache or Django's own Redis cache writes with
    (its primary: on Sentinel, a client of the Sentinel-managed primary); ``None`` for
    any other cache. Building it does not connect."""
    if isinstance(cache, DjangoRedisCache):
        return cache.client.get_client(write=True)
    if isinstance(cache, BuiltinRedisCache):
        return cache._cache.get_client(None, write=True)
    return None


def _build_backend(alias: str) -> ThrottleBackend:
    cache = caches[alias]
    key_prefix = str(cache.make_key("tw:throttle:"))
    client = cache_redis_client(cache)
    if client is not None:
        return _redis_backend(client, key_prefix)
    if DatabaseCacheThrottleBackend.supports(cache):
        return DatabaseCacheThrottleBackend(cast(Any, cache), alias=alias)
    return CacheThrottleBackend(cache, alias=alias)


def _redis_backend(client: Redis, key_prefix: str) -> RedisThrottleBackend:
    grace = get_setting("THROTTLE_RESTART_GRACE")
    own_client = throttle_client(client, float(get_setting("THROTTLE_SOCKET_TIMEOUT")))
    pool = own_client.connection_pool
    watch = PrimaryWatch(pool) if isinstance(pool, SentinelConnectionPool) and pool.is_master else None
    return RedisThrottleBackend(
        own_client,
        key_prefix,
        restart_grace=float(get_setting("LOCK_TTL") if grace is None else grace),
        replicas=int(get_setting("THROTTLE_REPLICAS")),
        replicas_timeout=float(get_setting("THROTTLE_REPLICAS_TIMEOUT")),
        primary_check=watch,
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

    A Sentinel pool (django-redis's ``SentinelConnectionFactory``) gets the same: a pool
    of its class for the same service and role, whose connections ask Sentinel for the
    primary when they connect, and whose questions to Sentinel also give up after
    ``timeout`` (:func:`~task_workflow.throttle.sentinel.throttle_sentinel_pool`). A pool
    of any other kind is used as it is, with the cache's timeouts.
    """
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return Redis(connection_pool=throttle_sentinel_pool(pool, timeout))
    if type(pool) not in (ConnectionPool, BlockingConnectionPool):
        return client
    own_pool = type(pool)(
        connection_class=pool.connection_class,
        max_connections=pool.max_connections,
        **bounded_timeouts(pool.connection_kwargs, timeout),
    )
    return Redis(connection_pool=own_pool)
