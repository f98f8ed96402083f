"""The model mixins: ``UuidMixin`` addressing and the ``StateMixin`` lifecycle."""

from __future__ import annotations

import uuid

import pytest
from django import forms
from django.db import IntegrityError, transaction
from django_fsm import TransitionNotAllowed

from example_project.models import Instance
from task_workflow.models import StateMixin
from task_workflow.tasks import apply_transition
from tests.testapp.models import Volume

S = StateMixin.States

#: The standard lifecycle: transition name -> (allowed source states, target state).
STANDARD_TRANSITIONS = {
    "begin_creating": ({S.CREATION_SCHEDULED}, S.CREATING),
    "schedule_updating": ({S.OK, S.ERRED}, S.UPDATE_SCHEDULED),
    "begin_updating": ({S.UPDATE_SCHEDULED}, S.UPDATING),
    "schedule_deleting": ({S.OK, S.ERRED}, S.DELETION_SCHEDULED),
    "begin_deleting": ({S.DELETION_SCHEDULED}, S.DELETING),
    "set_ok": ({S.CREATING, S.UPDATING}, S.OK),
    "set_erred": ("every state", S.ERRED),
    "recover": ({S.ERRED}, S.OK),
}

#: Instance's own power-state transitions.
INSTANCE_TRANSITIONS = {
    "set_online": ({Instance.States.CREATING, Instance.States.STARTING}, Instance.States.ONLINE),
    "begin_stopping": ({Instance.States.ONLINE}, Instance.States.STOPPING),
    "set_offline": ({Instance.States.STOPPING}, Instance.States.OFFLINE),
    "begin_starting": ({Instance.States.OFFLINE}, Instance.States.STARTING),
}


def build(model, state):
    """An unsaved instance of ``model`` in ``state`` (the constructor may set it)."""
    return model(state=state)


def allowed_sources(model, transition_name, target):
    """Try ``transition_name`` from every state of ``model``; return the states it
    succeeded from, checking the resulting state and that refusals change nothing."""
    allowed = set()
    for state in model.States.values():
        entity = build(model, state)
        try:
            getattr(entity, transition_name)()
        except TransitionNotAllowed:
            assert entity.state == state
        else:
            assert entity.state == target, (transition_name, state)
            allowed.add(state)
    return allowed


# --- UuidMixin -------------------------------------------------------------------------


@pytest.mark.django_db
def test_uuid_defaults_to_a_fresh_uuid4_per_row():
    """Every row gets its own random (version 4) uuid without being given one."""
    first, second = Volume.objects.create(), Volume.objects.create()
    assert isinstance(first.uuid, uuid.UUID)
    assert first.uuid.version == 4
    assert first.uuid != second.uuid
    assert Volume.objects.get(pk=first.pk).uuid == first.uuid


@pytest.mark.django_db
def test_uuid_is_unique():
    """Two rows cannot share a uuid: the database refuses the second."""
    existing = Volume.objects.create()
    with pytest.raises(IntegrityError), transaction.atomic():
        Volume.objects.create(uuid=existing.uuid)
    assert Volume.objects.filter(uuid=existing.uuid).count() == 1


def test_uuid_is_not_editable():
    """The uuid is not offered by model forms (or the admin)."""
    field = Volume._meta.get_field("uuid")
    assert field.editable is False
    assert field.unique is True
    form_class = forms.modelform_factory(Volume, fields="__all__")
    assert "uuid" not in form_class.base_fields
    assert "size" in form_class.base_fields


# --- StateMixin: defaults and protection -----------------------------------------------


@pytest.mark.parametrize("model", [Volume, Instance])
def test_default_state_is_creation_scheduled(model):
    """New entities start in creation_scheduled with an empty error message."""
    entity = model()
    assert entity.state == S.CREATION_SCHEDULED
    assert entity.error_message == ""


@pytest.mark.django_db
def test_default_state_is_saved():
    """The default state is what the database stores for a new row."""
    volume = Volume.objects.create()
    assert Volume.objects.values_list("state", flat=True).get(pk=volume.pk) == S.CREATION_SCHEDULED


def test_state_cannot_be_assigned_directly():
    """The state field is protected: only transitions change it."""
    volume = Volume()
    with pytest.raises(AttributeError, match="Direct state modification is not allowed"):
        volume.state = S.OK
    assert volume.state == S.CREATION_SCHEDULED


@pytest.mark.django_db
def test_state_of_a_loaded_row_cannot_be_assigned_directly():
    """Rows loaded from the database are protected too."""
    volume = Volume.objects.create(state=S.OK)
    loaded = Volume.objects.get(pk=volume.pk)
    with pytest.raises(AttributeError):
        loaded.state = S.ERRED
    assert loaded.state == S.OK


@pytest.mark.django_db
def test_refresh_from_db_reloads_a_protected_state():
    """refresh_from_db() picks up a state changed elsewhere, and the field stays protected."""
    volume = Volume.objects.create(state=S.OK)
    Volume.objects.filter(pk=volume.pk).update(state=S.ERRED)
    volume.refresh_from_db()
    assert volume.state == S.ERRED
    with pytest.raises(AttributeError):
        volume.state = S.OK


# --- StateMixin: the standard transitions ----------------------------------------------


@pytest.mark.parametrize("model", [Volume, Instance])
@pytest.mark.parametrize("transition_name", sorted(STANDARD_TRANSITIONS))
def test_standard_transition_sources_and_target(model, transition_name):
    """Each standard transition runs from exactly its source states (of all the model's
    states, subclass ones included) and lands on its target."""
    sources, target = STANDARD_TRANSITIONS[transition_name]
    expected = set(model.States.values()) if sources == "every state" else sources
    assert allowed_sources(model, transition_name, target) == expected


@pytest.mark.parametrize("transition_name", sorted(INSTANCE_TRANSITIONS))
def test_subclass_transition_sources_and_target(transition_name):
    """A subclass's own transitions work on the same state field."""
    sources, target = INSTANCE_TRANSITIONS[transition_name]
    assert allowed_sources(Instance, transition_name, target) == sources


@pytest.mark.parametrize("state", [S.ERRED, S.DELETING, S.OK, S.CREATION_SCHEDULED, S.DELETION_SCHEDULED])
def test_set_ok_refuses_states_other_than_creating_or_updating(state):
    """A late success report must not hide an error or resurrect a deleted entity."""
    volume = build(Volume, state)
    with pytest.raises(TransitionNotAllowed):
        volume.set_ok()
    assert volume.state == state


def test_recover_clears_the_error_message():
    """erred -> ok also forgets the error text."""
    volume = Volume(state=S.ERRED, error_message="BackendError: quota exceeded")
    volume.recover()
    assert volume.state == S.OK
    assert volume.error_message == ""


def test_set_erred_keeps_the_error_message():
    """set_erred leaves the text for its caller to set; it does not clear it."""
    volume = Volume(state=S.UPDATING, error_message="ValueError: boom")
    volume.set_erred()
    assert volume.state == S.ERRED
    assert volume.error_message == "ValueError: boom"


@pytest.mark.django_db
def test_recover_clears_the_error_message_in_the_database():
    """The cleared text is saved along with the new state."""
    volume = Volume.objects.create(state=S.ERRED, error_message="ValueError: boom")
    apply_transition(Volume, volume.uuid, "recover")
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (S.OK, "")


def test_conditional_transition_checks_its_condition():
    """Volume.begin_attaching runs from ok only when the volume is attachable."""
    assert allowed_sources(Volume, "begin_attaching", Volume.States.ATTACHING) == {S.OK}
    volume = Volume(state=S.OK, attachable=False)
    with pytest.raises(TransitionNotAllowed, match="conditions"):
        volume.begin_attaching()
    assert volume.state == S.OK


# --- States classes --------------------------------------------------------------------

STANDARD_VALUES = [
    "creation_scheduled",
    "creating",
    "update_scheduled",
    "updating",
    "deletion_scheduled",
    "deleting",
    "ok",
    "erred",
]


def test_standard_state_values_in_declaration_order():
    """values() lists the eight standard states, in order, without TRANSITIONAL or helpers."""
    assert S.values() == STANDARD_VALUES


def test_subclass_values_extend_the_standard_ones():
    """A subclass lists the standard states first, then its own, each once."""
    assert Instance.States.values() == [*STANDARD_VALUES, "online", "stopping", "offline", "starting"]
    assert Volume.States.values() == [*STANDARD_VALUES, "attaching"]


def test_choices_pair_values_with_readable_labels():
    """choices() gives (value, label) pairs for every value."""
    assert S.choices()[0] == ("creation_scheduled", "Creation scheduled")
    assert ("ok", "Ok") in S.choices()
    assert [value for value, _ in Instance.States.choices()] == Instance.States.values()
    assert ("offline", "Offline") in Instance.States.choices()


def test_transitional_states():
    """TRANSITIONAL holds the states some task must move on from, never the resting ones."""
    assert S.TRANSITIONAL == (
        "creation_scheduled",
        "creating",
        "update_scheduled",
        "updating",
        "deletion_scheduled",
        "deleting",
    )
    assert (*S.TRANSITIONAL, "stopping", "starting") == Instance.States.TRANSITIONAL
    assert (*S.TRANSITIONAL, "attaching") == Volume.States.TRANSITIONAL
    for states in (S, Instance.States, Volume.States):
        assert set(states.TRANSITIONAL) <= set(states.values())
        assert not {"ok", "erred", "online", "offline"} & set(states.TRANSITIONAL)
