"""Django system checks for task_workflow's configuration.

``check_settings`` (tag ``compatibility``) checks the ``TASK_WORKFLOW`` dict: E001 to E003.
``check_lock_cache`` (tag ``caches``) checks the cache that holds throttle slots:

- errors where throttle limits cannot hold: DummyCache (E007), FileBasedCache (E005), a
  DatabaseCache on a database the throttle cannot lock (E006), a ``LOCK_TTL`` Memcached
  cannot store (E004), a ``MAX_ENTRIES`` Django cannot read (E008);
- warnings: a per-process cache (W001), ``IGNORE_EXCEPTIONS`` (W002), culling (W003), a
  socket timeout of 1 s or less (W004), a cache that could not be inspected (W005);
- Redis Sentinel set-ups the throttle (and the cache) cannot use (E010-E013), and the
  durable mode's settings (E014, E015).

``check_lock_cache_server`` (tag ``caches``) asks the lock cache's Redis what the throttle
needs from it: ``INFO`` for the restart grace (E016), enough connected replicas for
``THROTTLE_REPLICAS`` (W008); W007 when it cannot be asked.

``check_celery_db_reuse`` (tag ``celery``) warns when the project's Celery app closes every
database connection around each task (W006).

``check_fsm_admin_templates`` (tag ``admin``) reports a ModelAdmin of the default admin site
whose django-fsm templates (``StateMixinAdmin`` and any ``django_fsm.admin.FSMAdminMixin``)
cannot be found, usually because ``"django_fsm"`` is not in ``INSTALLED_APPS`` (E009).
"""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.utils.module_loading import import_string

from .conf import DEFAULTS, IF_NOT_PERMITTED_CHOICES

#: Cache backends by what they mean for throttle slots, matched by class (subclasses too).
CACHE_KINDS = (
    ("dummy", "django.core.cache.backends.dummy.DummyCache"),
    ("locmem", "django.core.cache.backends.locmem.LocMemCache"),
    ("file", "django.core.cache.backends.filebased.FileBasedCache"),
    ("database", "django.core.cache.backends.db.DatabaseCache"),
    ("memcached", "django.core.cache.backends.memcached.BaseMemcachedCache"),
    ("django_redis", "django_redis.cache.RedisCache"),
    ("redis", "django.core.cache.backends.redis.RedisCache"),
)

#: Caches that cull entries past ``OPTIONS['MAX_ENTRIES']`` (default 300).
CULLING_KINDS = ("database", "file")

#: Below this many entries a culling lock cache gets W003.
MIN_MAX_ENTRIES = 100_000

#: Socket timeouts (seconds) at or below which the lock cache gets W004.
SHORT_SOCKET_TIMEOUT = 1.0

USE_A_SHARED_CACHE = (
    "Point TASK_WORKFLOW['CACHE'] at a django-redis cache (or a DatabaseCache on PostgreSQL or SQLite)."
)


def _number(value: Any, *, minimum: float, allow_none: bool = False) -> bool:
    """A finite ``int`` or ``float`` >= ``minimum`` (``bool`` is not a number here), or
    ``None`` where allowed. ``inf`` would pass the comparison, and the throttle computes in
    floats (an ``int`` too large for one is refused too)."""
    if value is None:
        return allow_none
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        finite = math.isfinite(value)
    except OverflowError:
        return False
    return finite and value >= minimum


VALIDATORS: dict[str, tuple[Any, str]] = {
    "CACHE": (lambda v: isinstance(v, str) and v in settings.CACHES, "a cache alias defined in CACHES"),
    "LOCK_TTL": (lambda v: _number(v, minimum=0.001) and v > 0, "a finite number of seconds > 0"),
    "THROTTLE_WAIT": (
        lambda v: _number(v, minimum=0, allow_none=True),
        "a finite number of seconds >= 0, or None to wait as long as it takes",
    ),
    "THROTTLE_RETRY_BACKOFF": (lambda v: _number(v, minimum=0.001), "a finite number of seconds > 0"),
    "THROTTLE_RETRY_BACKOFF_MAX": (lambda v: _number(v, minimum=0.001), "a finite number of seconds > 0"),
    "THROTTLE_SOCKET_TIMEOUT": (lambda v: _number(v, minimum=0.01), "a finite number of seconds >= 0.01"),
    "THROTTLE_RESTART_GRACE": (
        lambda v: _number(v, minimum=0, allow_none=True),
        "a finite number of seconds >= 0, or None for LOCK_TTL",
    ),
    "THROTTLE_REPLICAS": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "an int >= 0 (how many replicas must acknowledge each throttle write; 0: none)",
    ),
    "THROTTLE_REPLICAS_TIMEOUT": (
        lambda v: _number(v, minimum=0) and v > 0,
        "a finite number of seconds > 0",
    ),
    "HEAVY_QUEUE": (lambda v: isinstance(v, str) and bool(v), "a non-empty queue name"),
    "TRANSITION_HISTORY": (lambda v: isinstance(v, bool), "True or False"),
    "IF_NOT_PERMITTED": (lambda v: v in IF_NOT_PERMITTED_CHOICES, '"fail" or "ignore"'),
    "HEAVY_CONSUMER_GRACE": (
        lambda v: _number(v, minimum=0, allow_none=True),
        "a finite number of seconds >= 0, or None to turn the heavy-consumer warning off",
    ),
}


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``TASK_WORKFLOW`` holds only known keys with sensible values."""
    configured = getattr(settings, "TASK_WORKFLOW", None)
    if configured is None:
        return []
    if not isinstance(configured, dict):
        return [Error("TASK_WORKFLOW must be a dict.", id="task_workflow.E001")]
    messages: list[CheckMessage] = []
    for key in sorted(set(configured) - set(DEFAULTS)):
        messages.append(
            Error(
                f"TASK_WORKFLOW has an unknown key {key!r}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="task_workflow.E002",
            )
        )
    for key, (is_valid, expected) in VALIDATORS.items():
        if key in configured and not is_valid(configured[key]):
            messages.append(
                Error(
                    f"TASK_WORKFLOW[{key!r}] = {configured[key]!r} is invalid: expected {expected}.",
                    id="task_workflow.E003",
                )
            )
    return messages


def _cache_kind(backend: str) -> str | None:
    """What ``backend`` (a ``CACHES[...]['BACKEND']`` path) is, of :data:`CACHE_KINDS`;
    ``None`` for any other cache, or one that does not import (Django reports that)."""
    try:
        cls = import_string(backend)
    except ImportError:
        cls = None
    for kind, path in CACHE_KINDS:
        if backend == path:
            return kind
        try:
            base = import_string(path)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    return None


def _setting(name: str, configured: dict[str, Any]) -> Any:
    """``configured[name]`` if it passes its validator, else the default (check_settings
    reports the bad value)."""
    value = configured.get(name, DEFAULTS[name])
    is_valid, _ = VALIDATORS[name]
    return value if is_valid(value) else DEFAULTS[name]


@register(Tags.caches)
def check_lock_cache(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The cache that holds throttle slots must be shared by every worker process and
    able to take a slot atomically."""
    configured = getattr(settings, "TASK_WORKFLOW", None) or {}
    if not isinstance(configured, dict):
        return []  # check_settings reports it
    alias = configured.get("CACHE", DEFAULTS["CACHE"])
    config: dict[str, Any] | None = settings.CACHES.get(alias) if isinstance(alias, str) else None
    if not isinstance(config, dict):
        return []  # check_settings reports it
    backend: str = str(config.get("BACKEND", ""))
    name = backend.rsplit(".", 1)[-1]
    options = config.get("OPTIONS")
    if not isinstance(options, dict):
        options = {}  # Django's own cache setup reports it
    kind = _cache_kind(backend)
    messages: list[CheckMessage] = []
    if kind == "dummy":
        messages.append(
            Error(
                f"Throttle slots live in cache {alias!r} ({name}), which stores nothing: every "
                "acquire succeeds, so there is no limit at all, in any process.",
                hint=USE_A_SHARED_CACHE,
                id="task_workflow.E007",
            )
        )
    if kind == "locmem":
        messages.append(
            Warning(
                f"Throttle slots live in cache {alias!r} ({name}), which is "
                "private to each process: throttle limits will not hold across workers.",
                hint="Point TASK_WORKFLOW['CACHE'] at a django-redis cache (or DatabaseCache).",
                id="task_workflow.W001",
            )
        )
    if kind == "file":
        messages.append(
            Error(
                f"Throttle slots live in cache {alias!r} ({name}), whose add() is not atomic (it "
                "checks for the file, then writes it): two workers can both take the same slot, so "
                "throttle limits do not hold.",
                hint=USE_A_SHARED_CACHE,
                id="task_workflow.E005",
            )
        )
    if kind == "database":
        messages.extend(_check_database_cache(alias))
    if kind in CULLING_KINDS:
        messages.extend(_check_max_entries(alias, options))
    if kind == "memcached":
        messages.extend(_check_memcached_ttl(alias, name, _setting("LOCK_TTL", configured)))
    if kind in ("django_redis", "redis"):
        messages.extend(
            _check_socket_timeout(alias, kind, options, _setting("THROTTLE_SOCKET_TIMEOUT", configured))
        )
    if kind == "django_redis":
        messages.extend(_check_sentinel(alias, config, options))
    messages.extend(_check_replicas(alias, kind, name, configured))
    if kind == "django_redis" and options.get("IGNORE_EXCEPTIONS"):
        messages.append(
            Warning(
                f"Cache {alias!r} has IGNORE_EXCEPTIONS=True, which hides 'Redis down' from "
                "code that uses the cache API.",
                hint="Use a separate cache alias without IGNORE_EXCEPTIONS for TASK_WORKFLOW['CACHE'].",
                id="task_workflow.W002",
            )
        )
    return messages


def _subclass_of(path: Any, base_path: str) -> bool:
    """``path`` (a dotted path, or a class) names ``base_path``'s class or a subclass."""
    try:
        cls = import_string(path) if isinstance(path, str) else path
        base = import_string(base_path)
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, base)


SENTINEL_CLIENT = "django_redis.client.SentinelClient"
SENTINEL_FACTORY = "django_redis.pool.SentinelConnectionFactory"
SENTINEL_POOL = "redis.sentinel.SentinelConnectionPool"
DEFAULT_FACTORY = "django_redis.pool.ConnectionFactory"
SENTINEL_HINT = (
    "Configure Sentinel as django-redis documents it: LOCATION 'redis://<service name>/<db>', "
    f"OPTIONS CLIENT_CLASS '{SENTINEL_CLIENT}', CONNECTION_FACTORY '{SENTINEL_FACTORY}' and "
    "SENTINELS [(host, port), ...] (see 'Redis high availability' in task_workflow's documentation)."
)


def _sentinel_pair(entry: Any) -> bool:
    """A ``(host, port)`` pair as redis-py's ``Sentinel`` takes it (django-redis passes
    ``SENTINELS`` on as they are): a non-empty host and a port in 1-65535 (an ``int``, or
    a string of digits, which the socket accepts too)."""
    if isinstance(entry, str | bytes) or not isinstance(entry, list | tuple) or len(entry) != 2:
        return False
    host, port = entry
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    return (
        isinstance(host, str)
        and bool(host)
        and isinstance(port, int)
        and not isinstance(port, bool)
        and (0 < port < 65536)
    )


def _first_location(config: dict[str, Any]) -> str:
    """The cache's first (primary) ``LOCATION`` URL: a string may list several, comma-separated."""
    location = config.get("LOCATION", "")
    if isinstance(location, list | tuple):
        location = location[0] if location else ""
    return str(location).split(",")[0].strip()


def _check_sentinel(alias: str, config: dict[str, Any], options: dict[str, Any]) -> list[CheckMessage]:
    """E010-E013: a django-redis Sentinel setup the throttle (and the cache) cannot use.

    django-redis builds connections through its ``CONNECTION_FACTORY`` (the option, else
    ``settings.DJANGO_REDIS_CONNECTION_FACTORY``); only ``SentinelConnectionFactory`` asks
    Sentinel, and only with ``SENTINELS`` it can pass to redis-py's ``Sentinel``. Without
    it ``SentinelClient`` raises ``ImproperlyConfigured`` at the cache's first use, and a
    plain client takes the service name in ``LOCATION`` for a host name."""
    from urllib.parse import parse_qs, urlparse

    factory = options.get("CONNECTION_FACTORY") or getattr(settings, "DJANGO_REDIS_CONNECTION_FACTORY", None)
    factory = factory or DEFAULT_FACTORY
    client_class = options.get("CLIENT_CLASS", "django_redis.client.DefaultClient")
    sentinel_client = _subclass_of(client_class, SENTINEL_CLIENT)
    sentinel_factory = _subclass_of(factory, SENTINEL_FACTORY)
    location = _first_location(config)
    try:
        url = urlparse(location)
        service = url.hostname or ""
    except ValueError:
        url, service = None, ""
    if not sentinel_factory:
        if not sentinel_client and "SENTINELS" not in options:
            return []
        effect = (
            "CLIENT_CLASS SentinelClient then raises ImproperlyConfigured at the cache's first use"
            if sentinel_client
            else f"django-redis then connects to {service or location!r} as if it were a Redis server's "
            "host name (the throttle fails with 'Name or service not known'), and SENTINELS is ignored"
        )
        return [
            Error(
                f"Cache {alias!r} is set up for Redis Sentinel (CLIENT_CLASS {client_class!r}"
                f"{', SENTINELS' if 'SENTINELS' in options else ''}) but its connection factory is "
                f"{factory!r}, which does not ask Sentinel: {effect}.",
                hint=f"Set OPTIONS['CONNECTION_FACTORY'] = '{SENTINEL_FACTORY}'. {SENTINEL_HINT}",
                id="task_workflow.E010",
            )
        ]
    messages: list[CheckMessage] = []
    sentinels = options.get("SENTINELS")
    if (
        not isinstance(sentinels, list | tuple)
        or not sentinels
        or not all(_sentinel_pair(entry) for entry in sentinels)
    ):
        messages.append(
            Error(
                f"Cache {alias!r} uses {factory!r}, whose OPTIONS['SENTINELS'] = {sentinels!r} is not a "
                "non-empty list of (host, port) pairs of the Sentinels: the cache fails at its first use "
                "(ImproperlyConfigured, or a ValueError for 'host:port' strings).",
                hint="Set OPTIONS['SENTINELS'] = [('sentinel-1.example', 26379), ...]. " + SENTINEL_HINT,
                id="task_workflow.E011",
            )
        )
    pool_class = options.get("CONNECTION_POOL_CLASS")
    if pool_class is not None and not _subclass_of(pool_class, SENTINEL_POOL):
        messages.append(
            Error(
                f"Cache {alias!r} uses {factory!r} with OPTIONS['CONNECTION_POOL_CLASS'] = {pool_class!r}, "
                "which is not a redis.sentinel.SentinelConnectionPool: its connections would not ask "
                "Sentinel for the primary (django-redis refuses it at the cache's first use).",
                hint=f"Remove CONNECTION_POOL_CLASS (the factory defaults to {SENTINEL_POOL}) or name a "
                "subclass of it.",
                id="task_workflow.E012",
            )
        )
    if not sentinel_client and url is not None:
        is_master = parse_qs(url.query).get("is_master", ["1"])[0].strip().lower()
        if is_master in ("0", "false", "f", "n", "no", "off"):
            messages.append(
                Error(
                    f"Cache {alias!r} is the throttle's lock cache, and its LOCATION {location!r} asks "
                    "Sentinel for a replica (is_master=0): replicas refuse writes, so every throttle "
                    "call fails (READONLY) and the throttled code never runs.",
                    hint="Drop is_master=0 from the lock cache's LOCATION (or use CLIENT_CLASS "
                    f"'{SENTINEL_CLIENT}', which writes to the primary and reads from replicas).",
                    id="task_workflow.E013",
                )
            )
    return messages


def _check_replicas(
    alias: str, kind: str | None, name: str, configured: dict[str, Any]
) -> list[CheckMessage]:
    """E014/E015: the durable mode (``THROTTLE_REPLICAS`` > 0) needs Redis, and a ``WAIT``
    that ends before the throttle's socket timeout."""
    replicas = _setting("THROTTLE_REPLICAS", configured)
    if not replicas:
        return []
    if kind not in ("django_redis", "redis"):
        return [
            Error(
                f"TASK_WORKFLOW['THROTTLE_REPLICAS'] = {replicas} asks for grants acknowledged by Redis "
                f"replicas, but the lock cache {alias!r} ({name}) is not Redis: no replica acknowledges "
                "anything there, so the durable mode would promise what it cannot do.",
                hint="Point TASK_WORKFLOW['CACHE'] at a django-redis cache of a replicated Redis, or set "
                "THROTTLE_REPLICAS to 0.",
                id="task_workflow.E015",
            )
        ]
    timeout = _setting("THROTTLE_REPLICAS_TIMEOUT", configured)
    socket_timeout = _setting("THROTTLE_SOCKET_TIMEOUT", configured)
    if timeout < socket_timeout:
        return []
    return [
        Error(
            f"TASK_WORKFLOW['THROTTLE_REPLICAS_TIMEOUT'] = {timeout!r} is not below "
            f"THROTTLE_SOCKET_TIMEOUT = {socket_timeout!r}: a WAIT for the replicas runs on the throttle's "
            "own connection, so its socket would time out first and every slow acknowledgement would "
            "show as a broken connection instead of 'not acknowledged'.",
            hint="Keep THROTTLE_REPLICAS_TIMEOUT well below THROTTLE_SOCKET_TIMEOUT (defaults 0.5 and 5).",
            id="task_workflow.E014",
        )
    ]


#: Seconds each question of :func:`check_lock_cache_server` to Redis (or Sentinel) may take.
PROBE_TIMEOUT = 1.0


@register(Tags.caches)
def check_lock_cache_server(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Asks the lock cache's Redis (its primary, through Sentinel where configured) what
    the throttle will need from it, with the throttle's own connection settings and
    socket timeouts of at most :data:`PROBE_TIMEOUT`, no retries:

    - E016: its user may not run ``INFO`` (an ACL such as ``+@all -@dangerous``) while the
      restart grace is > 0: the scripts read ``INFO server`` when a group's counter is
      missing, and refuse to write without it, so every first acquire of a group fails;
    - W008: ``THROTTLE_REPLICAS`` > 0 and fewer replicas are connected to it now, so every
      grant fails closed until enough are;
    - W007: it could not be asked (unreachable, refused the connection, ...): nothing is
      known, and the throttle fails closed while it stays so.

    Runs only for a django-redis or Django Redis lock cache whose settings the other
    checks accept, and only when there is something to ask (a restart grace > 0, or
    ``THROTTLE_REPLICAS`` > 0)."""
    configured = getattr(settings, "TASK_WORKFLOW", None) or {}
    if not isinstance(configured, dict):
        return []
    alias = configured.get("CACHE", DEFAULTS["CACHE"])
    config = settings.CACHES.get(alias) if isinstance(alias, str) else None
    if not isinstance(config, dict):
        return []
    kind = _cache_kind(str(config.get("BACKEND", "")))
    options = config.get("OPTIONS")
    options = options if isinstance(options, dict) else {}
    if kind not in ("django_redis", "redis") or (
        kind == "django_redis" and _check_sentinel(alias, config, options)
    ):
        return []
    grace = _setting("THROTTLE_RESTART_GRACE", configured)
    grace = _setting("LOCK_TTL", configured) if grace is None else grace
    replicas = _setting("THROTTLE_REPLICAS", configured)
    if grace <= 0 and not replicas:
        return []
    try:
        info = _probe_info(
            alias, min(PROBE_TIMEOUT, _setting("THROTTLE_SOCKET_TIMEOUT", configured)), replicas
        )
    except _InfoRefused as refused:
        if grace <= 0:
            return []  # nothing needs INFO; its replicas cannot be counted without it
        return [
            Error(
                f"The Redis user of cache {alias!r} may not run INFO ({refused}), which the throttle's "
                f"scripts need while TASK_WORKFLOW['THROTTLE_RESTART_GRACE'] is {grace:g}s: they read "
                "INFO server to tell a restarted server from a group's first use, and without it write "
                "nothing and fail, so each group's first acquire fails (the task is re-queued, the "
                "throttled code never runs).",
                hint="Grant the permission +info to that user (ACL SETUSER <user> +info; the common "
                "profile +@all -@dangerous leaves it out), or set THROTTLE_RESTART_GRACE to 0, only "
                "with persistence that keeps every write (appendonly yes, appendfsync always), so a "
                "restarted server still knows its leases.",
                id="task_workflow.E016",
            )
        ]
    except Exception as exc:  # unreachable, bad credentials, Sentinel down, ...: never crash checks
        return [
            Warning(
                f"Could not ask the Redis of cache {alias!r} what the throttle needs from it "
                f"({type(exc).__name__}: {exc}); the throttle fails closed while it cannot reach it.",
                hint="Check that the lock cache's Redis (and its Sentinels) run and that LOCATION and "
                "OPTIONS are right, then run `manage.py check` again.",
                id="task_workflow.W007",
            )
        ]
    connected = int(info.get("connected_slaves", 0))
    if replicas and connected < replicas:
        return [
            Warning(
                f"TASK_WORKFLOW['THROTTLE_REPLICAS'] = {replicas}, but the Redis of cache {alias!r} has "
                f"{connected} replica(s) connected now: no grant can be acknowledged by {replicas}, so "
                "every throttled task is re-queued until enough replicas are back.",
                hint="Connect more replicas to the primary, or lower THROTTLE_REPLICAS (durable mode, "
                "'Redis high availability' in task_workflow's documentation).",
                id="task_workflow.W008",
            )
        ]
    return []


class _InfoRefused(Exception):
    """The server refused ``INFO`` to the lock cache's user (the server's reply)."""


def _probe_info(alias: str, timeout: float, replicas: int) -> dict[str, Any]:
    """``INFO server`` (and ``INFO replication`` when ``replicas``) of the lock cache's
    Redis, asked on a client like the throttle's own; raises :class:`_InfoRefused` when
    the user may not run it."""
    from django.core.cache import caches
    from redis.backoff import NoBackoff
    from redis.exceptions import NoPermissionError
    from redis.retry import Retry
    from redis.sentinel import Sentinel, SentinelConnectionPool

    from .throttle.factory import cache_redis_client, throttle_client

    cache_client = cache_redis_client(caches[alias])
    if cache_client is None:
        return {}
    client = throttle_client(cache_client, timeout)
    own = client is not cache_client
    if own:
        client.set_retry(Retry(NoBackoff(), 0))  # one try: a check must answer quickly
    try:
        info: dict[str, Any] = dict(client.info("server"))
        if replicas:
            info.update(client.info("replication"))
        return info
    except NoPermissionError as exc:
        raise _InfoRefused(str(exc)) from exc
    finally:
        if own:
            pool = client.connection_pool
            pool.disconnect()
            if isinstance(pool, SentinelConnectionPool) and isinstance(pool.sentinel_manager, Sentinel):
                # Each Sentinel's client (Sentinel.close() is missing from redis-py 6.4).
                for sentinel_client in pool.sentinel_manager.sentinels:
                    sentinel_client.close()


def _check_database_cache(alias: str) -> list[CheckMessage]:
    """E006 when the throttle's own DatabaseCache backend cannot lock the cache's database:
    there the generic backend would use Django's ``DatabaseCache.add``, which over an
    expired row reads, then updates (two workers can both win)."""
    from django.core.cache import caches
    from django.db import connections, router

    from .throttle import DatabaseCacheThrottleBackend

    try:
        cache = caches[alias]
        if DatabaseCacheThrottleBackend.supports(cache):
            return []
        database = router.db_for_write(cache.cache_model_class)  # type: ignore[attr-defined]
        vendor = connections[database].vendor
    except Exception as exc:  # an unreachable database, a bad router, ...: never crash checks
        return [
            Warning(
                f"Could not tell whether cache {alias!r} can hold throttle slots safely: "
                f"{type(exc).__name__}: {exc}",
                hint="Check the cache's database (its alias, router and server), then run "
                "`manage.py check` again.",
                id="task_workflow.W005",
            )
        ]
    return [
        Error(
            f"Throttle slots live in cache {alias!r}, a DatabaseCache on database {database!r} "
            f"({vendor}), where the throttle cannot lock its rows and Django's DatabaseCache.add() "
            "is not atomic (over an expired entry it reads, then updates): two workers can both "
            "take the same slot, so throttle limits do not hold.",
            hint="Put the lock cache's table on PostgreSQL or SQLite, or point TASK_WORKFLOW['CACHE'] "
            "at a django-redis cache.",
            id="task_workflow.E006",
        )
    ]


def _check_max_entries(alias: str, options: dict[str, Any]) -> list[CheckMessage]:
    """E008 for a ``MAX_ENTRIES`` Django cannot read as an integer (it then culls at its
    default of 300, or fails), W003 for one that culls live slots."""
    raw = options.get("MAX_ENTRIES", 300)
    hint = "Set OPTIONS={'MAX_ENTRIES': 1_000_000} (or more) on the lock cache."
    try:
        max_entries = int(raw)
    except (TypeError, ValueError, OverflowError):
        return [
            Error(
                f"Cache {alias!r} has OPTIONS['MAX_ENTRIES'] = {raw!r}, which Django cannot read as "
                "an integer: it then culls at its default of 300 entries (or fails to create the "
                "cache), which would drop live throttle slots.",
                hint=hint,
                id="task_workflow.E008",
            )
        ]
    if max_entries >= MIN_MAX_ENTRIES:
        return []
    return [
        Warning(
            f"Cache {alias!r} culls entries past OPTIONS['MAX_ENTRIES'] (default 300), which "
            "would drop live throttle slots.",
            hint=hint,
            id="task_workflow.W003",
        )
    ]


def _check_memcached_ttl(alias: str, name: str, ttl: float) -> list[CheckMessage]:
    """E004 for a ``LOCK_TTL`` Memcached cannot store: Django sends it ``int(ttl)``
    seconds, and ``int(ttl) == 0`` as "expire at once"."""
    if ttl >= 1 and float(ttl).is_integer():
        return []
    effect = (
        "at once, so there is no limit"
        if ttl < 1
        else f"after {int(ttl)}s while their holders count on {ttl:g}s"
    )
    return [
        Error(
            f"TASK_WORKFLOW['LOCK_TTL'] = {ttl!r} cannot be stored by cache {alias!r} ({name}): "
            "Memcached keeps whole seconds (Django sends int(LOCK_TTL), and 0 as 'expire at once'), "
            f"so leases would end {effect}.",
            hint="Set TASK_WORKFLOW['LOCK_TTL'] to a whole number of seconds >= 1, and pass whole "
            "seconds to throttle(ttl=...). Memcached's clock ticks once a second, so an entry can "
            "also expire up to 1 s early: below 50 s that is more than the 2 % margin of lease.lost.",
            id="task_workflow.E004",
        )
    ]


def _check_socket_timeout(
    alias: str, kind: str, options: dict[str, Any], throttle_timeout: float
) -> list[CheckMessage]:
    """W004 for a Redis socket timeout of 1 s or less: the throttle's own connections take
    the shorter of it and ``THROTTLE_SOCKET_TIMEOUT``, and cap each ``BLPOP`` at half that."""
    if kind == "django_redis":
        pool_kwargs = options.get("CONNECTION_POOL_KWARGS")
        if isinstance(pool_kwargs, dict) and "socket_timeout" in pool_kwargs:
            # django-redis passes these to the pool after (over) SOCKET_TIMEOUT.
            option, timeout = "['CONNECTION_POOL_KWARGS']['socket_timeout']", pool_kwargs["socket_timeout"]
        else:
            # django-redis ignores a SOCKET_TIMEOUT of 0 (no timeout).
            option, timeout = "['SOCKET_TIMEOUT']", options.get("SOCKET_TIMEOUT") or None
    else:
        option, timeout = "['socket_timeout']", options.get("socket_timeout")
    if not _number(timeout, minimum=0) or not 0 < timeout <= SHORT_SOCKET_TIMEOUT:
        return []
    effective = min(float(timeout), float(throttle_timeout))
    return [
        Warning(
            f"Cache {alias!r} has a socket timeout of {timeout!r}s: the throttle's own Redis "
            f"connections then time out after {effective:g}s, so any throttle call that takes longer "
            "fails (the task is re-queued; a renewal counts as missed), and each blocking wait "
            f"(BLPOP) is capped at half of it: waiters poll Redis every {effective / 2:g}s instead of "
            "blocking for up to 1 s.",
            hint=f"Set OPTIONS{option} of the lock cache to at least 2 (seconds; e.g. 5): "
            "TASK_WORKFLOW['THROTTLE_SOCKET_TIMEOUT'] already bounds each throttle call.",
            id="task_workflow.W004",
        )
    ]


#: Tag of the checks of the project's Celery app (``manage.py check --tag celery``).
CELERY_TAG = "celery"


@register(CELERY_TAG)
def check_celery_db_reuse(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """W006 when the project's Celery app would close database connections around every
    task: Celery's Django fixup (``celery.fixups.django.DjangoWorkerFixup``) closes every
    connection on ``task_prerun`` and ``task_postrun`` unless its ``db_reuse_max``, read as
    ``app.conf.get("CELERY_DB_REUSE_MAX")``, is truthy. It calls ``connection.close()``,
    which ignores ``CONN_MAX_AGE``, and under prefork ``close_pool()`` too."""
    from celery.fixups.django import DjangoFixup

    from .celery_hooks import app_fixups, project_celery_app

    app = project_celery_app()
    if app is None or not any(isinstance(fixup, DjangoFixup) for fixup in app_fixups(app)):
        return []  # no app, or one without Celery's Django fixup: nothing closes connections
    try:
        reuse_max = app.conf.get("CELERY_DB_REUSE_MAX")
        eager = app.conf.task_always_eager
    except Exception:  # a configuration Celery cannot read: the worker reports it itself
        return []
    if reuse_max or eager:
        return []
    return [
        Warning(
            f"Celery app {app.main or '__main__'!r} closes every database connection before and "
            "after each task: each task opens a new database session. Celery's Django fixup does "
            "this unless CELERY_DB_REUSE_MAX is set, whatever CONN_MAX_AGE says, and under the "
            "prefork pool it also closes Django's connection pool (DATABASES OPTIONS 'pool').",
            hint="Set CELERY_DB_REUSE_MAX = 1000 in Django settings (read by "
            "app.config_from_object('django.conf:settings', namespace='CELERY')) or in app.conf: each "
            "worker process then keeps its connection for 1000 tasks. Celery never calls Django's "
            "close_old_connections(), so connect it to task_prerun and task_postrun too, with "
            "CONN_HEALTH_CHECKS = True and CONN_MAX_AGE > 0 (0 closes the connection at every task "
            "again; with Django's pool, keep 0: it goes back to the pool): a connection the server "
            "dropped is then replaced instead of failing a task. See 'Production settings' in "
            "task_workflow's documentation.",
            id="task_workflow.W006",
        )
    ]


@register(Tags.admin)
def check_fsm_admin_templates(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E009 for each ModelAdmin registered on the default admin site (``admin.site``) that
    renders django-fsm's admin templates (``StateMixinAdmin``, any ``FSMAdminMixin``) when
    the template engines cannot find them: its change page would raise
    ``TemplateDoesNotExist``. The templates ship in the ``django_fsm`` app, so they are
    missing when it is not in ``INSTALLED_APPS`` (copies in a template directory count).
    Other ``AdminSite`` instances are not inspected: Django has no public list of them."""
    from django.apps import apps

    if not apps.is_installed("django.contrib.admin"):
        return []
    from django.contrib import admin
    from django.template import TemplateDoesNotExist
    from django.template.loader import get_template
    from django_fsm.admin import FSMAdminMixin

    messages: list[CheckMessage] = []
    missing: dict[str, bool] = {}  # template name -> missing, looked up once
    for model in apps.get_models():
        if not admin.site.is_registered(model):
            continue
        model_admin = admin.site.get_model_admin(model)
        if not isinstance(model_admin, FSMAdminMixin):
            continue
        names = [
            name
            for name in (model_admin.change_form_template, model_admin.fsm_transition_form_template)
            if isinstance(name, str)
        ]
        for name in names:
            if name not in missing:
                try:
                    get_template(name)
                    missing[name] = False
                except TemplateDoesNotExist:
                    missing[name] = True
                except Exception:  # a template that does not compile: Django reports that
                    missing[name] = False
        absent = [name for name in names if missing[name]]
        if absent:
            messages.append(
                Error(
                    f"The admin of {model._meta.label} ({type(model_admin).__qualname__}) renders "
                    f"django-fsm's template {absent[0]!r}, which no template engine finds: its "
                    "change page would fail with TemplateDoesNotExist.",
                    hint="Add 'django_fsm' to INSTALLED_APPS (it ships the templates of the admin's "
                    "transition buttons), with APP_DIRS=True in TEMPLATES.",
                    obj=model_admin,
                    id="task_workflow.E009",
                )
            )
    return messages
