"""System check task_workflow.W006: the project's Celery app closes every database
connection around each task (Celery's Django fixup without ``CELERY_DB_REUSE_MAX``).

The check must agree with Celery: each case is compared with what Celery's own
``DjangoWorkerFixup`` reads (tests/e2e/test_db_sessions_e2e.py counts the sessions a
real worker opens)."""

from __future__ import annotations

from collections.abc import Iterator
from io import StringIO

import pytest
from celery import Celery, _state
from celery.fixups.django import DjangoWorkerFixup
from django.core.checks import Warning, run_checks
from django.core.management import call_command
from django.test import override_settings

from example_project.celery import app as example_app
from task_workflow.checks import CELERY_TAG, check_celery_db_reuse

W006 = "task_workflow.W006"


@pytest.fixture
def current_app_restored() -> Iterator[None]:
    """Apps a test creates become current (``set_as_current``): put the old one back."""
    previous_current = getattr(_state._tls, "current_app", None)
    previous_default = _state.default_app
    yield
    _state._set_current_app(previous_current)
    _state.set_default_app(previous_default)


def project_app(name: str, **kwargs) -> Celery:
    """A Celery app configured from Django settings the way Celery's Django guide (and
    the example project) does, made the current app."""
    app = Celery(name, **kwargs)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.set_current()
    return app


def celery_reuses_connections(app: Celery) -> bool:
    """What Celery's worker fixup decides: ``close_database`` closes everything unless
    ``db_reuse_max`` is truthy."""
    return bool(DjangoWorkerFixup(app).db_reuse_max)


def test_the_example_project_reuses_connections_and_passes():
    assert example_app.conf.get("CELERY_DB_REUSE_MAX") == 1000
    assert celery_reuses_connections(example_app)
    assert check_celery_db_reuse() == []


@pytest.mark.usefixtures("current_app_restored")
@override_settings(CELERY_DB_REUSE_MAX=None)
def test_an_app_without_db_reuse_max_is_a_warning_saying_what_the_worker_does():
    app = project_app("tw_no_reuse")

    [message] = check_celery_db_reuse()
    assert not celery_reuses_connections(app)
    assert (type(message), message.id) == (Warning, W006)
    assert message.msg.startswith(
        "Celery app 'tw_no_reuse' closes every database connection before and after each task: "
        "each task opens a new database session."
    )
    assert "CONN_MAX_AGE" in message.msg
    assert "CELERY_DB_REUSE_MAX = 1000" in message.hint
    assert "namespace='CELERY'" in message.hint
    assert "close_old_connections" in message.hint
    assert "CONN_HEALTH_CHECKS = True" in message.hint


@pytest.mark.usefixtures("current_app_restored")
@pytest.mark.parametrize(
    ("configure", "reuses"),
    [
        pytest.param(lambda app: None, False, id="unset"),
        pytest.param(lambda app: app.conf.update(CELERY_DB_REUSE_MAX=1000), True, id="app.conf"),
        pytest.param(lambda app: app.conf.update(CELERY_DB_REUSE_MAX=0), False, id="zero-is-unset"),
        # Celery reads only the upper-case name: a lower-case "new style" key is ignored.
        pytest.param(lambda app: app.conf.update(db_reuse_max=1000), False, id="lower-case-ignored"),
    ],
)
@override_settings(CELERY_DB_REUSE_MAX=None)
def test_the_check_reads_the_setting_as_celery_does(configure, reuses):
    app = project_app("tw_reuse_variants")
    configure(app)

    assert celery_reuses_connections(app) is reuses
    assert [m.id for m in check_celery_db_reuse()] == ([] if reuses else [W006])


@pytest.mark.usefixtures("current_app_restored")
@pytest.mark.parametrize("namespace", ["CELERY", None])
@override_settings(CELERY_DB_REUSE_MAX=500)
def test_the_django_setting_counts_with_or_without_the_celery_namespace(namespace):
    app = Celery("tw_reuse_from_settings")
    app.config_from_object("django.conf:settings", namespace=namespace)
    app.set_current()

    assert celery_reuses_connections(app)
    assert check_celery_db_reuse() == []


@pytest.mark.usefixtures("current_app_restored")
@override_settings(CELERY_DB_REUSE_MAX=None)
def test_an_app_without_celerys_django_fixup_passes():
    """Nothing closes connections around tasks without the fixup (``fixups=[]``, or an app
    created before DJANGO_SETTINGS_MODULE was set)."""
    project_app("tw_no_fixup", fixups=[])

    assert check_celery_db_reuse() == []


@pytest.mark.usefixtures("current_app_restored")
@override_settings(CELERY_DB_REUSE_MAX=None, CELERY_TASK_ALWAYS_EAGER=True)
def test_an_app_that_runs_every_task_eagerly_passes():
    """The fixup leaves eager tasks' connections alone, and no worker gets a task."""
    project_app("tw_eager")

    assert check_celery_db_reuse() == []


@pytest.mark.usefixtures("current_app_restored")
def test_no_celery_app_passes_and_creates_none():
    """``current_app`` would create Celery's fallback app (and make it every thread's
    default); the check must not."""
    _state._set_current_app(None)
    _state.set_default_app(None)

    assert check_celery_db_reuse() == []
    assert _state.default_app is None


@pytest.mark.usefixtures("current_app_restored")
@override_settings(CELERY_DB_REUSE_MAX=None)
def test_w006_is_registered_with_django_and_can_be_silenced():
    project_app("tw_registered")

    assert [m.id for m in run_checks(tags=[CELERY_TAG])] == [W006]
    out, err = StringIO(), StringIO()
    call_command("check", tag=[CELERY_TAG], stdout=out, stderr=err)
    assert W006 in err.getvalue()

    out, err = StringIO(), StringIO()
    with override_settings(SILENCED_SYSTEM_CHECKS=[W006]):
        call_command("check", tag=[CELERY_TAG], stdout=out, stderr=err)
    assert W006 not in out.getvalue() + err.getvalue()
    assert "no issues (1 silenced)" in out.getvalue()
