"""System checks of the TASK_WORKFLOW settings, and the heavy-task router."""

from __future__ import annotations

import warnings

import pytest
from celery import Celery, Task, shared_task
from celery import _state as celery_state
from celery.exceptions import CDeprecationWarning
from celery.fixups.django import DjangoFixup
from django.conf import settings
from django.core.cache import caches
from django.core.checks import Error, Tags, Warning, run_checks
from django.db import OperationalError, connections
from django.test import override_settings

from example_project.celery import app as example_app
from task_workflow import celery_hooks
from task_workflow.checks import check_lock_cache, check_settings
from task_workflow.routing import install_heavy_task_router, install_on_all_apps, route_heavy_tasks
from task_workflow.running import running_task
from task_workflow.throttle import DatabaseCacheThrottleBackend

DATABASE_CACHE = {
    "BACKEND": "django.core.cache.backends.db.DatabaseCache",
    "LOCATION": "tw_checks_unused",
    "OPTIONS": {"MAX_ENTRIES": 1_000_000},
}
REDIS_CACHE = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:6379/15"}


INF, NAN = float("inf"), float("nan")
#: The settings that are seconds (all must be finite).
SECONDS_KEYS = [
    "LOCK_TTL",
    "THROTTLE_WAIT",
    "THROTTLE_RETRY_BACKOFF",
    "THROTTLE_RETRY_BACKOFF_MAX",
    "THROTTLE_SOCKET_TIMEOUT",
    "THROTTLE_RESTART_GRACE",
]


def task_workflow_messages(**overrides):
    """Messages of both task_workflow checks under the given settings."""
    with override_settings(**overrides):
        return check_settings() + check_lock_cache()


def with_lock_cache(config):
    """Settings with a 'locks' cache alias used for throttle slots."""
    return {
        "CACHES": {"default": DATABASE_CACHE, "locks": config},
        "TASK_WORKFLOW": {"CACHE": "locks"},
    }


# --- Checks: the lock cache --------------------------------------------------------------


@pytest.mark.parametrize("max_entries", [None, 300, 99_999])
def test_culling_database_cache_warns(max_entries):
    """A DatabaseCache lock cache that culls at MAX_ENTRIES could drop live slots: W003."""
    culling = {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "tw_checks_unused"}
    if max_entries is not None:
        culling["OPTIONS"] = {"MAX_ENTRIES": max_entries}
    [message] = task_workflow_messages(**with_lock_cache(culling))
    assert message.id == "task_workflow.W003"
    assert "MAX_ENTRIES" in message.msg


def test_per_process_cache_for_slots_is_a_warning():
    backend = "django.core.cache.backends.locmem.LocMemCache"
    messages = task_workflow_messages(**with_lock_cache({"BACKEND": backend}))

    assert [(type(m), m.id) for m in messages] == [(Warning, "task_workflow.W001")]
    assert "'locks'" in messages[0].msg
    assert "LocMemCache" in messages[0].msg


def test_dummy_cache_for_slots_is_an_error():
    """DummyCache stores nothing: every acquire succeeds, so no limit holds at all."""
    messages = task_workflow_messages(
        **with_lock_cache({"BACKEND": "django.core.cache.backends.dummy.DummyCache"})
    )

    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E007")]
    assert "'locks'" in messages[0].msg
    assert "DummyCache" in messages[0].msg
    assert "no limit" in messages[0].msg
    assert "django-redis" in messages[0].hint


def test_file_based_cache_for_slots_is_an_error(tmp_path):
    """FileBasedCache.add is a has_key() then a set(): two workers can both take a slot."""
    config = {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(tmp_path),
        "OPTIONS": {"MAX_ENTRIES": 1_000_000},
    }
    messages = task_workflow_messages(**with_lock_cache(config))

    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E005")]
    assert "FileBasedCache" in messages[0].msg
    assert "not atomic" in messages[0].msg


MEMCACHED = {
    "pymemcache": "django.core.cache.backends.memcached.PyMemcacheCache",
    "pylibmc": "django.core.cache.backends.memcached.PyLibMCCache",
}


@pytest.mark.parametrize("backend", list(MEMCACHED.values()), ids=list(MEMCACHED))
@pytest.mark.parametrize("ttl", [0.5, 0.999, 1.5, 59.9])
def test_memcached_lock_cache_needs_whole_second_lock_ttl(backend, ttl):
    """Memcached keeps whole seconds: Django sends int(ttl), and int(ttl) == 0 as "expire
    at once", so a fractional LOCK_TTL is cut short and one below 1 s holds nothing."""
    overrides = with_lock_cache({"BACKEND": backend, "LOCATION": "127.0.0.1:11211"})
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], "LOCK_TTL": ttl}

    messages = task_workflow_messages(**overrides)

    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E004")]
    assert f"LOCK_TTL'] = {ttl!r}" in messages[0].msg
    assert "whole seconds" in messages[0].msg
    assert "a whole number of seconds >= 1" in messages[0].hint


@pytest.mark.parametrize("backend", list(MEMCACHED.values()), ids=list(MEMCACHED))
@pytest.mark.parametrize("ttl", [None, 1, 2, 60, 60.0])
def test_memcached_lock_cache_with_whole_second_lock_ttl_passes(backend, ttl):
    overrides = with_lock_cache({"BACKEND": backend, "LOCATION": "127.0.0.1:11211"})
    if ttl is not None:
        overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], "LOCK_TTL": ttl}
    assert task_workflow_messages(**overrides) == []


def test_memcached_check_leaves_a_bad_lock_ttl_to_e003():
    overrides = with_lock_cache({"BACKEND": MEMCACHED["pymemcache"], "LOCATION": "127.0.0.1:11211"})
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], "LOCK_TTL": -1}
    assert [m.id for m in task_workflow_messages(**overrides)] == ["task_workflow.E003"]


@pytest.mark.parametrize("option", ["SOCKET_TIMEOUT", "CONNECTION_POOL_KWARGS"])
@pytest.mark.parametrize("timeout", [0.1, 0.5, 1])
def test_short_socket_timeout_on_django_redis_is_a_warning(option, timeout):
    """The throttle's own connections take the cache's socket timeout when it is the
    shorter one, and cap each BLPOP at half of it: waiters then poll Redis at that rate."""
    options = (
        {"SOCKET_TIMEOUT": timeout} if option == "SOCKET_TIMEOUT" else {option: {"socket_timeout": timeout}}
    )
    messages = task_workflow_messages(**with_lock_cache({**REDIS_CACHE, "OPTIONS": options}))

    assert [(type(m), m.id) for m in messages] == [(Warning, "task_workflow.W004")]
    assert f"socket timeout of {timeout!r}s" in messages[0].msg
    assert f"every {timeout / 2:g}s" in messages[0].msg
    expected = (
        "['SOCKET_TIMEOUT']" if option == "SOCKET_TIMEOUT" else "['CONNECTION_POOL_KWARGS']['socket_timeout']"
    )
    assert f"Set OPTIONS{expected} of the lock cache to at least 2" in messages[0].hint


def test_short_socket_timeout_on_django_builtin_redis_is_a_warning():
    config = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:6379/15",
        "OPTIONS": {"socket_timeout": 0.4},
    }
    messages = task_workflow_messages(**with_lock_cache(config))
    assert [m.id for m in messages] == ["task_workflow.W004"]
    assert "Set OPTIONS['socket_timeout'] of the lock cache" in messages[0].hint


def test_socket_timeout_warning_names_the_timeout_the_throttle_uses():
    """The throttle's connections take the shorter of the two timeouts."""
    overrides = with_lock_cache({**REDIS_CACHE, "OPTIONS": {"SOCKET_TIMEOUT": 1}})
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], "THROTTLE_SOCKET_TIMEOUT": 0.2}
    [message] = task_workflow_messages(**overrides)
    assert message.id == "task_workflow.W004"
    assert "time out after 0.2s" in message.msg
    assert "every 0.1s" in message.msg


@pytest.mark.parametrize("timeout", [None, 0, 1.5, 5])
def test_socket_timeout_above_one_second_passes(timeout):
    """0 (and None) mean no socket timeout to django-redis; THROTTLE_SOCKET_TIMEOUT then
    bounds the throttle's own calls."""
    options = {} if timeout is None else {"SOCKET_TIMEOUT": timeout}
    assert task_workflow_messages(**with_lock_cache({**REDIS_CACHE, "OPTIONS": options})) == []


@pytest.mark.parametrize("value", ["lots", None, "", [1], float("inf"), float("nan")])
@pytest.mark.parametrize(
    "backend",
    ["django.core.cache.backends.db.DatabaseCache", "django.core.cache.backends.filebased.FileBasedCache"],
    ids=["database", "file"],
)
def test_max_entries_that_is_not_a_number_is_an_error_not_a_crash(backend, value, tmp_path):
    """Django's cache reads int(MAX_ENTRIES) and silently falls back to 300 when it cannot
    (or crashes on inf): reported, where the check used to raise."""
    location = str(tmp_path) if "filebased" in backend else "tw_checks_unused"
    config = {"BACKEND": backend, "LOCATION": location, "OPTIONS": {"MAX_ENTRIES": value}}

    messages = task_workflow_messages(**with_lock_cache(config))

    ids = [m.id for m in messages]
    assert "task_workflow.E008" in ids, ids
    [message] = [m for m in messages if m.id == "task_workflow.E008"]
    assert isinstance(message, Error)
    assert f"OPTIONS['MAX_ENTRIES'] = {value!r}" in message.msg
    assert "MAX_ENTRIES': 1_000_000" in message.hint
    assert "task_workflow.W003" not in ids  # E008 says it already


@pytest.mark.parametrize("value", ["1000000", 1e6, 2_000_000])
def test_max_entries_django_can_read_as_an_int_passes(value):
    config = {**DATABASE_CACHE, "OPTIONS": {"MAX_ENTRIES": value}}
    assert task_workflow_messages(**with_lock_cache(config)) == []


def test_options_that_are_not_a_dict_do_not_crash_the_check():
    assert task_workflow_messages(**with_lock_cache({**REDIS_CACHE, "OPTIONS": None})) == []


# --- Checks: DatabaseCache on a database whose add is not atomic --------------------------

MARIADB = {
    "ENGINE": "django.db.backends.mysql",
    "NAME": "test",
    "USER": "root",
    "PASSWORD": "",
    "HOST": "127.0.0.1",
    "PORT": "3306",
}


class CacheTableOnMariaDB:
    """A database router that puts Django's cache table on the ``mariadb`` alias."""

    def db_for_read(self, model, **hints):
        return "mariadb" if model._meta.app_label == "django_cache" else None

    db_for_write = db_for_read


@pytest.fixture
def mysql_driver():
    """MySQLdb: mysqlclient if installed, else PyMySQL standing in for it."""
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        pymysql = pytest.importorskip("pymysql", reason="needs mysqlclient or PyMySQL (the dev extra)")
        pymysql.install_as_MySQLdb()


@pytest.mark.services
def test_database_cache_on_mariadb_is_an_error(mysql_driver, django_db_blocker):
    """Django's DatabaseCache.add over an expired row is a SELECT then an UPDATE: on a
    database the throttle's own DatabaseCache backend does not support (MySQL/MariaDB,
    Oracle) two workers can both take the slot.

    The local MariaDB is added as the alias ``mariadb`` (to the connection handler: it
    read DATABASES once), and a router puts the cache table there.
    """
    original = connections.settings
    connections.settings = connections.configure_settings({**original, "mariadb": dict(MARIADB)})
    try:
        with django_db_blocker.unblock():  # supports() may ask the server what it is
            overrides = {**with_lock_cache(DATABASE_CACHE), "DATABASE_ROUTERS": [CacheTableOnMariaDB()]}
            messages = task_workflow_messages(**overrides)
            with override_settings(**overrides):
                supported = DatabaseCacheThrottleBackend.supports(caches["locks"])
                vendor = connections["mariadb"].vendor
                is_mariadb = connections["mariadb"].mysql_is_mariadb  # asks the server
    finally:
        connections["mariadb"].close()
        del connections["mariadb"]
        connections.settings = original

    assert (vendor, is_mariadb) == ("mysql", True)
    if supported:  # the throttle's DatabaseCache backend was extended to it: nothing to report
        assert messages == []
        return
    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E006")]
    assert "'locks'" in messages[0].msg
    assert "'mariadb'" in messages[0].msg
    assert "mysql" in messages[0].msg
    assert "not atomic" in messages[0].msg
    assert "django-redis" in messages[0].hint


def test_database_cache_on_a_supported_database_passes():
    """PostgreSQL on the main run, SQLite on the SQLite run."""
    assert task_workflow_messages(**with_lock_cache(DATABASE_CACHE)) == []


def test_a_database_cache_that_cannot_be_inspected_is_a_warning_not_a_crash(monkeypatch):
    def unreachable(cache):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(DatabaseCacheThrottleBackend, "supports", unreachable)

    messages = task_workflow_messages(**with_lock_cache(DATABASE_CACHE))

    assert [(type(m), m.id) for m in messages] == [(Warning, "task_workflow.W005")]
    assert "could not connect to server" in messages[0].msg


def test_per_process_default_cache_is_a_warning_without_task_workflow_settings():
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}):
        del settings.TASK_WORKFLOW
        messages = check_settings() + check_lock_cache()

    assert [m.id for m in messages] == ["task_workflow.W001"]


def test_ignore_exceptions_on_django_redis_is_a_warning():
    config = {**REDIS_CACHE, "OPTIONS": {"IGNORE_EXCEPTIONS": True}}
    messages = task_workflow_messages(**with_lock_cache(config))

    assert [(type(m), m.id) for m in messages] == [(Warning, "task_workflow.W002")]
    assert "IGNORE_EXCEPTIONS" in messages[0].msg


@pytest.mark.parametrize(
    "config",
    [
        REDIS_CACHE,
        {**REDIS_CACHE, "OPTIONS": {"IGNORE_EXCEPTIONS": False}},
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:6379/15"},
        DATABASE_CACHE,
    ],
    ids=["django-redis", "django-redis-raising", "django-builtin-redis", "database"],
)
def test_shared_caches_pass(config):
    assert task_workflow_messages(**with_lock_cache(config)) == []


def test_only_the_lock_cache_is_checked():
    """A per-process cache under another alias is none of task_workflow's business."""
    overrides = {
        "CACHES": {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "locks": REDIS_CACHE,
        },
        "TASK_WORKFLOW": {"CACHE": "locks"},
    }
    assert task_workflow_messages(**overrides) == []


# --- Checks: the TASK_WORKFLOW dict ------------------------------------------------------


def test_valid_configuration_has_no_messages():
    full = {
        "CACHE": "locks",
        "LOCK_TTL": 30,
        "THROTTLE_WAIT": None,
        "THROTTLE_RETRY_BACKOFF": 0.5,
        "THROTTLE_RETRY_BACKOFF_MAX": 60,
        "THROTTLE_SOCKET_TIMEOUT": 2.5,
        "THROTTLE_RESTART_GRACE": 120,
        "HEAVY_QUEUE": "bulk",
        "TRANSITION_HISTORY": False,
    }
    assert task_workflow_messages(**{**with_lock_cache(REDIS_CACHE), "TASK_WORKFLOW": full}) == []
    assert task_workflow_messages(**{**with_lock_cache(REDIS_CACHE), "TASK_WORKFLOW": {}}) == []


def test_unknown_key_is_an_error_naming_it():
    overrides = with_lock_cache(REDIS_CACHE)
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], "LOCK_TIMEOUT": 30, "HEAVY_QEUE": "x"}

    messages = task_workflow_messages(**overrides)

    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E002")] * 2
    assert "'HEAVY_QEUE'" in messages[0].msg
    assert "'LOCK_TIMEOUT'" in messages[1].msg
    assert "LOCK_TTL" in messages[1].hint  # the known keys


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LOCK_TTL", 0),
        ("LOCK_TTL", -5),
        ("LOCK_TTL", "x"),
        ("LOCK_TTL", True),
        ("LOCK_TTL", None),
        ("CACHE", "missing"),
        ("CACHE", None),
        ("HEAVY_QUEUE", ""),
        ("HEAVY_QUEUE", 5),
        ("THROTTLE_WAIT", -1),
        ("THROTTLE_WAIT", "5"),
        ("THROTTLE_RETRY_BACKOFF", 0),
        ("THROTTLE_RETRY_BACKOFF_MAX", -1),
        ("THROTTLE_SOCKET_TIMEOUT", 0),
        ("THROTTLE_RESTART_GRACE", -1),
        *[(key, value) for key in SECONDS_KEYS for value in (INF, -INF, NAN)],
        pytest.param("LOCK_TTL", 10**400, id="LOCK_TTL-10**400"),  # too large for a float
    ],
)
def test_bad_value_is_an_error_naming_the_key(key, value):
    overrides = with_lock_cache(REDIS_CACHE)
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], key: value}

    messages = task_workflow_messages(**overrides)

    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E003")]
    assert f"TASK_WORKFLOW[{key!r}]" in messages[0].msg
    assert repr(value) in messages[0].msg


@pytest.mark.parametrize("key", SECONDS_KEYS)
@pytest.mark.parametrize("value", [INF, NAN], ids=["inf", "nan"])
def test_infinite_or_nan_seconds_say_what_to_use_instead(key, value):
    """inf/NaN passed `value >= minimum` or made every acquire count as "unreachable"."""
    overrides = with_lock_cache(REDIS_CACHE)
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], key: value}

    [message] = task_workflow_messages(**overrides)

    assert message.id == "task_workflow.E003"
    assert "finite" in message.msg
    if key in ("THROTTLE_WAIT", "THROTTLE_RESTART_GRACE"):
        assert "None" in message.msg  # the way to say "no limit" / "LOCK_TTL"


def test_task_workflow_that_is_not_a_dict_is_an_error():
    with override_settings(TASK_WORKFLOW=[("CACHE", "default")]):
        messages = check_settings()

    assert [m.id for m in messages] == ["task_workflow.E001"]


def test_checks_are_registered_with_django():
    overrides = with_lock_cache({"BACKEND": "django.core.cache.backends.locmem.LocMemCache"})
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], "NOPE": 1}
    with override_settings(**overrides):
        compatibility = [m.id for m in run_checks(tags=[Tags.compatibility]) if m.id.startswith("task_")]
        caches = [m.id for m in run_checks(tags=[Tags.caches]) if m.id.startswith("task_")]

    assert compatibility == ["task_workflow.E002"]
    assert caches == ["task_workflow.W001"]


# --- Routing -----------------------------------------------------------------------------


@shared_task(name="tests.routing.heavy", is_heavy_task=True)
def heavy_task():
    pass


# Celery 5.x deprecates the ``queue`` task attribute (it has no effect from Celery 6.0).
QUEUE_ATTRIBUTE_DEPRECATED = "ignore:\\s*The 'queue' task attribute:celery.exceptions.CDeprecationWarning"
pytestmark = pytest.mark.filterwarnings(QUEUE_ATTRIBUTE_DEPRECATED)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", CDeprecationWarning)

    @shared_task(name="tests.routing.heavy_with_queue", is_heavy_task=True, queue="special")
    def heavy_task_with_queue():
        pass

    # Bind it now (pytest's collection would evaluate the proxy outside this block).
    heavy_task_with_queue.name  # noqa: B018


@shared_task(name="tests.routing.light")
def light_task():
    pass


@shared_task(name="tests.routing.explicitly_light", is_heavy_task=False)
def explicitly_light_task():
    pass


def routed_queue(app, task, **call_options) -> str:
    """The queue the app's router picks for a call of ``task`` with these options."""
    task.name  # noqa: B018 - evaluates the shared_task proxy (finalizes the app)
    options = {**task._get_exec_options(), **call_options}
    return app.amqp.router.route(options, task.name, (), {}, task)["queue"].name


def test_the_router_is_installed_on_the_example_app():
    example_app.finalize()
    assert list(example_app.conf.task_routes).count(route_heavy_tasks) == 1


def test_heavy_task_goes_to_the_heavy_queue():
    assert routed_queue(example_app, heavy_task) == "heavy"


def test_heavy_queue_follows_the_setting():
    with override_settings(TASK_WORKFLOW={**settings.TASK_WORKFLOW, "HEAVY_QUEUE": "bulk"}):
        assert routed_queue(example_app, heavy_task) == "bulk"


def test_queue_on_the_task_decorator_wins():
    assert routed_queue(example_app, heavy_task_with_queue) == "special"


def test_queue_in_the_call_options_wins():
    assert routed_queue(example_app, heavy_task, queue="calls") == "calls"
    assert routed_queue(example_app, heavy_task_with_queue, queue="calls") == "calls"


@pytest.mark.parametrize("task", [light_task, explicitly_light_task], ids=["light", "is_heavy_task=False"])
def test_other_tasks_go_to_the_default_queue(task):
    assert routed_queue(example_app, task) == example_app.conf.task_default_queue == "celery"


def test_router_by_task_name():
    heavy_task.name  # noqa: B018 - registers it
    assert route_heavy_tasks("tests.routing.heavy", (), {}, {}) == {"queue": "heavy"}
    assert route_heavy_tasks("tests.routing.light", (), {}, {}) is None
    assert route_heavy_tasks("tests.routing.no_such_task", (), {}, {}) is None


def user_router(name, args, kwargs, options, task=None, **kw):
    return {"queue": "user-fn"} if name == "tests.routing.user_fn.heavy" else None


@pytest.mark.parametrize(
    ("user_routes", "expected"),
    [
        (None, [route_heavy_tasks]),
        ({"tests.routing.user.heavy": {"queue": "custom"}}, None),
        ([user_router], [user_router, route_heavy_tasks]),
        ((user_router,), [user_router, route_heavy_tasks]),
    ],
    ids=["none", "dict", "list", "tuple"],
)
def test_install_appends_once_after_user_routes(user_routes, expected):
    app = Celery("tw_test_routing", set_as_current=False)
    app.conf.task_routes = user_routes
    app.finalize()  # installs the router (task_workflow's app-finalize hook)
    after_finalize = list(app.conf.task_routes)

    install_heavy_task_router(app)
    install_heavy_task_router(app)

    routes = list(app.conf.task_routes)
    assert routes == after_finalize
    assert routes.count(route_heavy_tasks) == 1
    assert routes[-1] is route_heavy_tasks
    assert routes == (expected if expected is not None else [user_routes, route_heavy_tasks])


def test_user_routes_come_first():
    app = Celery("tw_test_routing", set_as_current=False)
    app.conf.task_routes = {"tests.routing.user.heavy": {"queue": "custom"}}

    @app.task(name="tests.routing.user.heavy", is_heavy_task=True)
    def routed_by_user():
        pass

    @app.task(name="tests.routing.user.other_heavy", is_heavy_task=True)
    def not_routed_by_user():
        pass

    app.finalize()

    assert routed_queue(app, routed_by_user) == "custom"
    assert routed_queue(app, not_routed_by_user) == "heavy"


def test_router_installed_on_apps_finalized_before_and_after_install_on_all_apps():
    """task_workflow's ready() ran long before these apps existed; install_on_all_apps()
    (what ready() calls) also reaches an app finalized before it ran."""
    before = Celery("tw_test_routing_before", set_as_current=False)
    before.finalize()
    before.conf.task_routes = None  # as if finalized before task_workflow was loaded
    install_on_all_apps()
    after = Celery("tw_test_routing_after", set_as_current=False)
    after.finalize()

    assert list(before.conf.task_routes) == [route_heavy_tasks]
    assert list(after.conf.task_routes) == [route_heavy_tasks]


# --- Celery's private API, used only in task_workflow/celery_hooks.py -----------------------
# These fail when a Celery release changes what celery_hooks relies on.


def test_celery_private_api_app_finalize_hook_exists():
    assert callable(celery_state.connect_on_app_finalize)
    assert callable(celery_state._get_active_apps)


def test_celery_private_api_on_every_app_finalized_reaches_apps_finalized_before_and_after():
    seen: list[Celery] = []
    finalized_before = Celery("tw_test_hooks_before", set_as_current=False)
    finalized_before.finalize()
    not_finalized_yet = Celery("tw_test_hooks_later", set_as_current=False)
    try:
        celery_hooks.on_every_app_finalized(seen.append)
        assert finalized_before in seen
        assert not_finalized_yet not in seen
        not_finalized_yet.finalize()
        assert not_finalized_yet in seen
        created_after = Celery("tw_test_hooks_after", set_as_current=False)
        created_after.finalize()
        assert created_after in seen
    finally:
        celery_state._on_app_finalizers.discard(seen.append)  # type: ignore[attr-defined]


def test_celery_private_api_project_app_and_its_django_fixup():
    """The project's app as celery.current_app has it, without creating Celery's fallback
    app; its Django fixup is found among the app's fixup objects."""
    assert celery_state._tls.current_app is example_app or celery_state.default_app is example_app
    assert celery_hooks.project_celery_app() is example_app
    assert any(isinstance(fixup, DjangoFixup) for fixup in celery_hooks.app_fixups(example_app))
    assert celery_hooks.app_fixups(None) == ()


@shared_task(name="tests.hooks.autoretried", autoretry_for=(ValueError,))
def autoretried_task():
    pass


@shared_task(name="tests.hooks.current", bind=True)
def reports_current_task(self):
    return (celery_hooks.current_task_object() is self, running_task() is self)


def test_celery_private_api_autoretry_wrapper():
    assert celery_hooks.has_autoretry_wrapper(autoretried_task._get_current_object())
    assert not celery_hooks.has_autoretry_wrapper(light_task._get_current_object())


def test_celery_private_api_current_task_object():
    """The task itself (not celery.current_task, a proxy that is never None) while one
    runs, None otherwise."""
    assert celery_hooks.current_task_object() is None
    assert running_task() is None
    result = reports_current_task.apply()
    assert result.get() == (True, True)
    assert isinstance(reports_current_task._get_current_object(), Task)
