"""Mistakes a new user makes, and the message each one gets (issue #20), in-process:

- ``"django_fsm"`` missing from INSTALLED_APPS while a ModelAdmin uses django-fsm's admin
  templates (``StateMixinAdmin``): system check ``task_workflow.E009`` instead of
  ``TemplateDoesNotExist`` on the first change page;
- ``transition(..., if_not_permitted=...)`` and ``TASK_WORKFLOW['IF_NOT_PERMITTED']`` /
  ``['HEAVY_CONSUMER_GRACE']`` with a value that means nothing: refused at decoration time
  (``ImproperlyDecorated``) and by system check E003;
- ``EntityNotFound`` names the uncommitted-row cause and the on-commit way to send;
- the quickstart's Celery settings (``CELERY_DB_REUSE_MAX`` ...) get no W006.

The worker-side behaviour is tested on real workers in tests/e2e/test_not_permitted_logging.py
and tests/e2e/test_heavy_consumer_warning.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, _state
from django.conf import settings
from django.contrib.auth.models import User
from django.core.checks import Error, run_checks
from django.test import Client, override_settings
from django.urls import reverse

from example_project.models import Instance
from task_workflow.checks import check_settings
from task_workflow.exceptions import EntityNotFound, ImproperlyDecorated
from task_workflow.tasks import apply_transition, transition
from tests.testapp.models import Volume

E009 = "task_workflow.E009"
WITHOUT_DJANGO_FSM = [app for app in settings.INSTALLED_APPS if app != "django_fsm"]


# -- django_fsm missing from INSTALLED_APPS ---------------------------------------------------


@pytest.mark.django_db
def test_without_django_fsm_a_change_page_of_a_state_mixin_admin_cannot_render():
    """What E009 prevents: the first change page of an Instance dies on a missing template."""
    from django.template import TemplateDoesNotExist

    instance = Instance.objects.create(name="web-1")
    client = Client(raise_request_exception=True)
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    with override_settings(INSTALLED_APPS=WITHOUT_DJANGO_FSM), pytest.raises(TemplateDoesNotExist) as raised:
        client.get(reverse("admin:example_instance_change", args=[instance.pk]))
    assert "django_fsm/fsm_admin_change_form.html" in str(raised.value)


def test_without_django_fsm_the_admin_check_is_an_error_naming_the_admin_and_the_fix():
    with override_settings(INSTALLED_APPS=WITHOUT_DJANGO_FSM):
        messages = [m for m in run_checks(tags=["admin"]) if m.id == E009]
    assert messages, "no check reported the missing django_fsm"
    instance_messages = [m for m in messages if m.obj is not None and "InstanceAdmin" in str(m.obj)]
    assert len(instance_messages) == 1, messages
    (message,) = instance_messages
    assert isinstance(message, Error)
    assert "django_fsm/fsm_admin_change_form.html" in message.msg
    assert "example.Instance" in message.msg
    assert "'django_fsm'" in message.hint
    assert "INSTALLED_APPS" in message.hint


def test_with_django_fsm_installed_the_admin_check_is_silent():
    assert [m for m in run_checks(tags=["admin"]) if m.id == E009] == []


def test_without_the_admin_app_the_check_is_silent():
    without_admin = [app for app in WITHOUT_DJANGO_FSM if app != "django.contrib.admin"]
    with override_settings(INSTALLED_APPS=without_admin):
        assert [m for m in run_checks(tags=["admin"]) if m.id == E009] == []


# -- if_not_permitted and the new settings ------------------------------------------------------


@pytest.mark.parametrize("value", ["drop", "", "IGNORE", 0])
def test_an_unknown_if_not_permitted_is_refused_at_decoration_time(value):
    with pytest.raises(ImproperlyDecorated, match="if_not_permitted must be one of 'fail', 'ignore'"):
        transition(Volume, "begin_updating", if_not_permitted=value)


@pytest.mark.parametrize("value", ["fail", "ignore", None])
def test_the_known_if_not_permitted_values_decorate(value):
    def body(volume_uuid, transition_entity=None):
        return volume_uuid

    assert transition(Volume, "begin_updating", if_not_permitted=value)(body).__wrapped__ is body


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("IF_NOT_PERMITTED", "fail", True),
        ("IF_NOT_PERMITTED", "ignore", True),
        ("IF_NOT_PERMITTED", "drop", False),
        ("IF_NOT_PERMITTED", None, False),
        ("HEAVY_CONSUMER_GRACE", 60, True),
        ("HEAVY_CONSUMER_GRACE", 0.5, True),
        ("HEAVY_CONSUMER_GRACE", None, True),
        ("HEAVY_CONSUMER_GRACE", -1, False),
        ("HEAVY_CONSUMER_GRACE", float("inf"), False),
        ("HEAVY_CONSUMER_GRACE", "60", False),
    ],
)
def test_the_new_settings_are_checked(key, value, valid):
    with override_settings(TASK_WORKFLOW={key: value}):
        ids = [m.id for m in check_settings()]
    assert ids == ([] if valid else ["task_workflow.E003"])


# -- EntityNotFound ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_entity_not_found_names_the_uncommitted_row_and_the_on_commit_way_to_send():
    missing = uuid.uuid4()
    with pytest.raises(EntityNotFound) as raised:
        apply_transition(Volume, missing, "begin_updating")
    message = str(raised.value)
    assert message.startswith(f"testapp.Volume with uuid {missing} does not exist, or is not committed yet")
    assert "transaction.on_commit(lambda: task.delay(...))" in message
    assert "task.delay_on_commit(...)" in message
    assert raised.value.uuid == missing


# -- the quickstart's settings get no W006 ---------------------------------------------------------


@pytest.fixture
def quickstart_celery_app() -> Iterator[Celery]:
    """``proj/celery.py`` as Celery's Django guide writes it, made the current app."""
    previous_current = getattr(_state._tls, "current_app", None)
    previous_default = _state.default_app
    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.set_current()
    yield app
    _state._set_current_app(previous_current)
    _state.set_default_app(previous_default)


@override_settings(CELERY_DB_REUSE_MAX=1000, CELERY_TASK_ALWAYS_EAGER=False)
def test_the_quickstart_settings_give_no_w006(quickstart_celery_app):
    assert [m.id for m in run_checks(tags=["celery"])] == []


@override_settings(CELERY_DB_REUSE_MAX=None, CELERY_TASK_ALWAYS_EAGER=False)
def test_without_celery_db_reuse_max_the_quickstart_app_gets_w006(quickstart_celery_app):
    assert [m.id for m in run_checks(tags=["celery"])] == ["task_workflow.W006"]
