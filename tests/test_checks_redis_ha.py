"""System checks of a Redis lock cache for high availability (issue #21): Sentinel set-ups
the throttle cannot use (E010-E013), the durable mode's settings (E003, E014, E015), and
what the checks ask the server itself (E016 INFO refused by an ACL, W007 unreachable,
W008 too few replicas).

Each message is tested against a real setting, and where the setting breaks something
at run time, that breakage is shown too (the cache or the throttle failing as the
message says), on Redis servers and a Sentinel topology the tests start.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.core.cache import caches
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

import task_workflow.throttle as throttle_module
from task_workflow.checks import check_lock_cache, check_lock_cache_server, check_settings
from task_workflow.tasks import throttle
from task_workflow.throttle import ThrottleUnavailable
from tests.redis_topology import SentinelTopology
from tests.workers import free_port

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

SENTINEL_CLIENT = "django_redis.client.SentinelClient"
SENTINEL_FACTORY = "django_redis.pool.SentinelConnectionFactory"
LOCAL_CACHE = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}


def lock_cache_settings(config: dict[str, Any], **throttle_settings: Any) -> dict[str, Any]:
    """Settings whose lock cache (alias ``locks``) is ``config``."""
    return {
        "CACHES": {"default": LOCAL_CACHE, "locks": config},
        "TASK_WORKFLOW": {"CACHE": "locks", **throttle_settings},
    }


@contextlib.contextmanager
def lock_cache(config: dict[str, Any], **throttle_settings: Any) -> Iterator[None]:
    """``override_settings`` with ``config`` as the lock cache (alias ``locks``), which is
    forgotten before the settings are restored: django-redis 5.4 (the floor) builds its
    client in ``close()``, which raises for the set-ups these tests break on purpose, and
    Django's handler of the settings change would then stop before it forgets the caches,
    leaving this one to the next tests."""
    with override_settings(**lock_cache_settings(config, **throttle_settings)):
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError):  # never used: nothing to forget
                del caches["locks"]


def messages(config: dict[str, Any], **throttle_settings: Any) -> list[CheckMessage]:
    """Every task_workflow cache and settings check's messages for that lock cache."""
    with lock_cache(config, **throttle_settings):
        return check_settings() + check_lock_cache() + check_lock_cache_server()


def ids(found: list[CheckMessage]) -> list[str]:
    return [message.id for message in found if message.id is not None]


def sentinel_cache(service: str, sentinels: Any, location_query: str = "", **options: Any) -> dict[str, Any]:
    """A django-redis cache of ``service`` with ``options``; ``sentinels`` its SENTINELS
    (left out when ``None``)."""
    config_options = dict(options)
    if sentinels is not None:
        config_options["SENTINELS"] = sentinels
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://{service}/0{location_query}",
        "OPTIONS": config_options,
    }


def unique_service() -> str:
    """A service name no earlier test used: django-redis keeps one pool per LOCATION per
    process, which would hide a broken set-up behind a working one's pool."""
    return f"tw-check-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def fresh_backends() -> Iterator[None]:
    throttle_module._backends.clear()
    yield
    throttle_module._backends.clear()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """One primary, two replicas, three Sentinels for the module."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    topology = SentinelTopology(tmp_path_factory.mktemp("checks") / "t", service=f"twc{uuid.uuid4().hex[:8]}")
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


# --- Sentinel set-ups (no server needed to see them fail) -------------------------------------


def test_sentinel_client_without_the_sentinel_factory_is_e010_and_the_cache_fails() -> None:
    config = sentinel_cache(unique_service(), [("127.0.0.1", 26379)], CLIENT_CLASS=SENTINEL_CLIENT)
    [message] = messages(config)
    assert (type(message), message.id) == (Error, "task_workflow.E010")
    assert "ImproperlyConfigured" in message.msg
    assert SENTINEL_FACTORY in str(message.hint)
    with lock_cache(config), pytest.raises(ImproperlyConfigured):
        caches["locks"].set("key", 1)


def test_sentinels_without_the_sentinel_factory_is_e010_the_service_name_taken_for_a_host() -> None:
    """The issue's "Name or service not known": a plain client connects to the service."""
    service = f"{unique_service()}.invalid"
    config = sentinel_cache(service, [("127.0.0.1", 26379)])
    [message] = messages(config)
    assert message.id == "task_workflow.E010"
    assert repr(service) in message.msg
    assert "host name" in message.msg
    with lock_cache(config):
        with pytest.raises(redis.exceptions.ConnectionError):
            caches["locks"].set("key", 1)
        with pytest.raises(ThrottleUnavailable):
            throttle(name="tests.checks.sentinel", wait=0).acquire()


@pytest.mark.parametrize(
    ("sentinels", "failure"),
    [
        (None, ImproperlyConfigured),
        ([], ImproperlyConfigured),
        (["127.0.0.1:26379"], ValueError),
        ([("127.0.0.1",)], ValueError),
    ],
    ids=["missing", "empty", "host-port-strings", "no-port"],
)
def test_sentinels_that_are_not_host_port_pairs_are_e011_and_the_cache_fails(
    sentinels: Any, failure: type[Exception]
) -> None:
    config = sentinel_cache(
        unique_service(), sentinels, CLIENT_CLASS=SENTINEL_CLIENT, CONNECTION_FACTORY=SENTINEL_FACTORY
    )
    [message] = messages(config)
    assert (type(message), message.id) == (Error, "task_workflow.E011")
    assert "(host, port)" in message.msg
    with lock_cache(config), pytest.raises(failure):
        caches["locks"].set("key", 1)


def test_a_pool_class_that_does_not_ask_sentinel_is_e012_and_the_cache_fails() -> None:
    config = sentinel_cache(
        unique_service(),
        [("127.0.0.1", 26379)],
        CLIENT_CLASS=SENTINEL_CLIENT,
        CONNECTION_FACTORY=SENTINEL_FACTORY,
        CONNECTION_POOL_CLASS="redis.connection.ConnectionPool",
    )
    [message] = messages(config)
    assert message.id == "task_workflow.E012"
    with lock_cache(config), pytest.raises(ImproperlyConfigured):
        caches["locks"].set("key", 1)


def test_pairs_as_lists_and_digit_ports_are_accepted() -> None:
    """django-redis passes SENTINELS to redis-py as they are; a list pair and a port
    string of digits both connect, so no E011."""
    sentinels = [("127.0.0.1", 26379), ["10.0.0.2", "26379"]]
    config = sentinel_cache(
        unique_service(), sentinels, CLIENT_CLASS=SENTINEL_CLIENT, CONNECTION_FACTORY=SENTINEL_FACTORY
    )
    with lock_cache(config, THROTTLE_SOCKET_TIMEOUT=0.2):
        assert check_settings() + check_lock_cache() == []


# --- Sentinel set-ups on a real topology -------------------------------------------------------


@needs_redis_server
def test_the_documented_sentinel_setup_passes_every_check_and_grants(topology: SentinelTopology) -> None:
    config = topology.django_cache()
    assert messages(config, THROTTLE_RESTART_GRACE=5) == []
    name = f"tests.checks.{uuid.uuid4().hex[:8]}"
    with (
        lock_cache(config, THROTTLE_RESTART_GRACE=0),
        throttle(name=name) as lease,
    ):
        assert lease.fencing_token > 0


@needs_redis_server
def test_the_sentinel_factory_with_the_default_client_passes(topology: SentinelTopology) -> None:
    """django-redis's DefaultClient with the Sentinel factory writes to the primary."""
    config = topology.django_cache()
    del config["OPTIONS"]["CLIENT_CLASS"]
    assert messages(config, THROTTLE_RESTART_GRACE=5) == []


@needs_redis_server
def test_a_replica_pool_as_the_lock_cache_is_e013_and_every_throttle_call_fails(
    topology: SentinelTopology,
) -> None:
    config = topology.django_cache()
    del config["OPTIONS"]["CLIENT_CLASS"]
    config["LOCATION"] += "?is_master=0"
    [message] = messages(config)
    assert (type(message), message.id) == (Error, "task_workflow.E013")
    assert "READONLY" in message.msg
    # What the check predicts is the throttle's failure. (The cache's own writes fail too
    # on django-redis 7; django-redis 5.4 marks its pool a replica's after building it,
    # too late for redis-py to connect to one, so they go to the primary there.)
    with (
        lock_cache(config, THROTTLE_RESTART_GRACE=0),
        pytest.raises(ThrottleUnavailable, match="read only replica"),
    ):
        throttle(name=f"tests.checks.{uuid.uuid4().hex[:8]}", wait=0).acquire()


@needs_redis_server
def test_the_sentinel_client_writes_to_the_primary_whatever_its_location_says(
    topology: SentinelTopology,
) -> None:
    """SentinelClient sets is_master itself (primary for writes): no E013."""
    config = topology.django_cache()
    config["LOCATION"] += "?is_master=0"
    assert "task_workflow.E013" not in ids(messages(config))


# --- The durable mode's settings ---------------------------------------------------------------


REDIS_LOCK_CACHE = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:6379/1"}


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("THROTTLE_REPLICAS", 0, True),
        ("THROTTLE_REPLICAS", 2, True),
        ("THROTTLE_REPLICAS", -1, False),
        ("THROTTLE_REPLICAS", 1.0, False),
        ("THROTTLE_REPLICAS", True, False),
        ("THROTTLE_REPLICAS", "1", False),
        ("THROTTLE_REPLICAS_TIMEOUT", 0.25, True),
        ("THROTTLE_REPLICAS_TIMEOUT", 1, True),
        ("THROTTLE_REPLICAS_TIMEOUT", 0, False),
        ("THROTTLE_REPLICAS_TIMEOUT", float("inf"), False),
        ("THROTTLE_REPLICAS_TIMEOUT", None, False),
    ],
)
def test_the_durable_mode_settings_are_checked(key: str, value: Any, valid: bool) -> None:
    with override_settings(TASK_WORKFLOW={key: value}):
        found = ids(check_settings())
    assert found == ([] if valid else ["task_workflow.E003"])


@pytest.mark.parametrize("replicas_timeout", [5.0, 8.0])
def test_a_replicas_timeout_not_below_the_socket_timeout_is_e014(replicas_timeout: float) -> None:
    with override_settings(
        **lock_cache_settings(
            REDIS_LOCK_CACHE,
            THROTTLE_REPLICAS=1,
            THROTTLE_REPLICAS_TIMEOUT=replicas_timeout,
            THROTTLE_SOCKET_TIMEOUT=5.0,
        )
    ):
        found = check_lock_cache()
    assert ids(found) == ["task_workflow.E014"]
    assert "socket" in found[0].msg


def test_a_replicas_timeout_below_the_socket_timeout_passes() -> None:
    with override_settings(
        **lock_cache_settings(REDIS_LOCK_CACHE, THROTTLE_REPLICAS=1, THROTTLE_REPLICAS_TIMEOUT=0.5)
    ):
        assert check_lock_cache() == []


@pytest.mark.parametrize(
    "backend",
    [
        "django.core.cache.backends.db.DatabaseCache",
        "django.core.cache.backends.memcached.PyMemcacheCache",
        "django.core.cache.backends.locmem.LocMemCache",
    ],
)
def test_replicas_on_a_lock_cache_that_is_not_redis_is_e015(backend: str) -> None:
    config = {"BACKEND": backend, "LOCATION": "tw_checks_unused", "OPTIONS": {"MAX_ENTRIES": 1_000_000}}
    with lock_cache(config, THROTTLE_REPLICAS=1):
        found = check_lock_cache()
    assert "task_workflow.E015" in ids(found)


@needs_redis_server
def test_more_replicas_asked_than_connected_is_w008_and_grants_fail_closed(
    topology: SentinelTopology,
) -> None:
    config = topology.django_cache()
    enough = messages(config, THROTTLE_REPLICAS=2, THROTTLE_RESTART_GRACE=0)
    assert enough == []
    [message] = messages(config, THROTTLE_REPLICAS=3, THROTTLE_RESTART_GRACE=0)
    assert (type(message), message.id) == (Warning, "task_workflow.W008")
    assert "2 replica(s) connected" in message.msg
    settings = lock_cache_settings(
        config, THROTTLE_REPLICAS=3, THROTTLE_REPLICAS_TIMEOUT=0.1, THROTTLE_RESTART_GRACE=0
    )
    with override_settings(**settings), pytest.raises(ThrottleUnavailable, match="acknowledged"):
        # A short lease: the give-back its replicas do not acknowledge either is retried
        # in the background until the lease would have ended.
        throttle(name=f"tests.checks.{uuid.uuid4().hex[:8]}", wait=0, ttl=1).acquire()


# --- INFO refused by an ACL; an unreachable server ---------------------------------------------

ACL_PASSWORD = "tw-check-pw"


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """A Redis server of the module's own (no replicas, no Sentinel) with a user
    ``throttle`` of the common profile ``+@all -@dangerous`` (which leaves INFO out)."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = SentinelTopology(
        tmp_path_factory.mktemp("acl") / "t",
        replicas=0,
        sentinels=0,
        redis_config=[f"user throttle on >{ACL_PASSWORD} ~* &* +@all -@dangerous"],
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def acl_cache(server: SentinelTopology) -> dict[str, Any]:
    host, port = server.primary.address
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://throttle:{ACL_PASSWORD}@{host}:{port}/0",
    }


def test_info_refused_by_the_acl_with_a_restart_grace_is_e016_and_acquires_fail(
    acl_server: SentinelTopology,
) -> None:
    config = acl_cache(acl_server)
    [message] = messages(config, THROTTLE_RESTART_GRACE=5)
    assert (type(message), message.id) == (Error, "task_workflow.E016")
    assert "INFO" in message.msg
    assert "+info" in str(message.hint)
    assert "THROTTLE_RESTART_GRACE" in str(message.hint)
    settings = lock_cache_settings(config, THROTTLE_RESTART_GRACE=5)
    with override_settings(**settings), pytest.raises(ThrottleUnavailable, match=r"\+info"):
        throttle(name=f"tests.checks.{uuid.uuid4().hex[:8]}", wait=0).acquire()


def test_info_refused_without_a_restart_grace_passes_and_grants(acl_server: SentinelTopology) -> None:
    config = acl_cache(acl_server)
    assert messages(config, THROTTLE_RESTART_GRACE=0) == []
    name = f"tests.checks.{uuid.uuid4().hex[:8]}"
    with (
        lock_cache(config, THROTTLE_RESTART_GRACE=0),
        throttle(name=name) as lease,
    ):
        assert lease.fencing_token > 0


def test_a_user_allowed_info_passes(acl_server: SentinelTopology) -> None:
    client = acl_server.primary.client()
    client.acl_setuser("throttle", enabled=True, commands=["+info"])
    try:
        assert messages(acl_cache(acl_server), THROTTLE_RESTART_GRACE=5) == []
    finally:
        client.acl_setuser("throttle", enabled=True, commands=["-info"])


def test_an_unreachable_lock_cache_is_a_warning_given_quickly() -> None:
    port = free_port()  # nothing listens there
    config = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": f"redis://127.0.0.1:{port}/0"}
    started = time.monotonic()
    [message] = messages(config)
    assert time.monotonic() - started < 3
    assert (type(message), message.id) == (Warning, "task_workflow.W007")
    assert "ConnectionError" in message.msg


def test_unreachable_sentinels_are_a_warning_given_quickly() -> None:
    config = sentinel_cache(
        unique_service(),
        [("127.0.0.1", free_port()), ("127.0.0.1", free_port())],
        CLIENT_CLASS=SENTINEL_CLIENT,
        CONNECTION_FACTORY=SENTINEL_FACTORY,
    )
    started = time.monotonic()
    [message] = messages(config)
    assert time.monotonic() - started < 5
    assert message.id == "task_workflow.W007"


def test_the_server_check_asks_nothing_when_nothing_needs_asking() -> None:
    """No restart grace and no durable mode: nothing to ask, so no warning even when the
    server is down (and no connection attempt)."""
    config = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    with lock_cache(config, THROTTLE_RESTART_GRACE=0):
        assert check_lock_cache_server() == []
