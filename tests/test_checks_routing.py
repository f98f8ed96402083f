"""System checks of the TASK_WORKFLOW settings, and the heavy-task router."""

from __future__ import annotations

import warnings

import pytest
from celery import Celery, shared_task
from celery.exceptions import CDeprecationWarning
from django.conf import settings
from django.core.checks import Error, Tags, Warning, run_checks
from django.test import override_settings

from example_project.celery import app as example_app
from task_workflow.checks import check_lock_cache, check_settings
from task_workflow.routing import install_heavy_task_router, route_heavy_tasks

DATABASE_CACHE = {
    "BACKEND": "django.core.cache.backends.db.DatabaseCache",
    "LOCATION": "tw_checks_unused",
    "OPTIONS": {"MAX_ENTRIES": 1_000_000},
}
REDIS_CACHE = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:6379/15"}


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


@pytest.mark.parametrize(
    "backend",
    ["django.core.cache.backends.locmem.LocMemCache", "django.core.cache.backends.dummy.DummyCache"],
)
def test_per_process_cache_for_slots_is_a_warning(backend):
    messages = task_workflow_messages(**with_lock_cache({"BACKEND": backend}))

    assert [(type(m), m.id) for m in messages] == [(Warning, "task_workflow.W001")]
    assert "'locks'" in messages[0].msg
    assert backend.rsplit(".", 1)[1] in messages[0].msg


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
        "HEAVY_QUEUE": "bulk",
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
    ],
)
def test_bad_value_is_an_error_naming_the_key(key, value):
    overrides = with_lock_cache(REDIS_CACHE)
    overrides["TASK_WORKFLOW"] = {**overrides["TASK_WORKFLOW"], key: value}

    messages = task_workflow_messages(**overrides)

    assert [(type(m), m.id) for m in messages] == [(Error, "task_workflow.E003")]
    assert f"TASK_WORKFLOW[{key!r}]" in messages[0].msg
    assert repr(value) in messages[0].msg


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
