"""The ``transition`` task decorator, ``apply_transition`` and the error callback.

Tasks run locally: ``task.apply()`` (Celery's eager execution, with a task request)
and, where it matters, a plain call of the task (``called_directly``).
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
import uuid

import pytest
from celery import shared_task
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry
from django.conf import settings as django_settings
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ObjectDoesNotExist
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django_fsm import TransitionNotAllowed
from kombu.serialization import dumps, loads, prepare_accept_content

from example_project import tasks as example_tasks
from example_project.models import Instance
from example_project.tasks import start_instance_succeeded
from task_workflow.tasks import (
    EntityNotFound,
    ImproperlyDecorated,
    InvalidEntityUuid,
    TransitionNotPermitted,
    apply_transition,
    error_transition,
    on_task_failure,
    transition,
)
from tests.testapp.models import BodyRun, Volume

S = Volume.States


def record_run(task_name: str, volume: Volume) -> BodyRun:
    """Count a body run, with the state a fresh query of the row returns."""
    seen = Volume.objects.get(uuid=volume.uuid).state
    return BodyRun.objects.create(task=task_name, entity_uuid=volume.uuid, state_seen=seen)


# --- Tasks used by these tests ---------------------------------------------------------

#: What the last body saw (its entity, its task, whether it ran inside a transaction...).
SEEN: dict[str, object] = {}


@shared_task(name="tests.transitions.update_volume")
@transition(Volume, "begin_updating", on_error="set_erred")
def update_volume(volume_uuid, fail_with=None, transition_entity=None):
    """update_scheduled -> updating; records the run, then raises ``fail_with`` if given."""
    SEEN["entity"] = transition_entity
    record_run("update_volume", transition_entity)
    if fail_with is not None:
        raise fail_with
    return f"updated {volume_uuid}"


@shared_task(name="tests.transitions.update_volume_no_on_error")
@transition(Volume, "begin_updating")
def update_volume_no_on_error(volume_uuid, transition_entity=None):
    """update_scheduled -> updating without an error transition; always fails."""
    record_run("update_volume_no_on_error", transition_entity)
    raise ValueError("disk full")


@shared_task(name="tests.transitions.update_volume_bad_on_error")
@transition(Volume, "begin_updating", on_error="recover")
def update_volume_bad_on_error(volume_uuid, transition_entity=None):
    """Its on_error (erred -> ok) cannot run from updating; always fails."""
    raise ValueError("disk full")


@shared_task(name="tests.transitions.attach_volume")
@transition(Volume, "begin_attaching")
def attach_volume(volume_uuid, transition_entity=None):
    """ok -> attaching when the volume is attachable."""
    record_run("attach_volume", transition_entity)


@shared_task(name="tests.transitions.delete_volume_bound", bind=True)
@transition(Volume, "begin_deleting", on_error="set_erred")
def delete_volume_bound(self, volume_uuid, transition_entity=None):
    """A bind=True task: the uuid follows ``self``."""
    SEEN["self"] = self
    record_run(self.name, transition_entity)
    return volume_uuid


@shared_task(name="tests.transitions.create_volume_kwargs")
@transition(Volume, "begin_creating")
def create_volume_kwargs(volume_uuid, **kwargs):
    """A body that takes the entity through ``**kwargs``."""
    SEEN["kwargs"] = kwargs
    record_run("create_volume_kwargs", kwargs["transition_entity"])


@shared_task(name="tests.transitions.create_volume_noop")
@transition(Volume, "begin_creating")
def create_volume_noop(volume_uuid, transition_entity=None):
    """A body that touches no table (for counting the decorator's own queries)."""


def read_state_in_another_connection(volume_uuid) -> list[str]:
    """The state as a new connection (another thread) sees it: committed data only."""
    seen = []

    def read():
        try:
            seen.append(Volume.objects.get(uuid=volume_uuid).state)
        finally:
            connections.close_all()

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout=30)
    return seen


@shared_task(name="tests.transitions.update_and_look_elsewhere")
@transition(Volume, "begin_updating")
def update_and_look_elsewhere(volume_uuid, transition_entity=None):
    """Records whether the body runs in a transaction and what other connections see."""
    SEEN["in_atomic_block"] = transaction.get_connection().in_atomic_block
    SEEN["seen_elsewhere"] = read_state_in_another_connection(volume_uuid)


# --- Helpers ---------------------------------------------------------------------------


def run_task(mode, task, *args, **kwargs):
    """Run ``task`` eagerly (``apply``) or call it directly; return its value or raise."""
    if mode == "apply":
        result = task.apply(args=args, kwargs=kwargs)
        if result.failed():
            raise result.result
        assert result.successful(), result.state
        return result.result
    return task(*args, **kwargs)


@pytest.fixture(params=["apply", "direct"])
def mode(request):
    """How a task is run: eagerly by Celery, or called as a function."""
    return request.param


def make_volume(state=S.UPDATE_SCHEDULED, **fields) -> Volume:
    return Volume.objects.create(state=state, **fields)


def db_state(entity) -> tuple[str, str]:
    """(state, error_message) as stored."""
    return type(entity).objects.values_list("state", "error_message").get(pk=entity.pk)


@pytest.fixture(autouse=True)
def _clear_seen():
    SEEN.clear()


@pytest.fixture
def no_sleep(settings):
    """The simulated cloud backend answers at once."""
    settings.EXAMPLE_BACKEND_DELAY = 0


class Recorder:
    """Stands in for a task the example sends to the broker; records the calls."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def apply_async(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))

    def delay(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))


@pytest.fixture
def sent(monkeypatch):
    """What the example tasks send to the broker, captured instead of sent."""
    calls = []
    for name in ("backend_shutdown", "start_instance_succeeded"):
        monkeypatch.setattr(example_tasks, name, Recorder(name, calls))
    return calls


# --- Decoration-time errors ------------------------------------------------------------


def test_unknown_transition_names_the_missing_one_and_lists_the_existing_ones():
    """A typo fails at import time, saying what exists instead."""
    with pytest.raises(ImproperlyDecorated) as raised:
        transition(Volume, "begin_updatting")
    message = str(raised.value)
    assert "testapp.Volume" in message
    assert "'begin_updatting'" in message
    for existing in ("begin_attaching", "begin_updating", "recover", "set_erred", "set_ok"):
        assert existing in message
    assert isinstance(raised.value, TypeError)


def test_unknown_on_error_name():
    """on_error must name a transition of the model too."""
    with pytest.raises(ImproperlyDecorated, match=r"'set_failed'.*set_erred"):
        transition(Volume, "begin_updating", on_error="set_failed")


@pytest.mark.parametrize("model", ["testapp.Volume", Volume(), object, None])
def test_model_must_be_a_django_model_class(model):
    """A label, an instance or any other object is refused."""
    with pytest.raises(ImproperlyDecorated, match="needs a Django model class"):
        transition(model, "begin_updating")


def test_model_without_fsm_transitions():
    """A model class without that transition is refused, listing none."""
    with pytest.raises(ImproperlyDecorated, match=r"testapp.BodyRun.*\(none\)"):
        transition(BodyRun, "begin_updating")


def test_body_without_transition_entity_parameter():
    """The body must be able to receive the entity."""
    with pytest.raises(ImproperlyDecorated, match="must accept a 'transition_entity'"):

        @transition(Volume, "begin_updating")
        def body(volume_uuid):
            """No transition_entity."""


def test_positional_only_transition_entity_is_refused():
    """The entity is passed by keyword, so a positional-only parameter cannot take it."""
    with pytest.raises(ImproperlyDecorated):

        @transition(Volume, "begin_updating")
        def body(volume_uuid, transition_entity=None, /):
            """transition_entity cannot be given by keyword."""


def test_keyword_only_and_var_keyword_bodies_are_accepted():
    """``*, transition_entity`` and ``**kwargs`` both receive the entity."""

    @transition(Volume, "begin_updating")
    def keyword_only(volume_uuid, *, transition_entity):
        """Keyword-only."""

    @transition(Volume, "begin_updating")
    def var_keyword(volume_uuid, **kwargs):
        """**kwargs."""

    assert keyword_only.task_workflow_transition == (Volume, "begin_updating", None)
    assert callable(var_keyword)


def test_decorator_above_shared_task_is_refused():
    """transition() goes under @shared_task; above it, it would wrap the task object."""
    with pytest.raises(ImproperlyDecorated, match="under @shared_task"):

        @transition(Volume, "begin_updating")
        @shared_task(name="tests.transitions.misplaced")
        def misplaced(volume_uuid, transition_entity=None):
            """Decorators in the wrong order."""


def test_decorating_a_non_callable_is_refused():
    """Only functions can be decorated."""
    with pytest.raises(ImproperlyDecorated, match="decorates a function"):
        transition(Volume, "begin_updating")(42)


def test_signature_hides_the_injected_argument():
    """Celery checks call arguments against the signature: callers never pass the entity."""
    assert list(inspect.signature(update_volume.run).parameters) == ["volume_uuid", "fail_with"]
    assert list(inspect.signature(delete_volume_bound.run).parameters) == ["volume_uuid"]
    assert update_volume.run.task_workflow_transition == (Volume, "begin_updating", "set_erred")
    assert update_volume.run.__name__ == "update_volume"


# --- Entity uuid -----------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("as_type", [str, lambda value: value], ids=["str", "UUID"])
def test_uuid_as_string_or_uuid_object(mode, as_type):
    """The uuid may be given as a string (as it arrives from JSON) or a uuid.UUID."""
    volume = make_volume()
    run_task(mode, update_volume, as_type(volume.uuid))
    assert db_state(volume) == (S.UPDATING, "")
    assert BodyRun.objects.get().state_seen == S.UPDATING


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["nope", 123, None, "", "12345678-1234-1234-1234-12345678901z"])
def test_malformed_uuid(mode, value):
    """A value that is not a uuid fails before any query, naming the value."""
    volume = make_volume()
    with CaptureQueriesContext(connection) as captured, pytest.raises(InvalidEntityUuid) as raised:
        run_task(mode, update_volume, value)
    assert captured.captured_queries == []
    assert repr(value) in str(raised.value)
    assert raised.value.value == value
    assert isinstance(raised.value, ValueError)
    assert db_state(volume) == (S.UPDATE_SCHEDULED, "")
    assert not BodyRun.objects.exists()


@pytest.mark.django_db
def test_unknown_uuid(mode):
    """A uuid without a row fails naming it; no row is created or changed."""
    volume = make_volume()
    missing = uuid.uuid4()
    with pytest.raises(EntityNotFound) as raised:
        run_task(mode, update_volume, str(missing))
    assert str(missing) in str(raised.value)
    assert "testapp.Volume" in str(raised.value)
    assert raised.value.uuid == missing
    assert isinstance(raised.value, ObjectDoesNotExist)
    assert Volume.objects.count() == 1
    assert db_state(volume) == (S.UPDATE_SCHEDULED, "")
    assert not BodyRun.objects.exists()


# --- Transition refused ----------------------------------------------------------------


@pytest.mark.django_db
def test_transition_not_allowed_from_current_state(mode):
    """From a state the transition does not leave, nothing is written and the body
    does not run."""
    volume = make_volume(S.OK)
    with pytest.raises(TransitionNotPermitted) as raised:
        run_task(mode, update_volume, str(volume.uuid))
    error = raised.value
    assert isinstance(error, TransitionNotAllowed)
    for part in ("testapp.Volume", str(volume.uuid), "'ok'", "'begin_updating'"):
        assert part in str(error)
    assert (error.uuid, error.state, error.transition) == (volume.uuid, S.OK, "begin_updating")
    assert db_state(volume) == (S.OK, "")
    assert not BodyRun.objects.exists()


@pytest.mark.django_db
def test_transition_conditions_not_met(mode):
    """A transition whose conditions fail is refused like one from a wrong state."""
    volume = make_volume(S.OK, attachable=False)
    with pytest.raises(TransitionNotPermitted) as raised:
        run_task(mode, attach_volume, str(volume.uuid))
    assert "conditions" in str(raised.value)
    assert raised.value.transition == "begin_attaching"
    assert db_state(volume) == (S.OK, "")
    assert not BodyRun.objects.exists()


@pytest.mark.django_db
def test_transition_conditions_met(mode):
    """The same task runs once the condition holds."""
    volume = make_volume(S.OK, attachable=True)
    run_task(mode, attach_volume, str(volume.uuid))
    assert db_state(volume) == (S.ATTACHING, "")
    assert BodyRun.objects.get().state_seen == S.ATTACHING


@pytest.mark.django_db
def test_example_stop_instance_refused_when_not_online(mode, sent):
    """The example's stop task does not call the backend for an offline instance."""
    instance = Instance.objects.create(name="vm", state=Instance.States.OFFLINE)
    with pytest.raises(TransitionNotPermitted, match="begin_stopping"):
        run_task(mode, example_tasks.stop_instance, str(instance.uuid))
    assert db_state(instance) == (Instance.States.OFFLINE, "")
    assert sent == []


@pytest.mark.django_db
def test_example_stop_instance_from_online(mode, sent):
    """online -> stopping, then the backend call is sent with its callbacks."""
    instance = Instance.objects.create(name="vm", backend_id="b-1", state=Instance.States.ONLINE)
    run_task(mode, example_tasks.stop_instance, str(instance.uuid))
    assert db_state(instance) == (Instance.States.STOPPING, "")
    [(name, _, kwargs)] = sent
    assert name == "backend_shutdown"
    assert kwargs["args"] == ("b-1",)
    assert kwargs["link"].task == "example.stop_instance_succeeded"
    assert tuple(kwargs["link"].args) == (str(instance.uuid),)
    assert kwargs["link_error"].task == "task_workflow.on_task_failure"


# --- Transition applied ----------------------------------------------------------------


@pytest.mark.django_db
def test_state_is_saved_before_the_body_runs(mode):
    """The body finds the new state in the database, not only on its instance."""
    volume = make_volume()
    run_task(mode, update_volume, str(volume.uuid))
    run = BodyRun.objects.get()
    assert (run.task, run.entity_uuid, run.state_seen) == ("update_volume", volume.uuid, S.UPDATING)


@pytest.mark.django_db
def test_body_gets_the_saved_entity_and_its_value_is_returned(mode):
    """transition_entity is the row as saved, in the target state; the body's return
    value is the task's."""
    volume = make_volume()
    assert run_task(mode, update_volume, str(volume.uuid)) == f"updated {volume.uuid}"
    entity = SEEN["entity"]
    assert isinstance(entity, Volume)
    assert entity.pk == volume.pk
    assert entity.state == S.UPDATING
    assert entity.state == Volume.objects.get(pk=volume.pk).state


@pytest.mark.django_db
def test_a_caller_cannot_inject_the_entity():
    """A transition_entity passed by the caller is replaced by the locked, saved row."""
    volume = make_volume(S.CREATION_SCHEDULED)
    result = create_volume_kwargs.apply(args=(str(volume.uuid),), kwargs={"transition_entity": "forged"})
    assert result.successful(), result.result
    entity = SEEN["kwargs"]["transition_entity"]
    assert isinstance(entity, Volume)
    assert entity.state == S.CREATING


@pytest.mark.django_db
def test_var_keyword_body_receives_the_entity(mode):
    """A ``**kwargs`` body gets the entity under ``transition_entity``."""
    volume = make_volume(S.CREATION_SCHEDULED)
    run_task(mode, create_volume_kwargs, str(volume.uuid))
    assert set(SEEN["kwargs"]) == {"transition_entity"}
    assert BodyRun.objects.get().state_seen == S.CREATING


@pytest.mark.django_db(transaction=True)
def test_body_runs_after_commit_and_outside_any_transaction():
    """The row lock is released (transaction committed) before the body runs: the body
    is not in a transaction, and another connection already sees the new state."""
    volume = make_volume()
    result = update_and_look_elsewhere.apply(args=(str(volume.uuid),))
    assert result.successful(), result.result
    assert SEEN["in_atomic_block"] is False
    assert SEEN["seen_elsewhere"] == [S.UPDATING]


@pytest.mark.django_db
def test_example_start_instance(mode, sent, no_sleep):
    """offline -> starting, the backend is called, the success callback is queued."""
    instance = Instance.objects.create(name="vm", backend_id="b-1", state=Instance.States.OFFLINE)
    run_task(mode, example_tasks.start_instance, str(instance.uuid))
    assert db_state(instance) == (Instance.States.STARTING, "")
    assert sent == [("start_instance_succeeded", (str(instance.uuid),), {})]
    start_instance_succeeded.apply(args=(str(instance.uuid),)).get()
    assert db_state(instance) == (Instance.States.ONLINE, "")


# --- Body failures ---------------------------------------------------------------------


@pytest.mark.django_db
def test_body_error_applies_on_error_and_propagates(mode):
    """With on_error, a failing body moves the entity to erred with the error text, and
    the task still fails with the original exception."""
    volume = make_volume()
    error = ValueError("disk full on /dev/sdb")
    with pytest.raises(ValueError, match="disk full on /dev/sdb") as raised:
        run_task(mode, update_volume, str(volume.uuid), fail_with=error)
    assert raised.value is error
    state, message = db_state(volume)
    assert state == S.ERRED
    assert "ValueError" in message
    assert "disk full on /dev/sdb" in message
    assert BodyRun.objects.get().state_seen == S.UPDATING


@pytest.mark.django_db
def test_failed_eager_result_carries_the_original_exception():
    """Through Celery, the task is marked failed with the body's exception type."""
    volume = make_volume()
    result = update_volume.apply(args=(str(volume.uuid),), kwargs={"fail_with": KeyError("no such disk")})
    assert result.failed()
    assert isinstance(result.result, KeyError)
    assert db_state(volume) == (S.ERRED, "KeyError: 'no such disk'")


@pytest.mark.django_db
def test_body_error_without_on_error_leaves_the_target_state(mode):
    """Without on_error, the entity stays where the transition put it."""
    volume = make_volume()
    with pytest.raises(ValueError, match="disk full"):
        run_task(mode, update_volume_no_on_error, str(volume.uuid))
    assert db_state(volume) == (S.UPDATING, "")
    assert BodyRun.objects.count() == 1


@pytest.mark.django_db
def test_failing_error_transition_does_not_mask_the_body_error(mode, caplog):
    """An on_error transition that cannot run is logged; the body's error still propagates."""
    volume = make_volume()
    with caplog.at_level(logging.ERROR, logger="task_workflow"), pytest.raises(ValueError, match="disk full"):
        run_task(mode, update_volume_bad_on_error, str(volume.uuid))
    assert db_state(volume) == (S.UPDATING, "")
    assert any("Could not apply error transition 'recover'" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_example_start_instance_backend_failure(mode, sent, no_sleep):
    """The example: a backend refusal moves the instance to erred with its text."""
    instance = Instance.objects.create(name="vm", backend_id="fail-7", state=Instance.States.OFFLINE)
    with pytest.raises(example_tasks.backend.BackendError):
        run_task(mode, example_tasks.start_instance, str(instance.uuid))
    state, message = db_state(instance)
    assert state == Instance.States.ERRED
    assert message == "BackendError: backend refused to start fail-7: quota exceeded"
    assert sent == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("exc", "eager_state"),
    [
        (Retry("again later"), "RETRY"),
        (Ignore(), "IGNORED"),
        (Reject("bad message", requeue=False), "REJECTED"),
    ],
    ids=["Retry", "Ignore", "Reject"],
)
def test_celery_control_flow_exceptions_are_not_errors(exc, eager_state):
    """Retry, Ignore and Reject steer Celery; they never apply on_error."""
    volume = make_volume()
    result = update_volume.apply(args=(str(volume.uuid),), kwargs={"fail_with": exc})
    assert result.state == eager_state
    assert db_state(volume) == (S.UPDATING, "")
    assert BodyRun.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "exc", [Retry("again later"), Ignore(), Reject("bad message")], ids=["Retry", "Ignore", "Reject"]
)
def test_celery_control_flow_exceptions_propagate_from_direct_calls(exc):
    """Called directly, the control-flow exception reaches the caller untouched."""
    volume = make_volume()
    with pytest.raises(type(exc)) as raised:
        update_volume(str(volume.uuid), fail_with=exc)
    assert raised.value is exc
    assert db_state(volume) == (S.UPDATING, "")


# --- bind=True -------------------------------------------------------------------------


@pytest.mark.django_db
def test_bound_task(mode):
    """With bind=True the task comes first, then the uuid; self is the task."""
    volume = make_volume(S.DELETION_SCHEDULED)
    assert run_task(mode, delete_volume_bound, str(volume.uuid)) == str(volume.uuid)
    assert SEEN["self"].name == "tests.transitions.delete_volume_bound"
    assert SEEN["self"] is delete_volume_bound._get_current_object()
    assert db_state(volume) == (S.DELETING, "")
    assert BodyRun.objects.get().state_seen == S.DELETING


@pytest.mark.django_db
def test_bound_task_refused_transition(mode):
    """The uuid after self is the one checked."""
    volume = make_volume(S.OK)
    with pytest.raises(TransitionNotPermitted, match="begin_deleting"):
        run_task(mode, delete_volume_bound, str(volume.uuid))
    assert not BodyRun.objects.exists()


@pytest.mark.django_db
def test_bound_task_run_directly_leaves_no_applied_marker():
    """``.run()`` outside Celery must not record the transition on the task's default
    request: the next direct run on the same entity checks the transition again."""
    volume = make_volume(S.DELETION_SCHEDULED)
    delete_volume_bound.run(str(volume.uuid))
    assert db_state(volume) == (S.DELETING, "")
    with pytest.raises(TransitionNotPermitted, match="begin_deleting"):
        delete_volume_bound.run(str(volume.uuid))
    assert BodyRun.objects.count() == 1


def test_positional_parameter_after_transition_entity_is_refused():
    """A positional argument after the uuid could land in transition_entity only after the
    transition was saved: refuse such a body at decoration time."""
    with pytest.raises(ImproperlyDecorated, match="must be the last positional parameter"):

        @transition(Volume, "begin_updating")
        def body(volume_uuid, transition_entity=None, extra=0):
            pass


@pytest.mark.django_db
def test_malformed_call_is_refused_before_the_transition(mode):
    """Too many arguments: a TypeError and the state is unchanged."""
    volume = make_volume(S.UPDATE_SCHEDULED)
    with pytest.raises(TypeError, match="too many positional arguments"):
        run_task(mode, update_volume_no_on_error, str(volume.uuid), "surplus")
    assert db_state(volume) == (S.UPDATE_SCHEDULED, "")


@pytest.mark.django_db
def test_a_malformed_call_is_refused_after_well_formed_ones(mode):
    """Well-formed calls are remembered by their shape (how many positional arguments,
    which keywords), not by their values: a call of another shape is still checked."""
    ok, malformed = make_volume(S.UPDATE_SCHEDULED), make_volume(S.UPDATE_SCHEDULED)
    with pytest.raises(ValueError, match="disk full"):  # the body ran: the call bound
        run_task(mode, update_volume_no_on_error, str(ok.uuid))
    with pytest.raises(TypeError, match="too many positional arguments"):
        run_task(mode, update_volume_no_on_error, str(malformed.uuid), "surplus")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        run_task(mode, update_volume_no_on_error, str(malformed.uuid), surplus=1)
    assert db_state(ok)[0] == S.UPDATING
    assert db_state(malformed) == (S.UPDATE_SCHEDULED, "")


# --- Calling conventions ---------------------------------------------------------------


def test_missing_uuid_is_a_clear_type_error(mode):
    """Without a positional uuid the task fails with a TypeError that says so."""
    with pytest.raises(TypeError, match="entity uuid must be the first positional argument"):
        run_task(mode, update_volume)
    with pytest.raises(TypeError, match="first positional argument"):
        run_task(mode, delete_volume_bound)


def test_uuid_given_by_keyword_is_a_clear_type_error(mode):
    """The uuid is positional: by keyword it is refused with the same message."""
    with pytest.raises(TypeError, match=r"update_volume: the entity uuid must be the first positional"):
        run_task(mode, update_volume, volume_uuid=str(uuid.uuid4()))


def test_delay_checks_arguments_before_sending(monkeypatch):
    """Celery refuses a call without the uuid, or with transition_entity, before sending."""

    def send_task(*args, **kwargs):
        raise AssertionError("a message was sent")

    monkeypatch.setattr(update_volume.app, "send_task", send_task)
    with pytest.raises(TypeError, match="volume_uuid"):
        update_volume.delay()
    with pytest.raises(TypeError, match="transition_entity"):
        update_volume.delay(str(uuid.uuid4()), transition_entity=None)


def test_tasks_accept_json_only():
    """Messages are JSON: nothing else is accepted by the workers."""
    assert django_settings.CELERY_ACCEPT_CONTENT == ["json"]
    assert django_settings.CELERY_TASK_SERIALIZER == "json"
    assert update_volume.app.conf.accept_content == ["json"]
    assert update_volume.app.conf.task_serializer == "json"


@pytest.mark.django_db
@pytest.mark.parametrize("as_type", [str, lambda value: value], ids=["str", "UUID"])
def test_uuid_survives_a_json_message(as_type):
    """The arguments of a message, encoded and decoded as JSON the way Celery does,
    still address the entity."""
    volume = make_volume()
    content_type, encoding, body = dumps([[as_type(volume.uuid)], {}], serializer="json")
    args, kwargs = loads(body, content_type, encoding, accept=prepare_accept_content(["json"]))
    assert update_volume.apply(args=args, kwargs=kwargs).get() == f"updated {volume.uuid}"
    assert db_state(volume) == (S.UPDATING, "")


# --- error_transition / on_task_failure ------------------------------------------------


def test_error_transition_builds_the_errback_signature():
    """error_transition() is a signature of the errback task, with JSON-friendly args."""
    entity_uuid = uuid.uuid4()
    signature = error_transition(Instance, entity_uuid)
    assert signature.task == "task_workflow.on_task_failure"
    assert tuple(signature.args) == ("example.Instance", str(entity_uuid), "set_erred")
    custom = error_transition(Volume, str(entity_uuid), "set_erred")
    assert tuple(custom.args) == ("testapp.Volume", str(entity_uuid), "set_erred")


def test_error_transition_unknown_name():
    """A typo in the error transition fails when the signature is built."""
    with pytest.raises(ImproperlyDecorated, match="'set_broken'"):
        error_transition(Instance, uuid.uuid4(), "set_broken")


@pytest.mark.django_db
def test_errback_called_as_celery_calls_it():
    """Celery calls the errback with (request, exc, traceback) + its own args."""
    instance = Instance.objects.create(name="vm", state=Instance.States.STOPPING)
    request = Context(id="failed-task-id", task="example.backend_shutdown")
    exc = example_tasks.backend.BackendError("backend refused to stop b-1: quota exceeded")
    assert on_task_failure(request, exc, None, "example.Instance", str(instance.uuid)) is None
    assert db_state(instance) == (
        Instance.States.ERRED,
        "BackendError: backend refused to stop b-1: quota exceeded",
    )


@pytest.mark.django_db
def test_errback_runs_through_link_error(no_sleep):
    """End to end (eagerly): a failing task with link_error=error_transition(...)
    moves the entity to erred."""
    instance = Instance.objects.create(name="vm", state=Instance.States.STOPPING)
    result = example_tasks.backend_shutdown.apply(
        args=("fail-3",), link_error=error_transition(Instance, instance.uuid)
    )
    assert result.failed()
    assert db_state(instance) == (
        Instance.States.ERRED,
        "BackendError: backend refused to stop fail-3: quota exceeded",
    )


@pytest.mark.django_db
def test_errback_on_a_deleted_entity_logs_and_does_not_raise(caplog):
    """The entity may be gone by the time the error arrives: log, do not fail again."""
    instance = Instance.objects.create(name="vm", state=Instance.States.STOPPING)
    entity_uuid = str(instance.uuid)
    instance.delete()
    with caplog.at_level(logging.ERROR, logger="task_workflow"):
        on_task_failure(Context(id="x"), RuntimeError("boom"), None, "example.Instance", entity_uuid)
    [record] = [r for r in caplog.records if r.name.startswith("task_workflow")]
    assert "Could not apply error transition 'set_erred'" in record.getMessage()
    assert entity_uuid in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], EntityNotFound)


# --- SQL of a transition ---------------------------------------------------------------

BOOKKEEPING = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT", "BEGIN", "COMMIT")


@pytest.fixture(autouse=True)
def _content_types_cached(request):
    """History records look their content type up once per process; warm that cache so
    the statement counts below show the per-transition cost."""
    if "django_db_setup" in request.fixturenames or request.node.get_closest_marker("django_db"):
        request.getfixturevalue("db")
        ContentType.objects.get_for_model(Volume, for_concrete_model=False)


def statements(captured) -> list[str]:
    """The captured SQL, without savepoint/transaction bookkeeping."""
    return [q["sql"] for q in captured.captured_queries if not q["sql"].upper().startswith(BOOKKEEPING)]


#: What an UPDATE sets: the quoted column names left of each ``=`` of its SET list.
SET_COLUMN = re.compile(r'(?:SET |, )"(\w+)" = ')


def updated_columns(update: str) -> list[str]:
    """The columns an ``UPDATE ... SET ... WHERE`` statement sets, in order."""
    set_list = update.split(" SET ", 1)[1].rsplit(" WHERE ", 1)[0]
    return SET_COLUMN.findall(f"SET {set_list}")


def assert_lock_then_update(
    sql: list[str],
    target: str,
    *,
    history: bool = True,
    columns: tuple[str, ...] = ("state", "state_changed_at"),
) -> None:
    """Exactly: one SELECT ... FOR UPDATE of the row, one UPDATE saving ``target`` and
    setting only ``columns`` (what the transition changed, not the whole row) and, with
    the transition history on, one INSERT of its record."""
    assert len(sql) == (3 if history else 2), sql
    select, update = sql[:2]
    assert select.startswith("SELECT"), select
    assert select.rstrip().endswith("FOR UPDATE"), select
    assert update.startswith('UPDATE "testapp_volume"'), update
    assert f"'{target}'" in update, update
    assert updated_columns(update) == list(columns), update
    if history:
        assert sql[2].startswith('INSERT INTO "task_workflow_transitionrecord"'), sql[2]


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL")
def test_apply_transition_locks_then_updates():
    """apply_transition: one locking SELECT and one UPDATE, nothing else."""
    volume = make_volume()
    with CaptureQueriesContext(connection) as captured:
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert_lock_then_update(statements(captured), S.UPDATING)
    assert any(q["sql"].startswith("SAVEPOINT") for q in captured.captured_queries)


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL")
def test_apply_transition_without_history_is_lock_and_update_only(settings):
    """TRANSITION_HISTORY off: one locking SELECT and one UPDATE, nothing else."""
    settings.TASK_WORKFLOW = {**settings.TASK_WORKFLOW, "TRANSITION_HISTORY": False}
    volume = make_volume()
    with CaptureQueriesContext(connection) as captured:
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert_lock_then_update(statements(captured), S.UPDATING, history=False)


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL")
def test_decorated_task_adds_no_queries():
    """A task whose body touches no table issues only the transition's statements."""
    volume = make_volume(S.CREATION_SCHEDULED)
    with CaptureQueriesContext(connection) as captured:
        create_volume_noop.apply(args=(str(volume.uuid),)).get()
    assert_lock_then_update(statements(captured), S.CREATING)


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL")
def test_refused_transition_writes_nothing():
    """A refused transition only reads (under lock) and rolls its savepoint back."""
    volume = make_volume(S.OK)
    with CaptureQueriesContext(connection) as captured, pytest.raises(TransitionNotPermitted):
        apply_transition(Volume, volume.uuid, "begin_updating")
    [select] = statements(captured)
    assert select.rstrip().endswith("FOR UPDATE")
    assert any(q["sql"].startswith("ROLLBACK TO SAVEPOINT") for q in captured.captured_queries)
