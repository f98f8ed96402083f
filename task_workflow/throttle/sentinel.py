"""The throttle on Redis Sentinel: its own pool of the Sentinel-managed primary, and the
primary watch.

django-redis's documented Sentinel configuration (``CLIENT_CLASS``
``django_redis.client.SentinelClient``, ``CONNECTION_FACTORY``
``django_redis.pool.SentinelConnectionFactory``) gives the cache a redis-py
:class:`~redis.sentinel.SentinelConnectionPool`. Its connections
(:class:`~redis.sentinel.SentinelManagedConnection`) ask Sentinel for the primary's
address whenever they connect, and drop themselves on ``READONLY`` (a primary demoted to
a replica) and on the ``UNBLOCKED`` error a demoted primary gives a blocked ``BLPOP``; so
after a connection error the next call goes to whatever primary Sentinel names then.

What that leaves out is an orderly failover (``SENTINEL FAILOVER``, or a managed
service's switch): the old primary keeps answering as a primary for seconds after
Sentinel promoted a replica (Sentinel demotes it only then), and connections that are
already open keep writing to it; writes the new primary never sees. The
:class:`PrimaryWatch` closes that window: a throttle call has Sentinel asked for the
primary's address, at most once per ``interval`` (a second) per process and in a thread
of its own (the call does not wait for the answer), through the pool's own
:meth:`~redis.sentinel.SentinelConnectionPool.get_master_address`, which, when the
address changed, disconnects the pool's idle connections (they reconnect to the new
primary) and makes connections in use at that moment be dropped when they are given
back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from redis.exceptions import RedisError
from redis.sentinel import Sentinel, SentinelConnectionPool

logger = logging.getLogger(__name__)

SOCKET_TIMEOUTS = ("socket_timeout", "socket_connect_timeout")


def bounded_timeouts(kwargs: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``kwargs`` (a connection's keyword arguments) with both socket timeouts at most
    ``timeout`` seconds: a configured shorter one is kept, none becomes ``timeout``."""
    bounded = dict(kwargs)
    for name in SOCKET_TIMEOUTS:
        configured = bounded.get(name)
        bounded[name] = timeout if configured is None else min(float(configured), timeout)
    return bounded


def throttle_sentinel_manager(manager: Sentinel, timeout: float) -> Sentinel:
    """A :class:`~redis.sentinel.Sentinel` that asks the same Sentinels as ``manager``,
    with its ``sentinel_kwargs`` (password, TLS, ``retry``) and ``min_other_sentinels``,
    but whose every question gives up after ``timeout`` seconds.

    Without it a Sentinel that stops answering would hold a throttle call (and the lease
    renewer) for the cache's own socket timeout, none by default, since connecting to the
    primary starts with a question to Sentinel.
    """
    addresses = [
        (client.connection_pool.connection_kwargs["host"], client.connection_pool.connection_kwargs["port"])
        for client in manager.sentinels
    ]
    return Sentinel(
        addresses,
        min_other_sentinels=manager.min_other_sentinels,
        sentinel_kwargs=bounded_timeouts(dict(manager.sentinel_kwargs), timeout),
        **manager.connection_kwargs,
    )


def throttle_sentinel_pool(pool: SentinelConnectionPool, timeout: float) -> SentinelConnectionPool:
    """A pool of the same class as ``pool`` for the same service and role, built from the
    arguments it was constructed with (``service_name``, ``is_master``,
    ``check_connection``, ``connection_class``, ``max_connections`` and
    ``connection_kwargs``, less the ``connection_pool`` entry it adds itself), with socket
    timeouts of at most ``timeout`` seconds, towards the primary and towards Sentinel."""
    kwargs = {name: value for name, value in pool.connection_kwargs.items() if name != "connection_pool"}
    manager = pool.sentinel_manager
    if isinstance(manager, Sentinel):
        manager = throttle_sentinel_manager(manager, timeout)
    return type(pool)(
        pool.service_name,
        manager,
        is_master=pool.is_master,
        check_connection=pool.check_connection,
        connection_class=pool.connection_class,
        max_connections=pool.max_connections,
        **bounded_timeouts(kwargs, timeout),
    )


class PrimaryWatch:
    """Called before each throttle call on a Sentinel-managed primary: at most once per
    ``interval`` seconds per process it has Sentinel asked where the primary is (the
    pool's ``get_master_address()``: when the address changed, the pool disconnects its
    idle connections, and drops those in use when they are given back).

    The question runs in a short-lived thread of its own, and the call that started it
    waits for the answer ``answer_wait`` seconds at most (0.1 s; Sentinel answers within a
    millisecond or two): so the first call of a process that was quiet through an orderly
    failover goes to the new primary, not to the old one that still answers (where, in
    mode 0, a release was lost with the old primary's writes and the slot stayed taken
    for a lease), while Sentinels that stop answering cannot hold a throttle call for one
    socket timeout per Sentinel (measured: 3.0 s with three paused Sentinels and a 0.5 s
    timeout, when the call waited for the whole question). A Sentinel that cannot be reached is not a throttle
    failure by itself (the primary may be fine): it is logged, and calls go on to the
    primary the pool knows. One question at a time: while one is unanswered, no other
    starts.
    """

    def __init__(self, pool: SentinelConnectionPool, interval: float = 1.0, answer_wait: float = 0.1) -> None:
        self.pool = pool
        self.interval = interval
        self.answer_wait = answer_wait
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._asking: threading.Thread | None = None
        self._failing = False

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        if self._pid != os.getpid():
            # A forked child: the lock may have been held by a thread that is not here.
            self._lock = threading.Lock()
            self._pid = os.getpid()
            self._asking = None
        if not self._lock.acquire(blocking=False):
            return  # another thread is starting the question right now
        try:
            if now < self._next_check or (self._asking is not None and self._asking.is_alive()):
                return
            self._next_check = now + self.interval
            asking = self._asking = threading.Thread(
                target=self.ask, name="task_workflow-primary-watch", daemon=True
            )
            asking.start()
        finally:
            self._lock.release()
        asking.join(self.answer_wait)

    def ask(self) -> None:
        """Ask Sentinel for the primary now (in the calling thread); log a failure."""
        try:
            self.pool.get_master_address()
        except (RedisError, OSError) as exc:
            if not self._failing:
                logger.warning(
                    "Throttle: could not ask Sentinel for the primary of %r (%s); "
                    "using the primary known so far",
                    self.pool.service_name,
                    # redis-py's message lists every Sentinel client's repr: the start is enough.
                    f"{type(exc).__name__}: {str(exc)[:300]}",
                )
            self._failing = True
        else:
            if self._failing:
                logger.info("Throttle: Sentinel answers again for %r", self.pool.service_name)
            self._failing = False
