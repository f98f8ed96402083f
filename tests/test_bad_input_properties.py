"""Bad input to the public API, generated (hypothesis): every wrong shape, type and bound
gets a clear error at the earliest point, and nothing in the database or the slot store
changes.

Covered: ``transition`` and ``apply_transition`` (uuids of every wrong shape, transition
names that do not exist, things that are not models), ``error_transition`` (checked when
the signature is built, not when the errback runs), ``throttle`` (concurrency, ttl, wait,
name and key of every wrong type and bound; keys of every length and character set are
valid and come back intact), and the management commands (``throttle_locks --ref``,
``stuck_entities --older-than``/``--model``).
"""

from __future__ import annotations

import math
import uuid

import pytest
from django.core.management import CommandError, call_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from task_workflow.models import TransitionRecord
from task_workflow.tasks import (
    ImproperlyDecorated,
    InvalidEntityUuid,
    apply_transition,
    error_transition,
    throttle,
    transition,
)
from task_workflow.throttle import get_backend
from tests.testapp.models import Volume

EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def is_uuid(value: object) -> bool:
    if isinstance(value, uuid.UUID):
        return True
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


#: Anything but a uuid: text of every kind, numbers, bytes, containers, None.
not_uuids = st.one_of(
    st.text(),
    st.text(alphabet="0123456789abcdefABCDEF-{}", min_size=30, max_size=40),
    st.integers(),
    st.floats(allow_nan=True),
    st.binary(),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
).filter(lambda value: not is_uuid(value))

transition_names = set(dir(Volume))


def database_snapshot() -> tuple:
    return (
        tuple(Volume.objects.order_by("pk").values_list("pk", "state", "error_message")),
        TransitionRecord.objects.count(),
    )


@pytest.fixture
def volume(db) -> Volume:
    return Volume.objects.create(state=Volume.States.UPDATE_SCHEDULED)


# --- transitions ---------------------------------------------------------------------------


@EXAMPLES
@given(value=not_uuids)
def test_apply_transition_refuses_every_non_uuid_and_changes_nothing(volume, value):
    before = database_snapshot()
    with pytest.raises(InvalidEntityUuid) as raised:
        apply_transition(Volume, value, "begin_updating")
    assert repr(value)[:20] in str(raised.value) or "not a valid uuid" in str(raised.value)
    assert database_snapshot() == before


@EXAMPLES
@given(name=st.text(max_size=40).filter(lambda name: name not in transition_names))
def test_unknown_transition_names_are_refused_before_anything_is_read(volume, name):
    before = database_snapshot()
    with pytest.raises(ImproperlyDecorated, match="has no django-fsm transition"):
        apply_transition(Volume, volume.uuid, name)
    with pytest.raises(ImproperlyDecorated, match="has no django-fsm transition"):
        transition(Volume, name)
    with pytest.raises(ImproperlyDecorated, match="has no django-fsm transition"):
        transition(Volume, "begin_updating", on_error=name)
    assert database_snapshot() == before


@EXAMPLES
@given(thing=st.one_of(st.none(), st.integers(), st.text(), st.just(object), st.just(int), st.just(Volume())))
def test_transition_needs_a_model_class(thing):
    with pytest.raises(ImproperlyDecorated, match="needs a Django model class"):
        transition(thing, "begin_updating")


@EXAMPLES
@given(value=not_uuids)
def test_error_transition_refuses_a_bad_uuid_when_the_signature_is_built(value):
    with pytest.raises(InvalidEntityUuid):
        error_transition(Volume, value)


@EXAMPLES
@given(name=st.text(max_size=40).filter(lambda name: name not in transition_names))
def test_error_transition_refuses_an_unknown_transition_when_built(name):
    with pytest.raises(ImproperlyDecorated):
        error_transition(Volume, uuid.uuid4(), name)


# --- throttle --------------------------------------------------------------------------------

bad_concurrency = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
bad_seconds = st.one_of(
    st.floats(max_value=-1e-9),
    st.integers(max_value=-1),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
bad_keys = st.one_of(
    st.floats(),
    st.binary(),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(st.integers()),
)


@EXAMPLES
@given(concurrency=bad_concurrency)
def test_throttle_refuses_bad_concurrency_at_construction(concurrency):
    with pytest.raises(ValueError, match="concurrency must be an int >= 1"):
        throttle(name="bad-input", concurrency=concurrency)


@EXAMPLES
@given(ttl=st.one_of(bad_seconds, st.just(0), st.just(0.0), st.none()))
def test_throttle_refuses_bad_ttl_at_construction(ttl):
    with pytest.raises(ValueError, match="ttl must be"):
        throttle(name="bad-input", ttl=ttl)


@EXAMPLES
@given(wait=bad_seconds)
def test_throttle_refuses_bad_wait_at_construction(wait):
    with pytest.raises(ValueError, match="wait must be"):
        throttle(name="bad-input", wait=wait)


@EXAMPLES
@given(key=bad_keys)
def test_throttle_refuses_keys_of_other_types(key):
    with pytest.raises(TypeError, match="throttle key must be a str, int or UUID"):
        throttle(name="bad-input", key=key)


@EXAMPLES
@given(
    name=st.one_of(st.just(""), st.integers(), st.binary(), st.booleans(), st.lists(st.text(), max_size=2))
)
def test_throttle_refuses_bad_names(name):
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        throttle(name=name)


@pytest.mark.services
@settings(max_examples=40, deadline=None)
@given(
    key=st.one_of(
        st.text(max_size=50),
        st.text(min_size=2000, max_size=3000),
        st.text(alphabet="*?[]\\{}\x00 \t\n:%_", max_size=30),
        st.integers(),
        st.uuids(),
    )
)
def test_any_key_of_the_allowed_types_is_a_group_of_its_own_and_comes_back_intact(key):
    name = f"tests.bad-input.{uuid.uuid4().hex[:8]}"
    with throttle(name=name, key=key, ttl=30) as lease:
        listed = [slot for slot in get_backend().held_slots() if slot.group.task_name == name]
        assert [slot.group.key for slot in listed] == [str(key)]
        assert [slot.token for slot in listed] == [lease.token]
        with pytest.raises(Exception, match="no free slot"):
            throttle(name=name, key=key, ttl=30, wait=0).acquire()
    assert [slot for slot in get_backend().held_slots() if slot.group.task_name == name] == []


# --- management commands ---------------------------------------------------------------------


@pytest.mark.django_db
@EXAMPLES
@given(ref=st.one_of(st.text(max_size=60), st.just("[]"), st.just('["a", null, "t"]'), st.just("{}")))
def test_throttle_locks_refuses_malformed_refs_and_releases_nothing(ref):
    before = get_backend().held_slots()
    with pytest.raises(CommandError):
        call_command("throttle_locks", "--release", "--ref", ref, "--yes")
    assert get_backend().held_slots() == before


@pytest.mark.django_db
@EXAMPLES
@given(
    duration=st.one_of(
        st.text(max_size=12).filter(lambda text: not text.strip().isdigit()),
        st.just("-5"),
        st.just("1x"),
        st.just("inf"),
        st.just("nan"),
    )
)
def test_stuck_entities_refuses_bad_durations_and_changes_nothing(duration):
    before = database_snapshot()
    try:
        call_command("stuck_entities", "--older-than", duration, "--set-erred")
    except CommandError:
        pass
    else:
        # A duration it understood (e.g. "2h"): it must have been a well-formed one.
        assert any(unit in duration for unit in "smhd") or duration.strip().replace(".", "", 1).isdigit()
    assert database_snapshot() == before


@pytest.mark.django_db
@EXAMPLES
@given(label=st.text(max_size=30))
def test_stuck_entities_refuses_unknown_models(label):
    from django.apps import apps

    try:
        model = apps.get_model(label)
    except (LookupError, ValueError):
        model = None
    if model is not None:
        return
    with pytest.raises(CommandError):
        call_command("stuck_entities", "--model", label)
