"""What ``apply_transition`` reads and saves: the locking read the ORM's ``get()`` would
send, and the fields the transition changed, not the whole row.

The save is ``save(update_fields=...)`` of the state field and of every field whose value
the transition method, django-fsm's signal receivers or ``error_message`` changed (plus
those a save may change by itself: ``auto_now``, custom ``pre_save()``, mutable values).
So the UPDATE is shorter, and a column that code inside the transition's own transaction
updated through another path (a queryset ``update()`` in a receiver) is not overwritten
with the stale copy loaded before. Runs on PostgreSQL and SQLite.

(Between two connections a full-row save loses nothing either: the row lock taken by the
``SELECT ... FOR UPDATE`` makes another writer of the row wait for the commit, and the
values written back were read under that lock. The lost update a full-row save can cause
is the one inside the transaction, below.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError, connection, models, transaction
from django.db.models import F
from django.db.models.signals import post_save, pre_save
from django.test.utils import CaptureQueriesContext
from django_fsm import FSMField
from django_fsm.signals import post_transition

from task_workflow.models import TransitionRecord
from task_workflow.tasks import apply_transition
from task_workflow.transitions import (
    _changed,
    _db_value,
    _locking_select,
    _plain_save,
    _save,
    _save_plan,
    _set_by_every_save,
    _str_is_its_db_value,
    _update_statements,
)
from tests.test_transitions import statements, updated_columns
from tests.testapp.models import Volume

S = Volume.States


@pytest.fixture
def volume_type(db) -> ContentType:
    """Warm the content type cache, so the statements counted are the transition's."""
    return ContentType.objects.get_for_model(Volume, for_concrete_model=False)


def transition_sql(volume: Volume, name: str, **kwargs: Any) -> tuple[list[str], Volume]:
    """(the SELECT, UPDATE and INSERT one transition sends; the saved entity)."""
    with CaptureQueriesContext(connection) as captured:
        entity = apply_transition(Volume, volume.uuid, name, **kwargs)
    sql = statements(captured)
    assert [s.split(None, 1)[0] for s in sql] == ["SELECT", "UPDATE", "INSERT"], sql
    return sql, entity


def stored(volume: Volume) -> dict[str, Any]:
    return Volume.objects.values("state", "error_message", "size", "attachable").get(pk=volume.pk)


@pytest.fixture
def receiver():
    """Connect a django-fsm ``post_transition`` receiver for Volume for one test."""
    connected = []

    def connect(fn):
        post_transition.connect(fn, sender=Volume, weak=False, dispatch_uid=f"tests.save.{fn.__name__}")
        connected.append(fn)
        return fn

    yield connect
    for fn in connected:
        post_transition.disconnect(sender=Volume, dispatch_uid=f"tests.save.{fn.__name__}")


# --- The locking read ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_locking_read_is_the_statement_of_the_orm_s_get(volume_type):
    """For a plain default manager the SELECT ... FOR UPDATE is compiled once; it must be
    exactly what ``select_for_update().get(uuid=...)`` sends (on every Django of the
    matrix), and give the same instance."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, size=3)
    with transaction.atomic(), CaptureQueriesContext(connection) as orm:
        expected = Volume.objects.select_for_update().get(uuid=volume.uuid)
    sql, entity = transition_sql(volume, "begin_updating")
    assert sql[0] == statements(orm)[0]
    assert (entity.pk, entity.uuid, entity.size, entity.attachable) == (
        expected.pk,
        expected.uuid,
        expected.size,
        expected.attachable,
    )
    assert (entity._state.db, entity._state.adding) == ("default", False)


@pytest.mark.django_db
def test_the_locking_read_is_compiled_once_only_where_nothing_can_change_it():
    with transaction.atomic():
        compiled = _locking_select(Volume, "default")
    if connection.vendor == "postgresql":
        assert compiled is not None
        assert compiled.attnames == tuple(f.attname for f in Volume._meta.concrete_fields)
    else:  # SQLite converts UUIDs read from the database: the ORM reads the row
        assert compiled is None
    # A custom default manager may filter or load rows its own way: always the ORM.
    assert _locking_select(TransitionRecord, "default") is None


# --- The UPDATE sets what changed ----------------------------------------------------------


@pytest.mark.django_db
def test_an_error_transition_saves_its_error_message(volume_type):
    volume = Volume.objects.create(state=S.UPDATING)
    sql, _ = transition_sql(volume, "set_erred", error_message="ValueError: disk full")
    assert updated_columns(sql[1]) == ["state", "error_message", "state_changed_at"]
    assert stored(volume)["error_message"] == "ValueError: disk full"


@pytest.mark.django_db
def test_a_transition_method_that_clears_a_field_saves_it(volume_type):
    """recover (erred -> ok) empties error_message in its body."""
    volume = Volume.objects.create(state=S.ERRED, error_message="old failure")
    sql, _ = transition_sql(volume, "recover")
    assert updated_columns(sql[1]) == ["state", "error_message", "state_changed_at"]
    assert (stored(volume)["state"], stored(volume)["error_message"]) == (S.OK, "")


@pytest.mark.django_db
def test_a_field_the_transition_method_sets_is_saved(volume_type):
    volume = Volume.objects.create(state=S.OK, size=1)
    sql, entity = transition_sql(volume, "schedule_resizing", method_kwargs={"size": 8})
    assert updated_columns(sql[1]) == ["state", "state_changed_at", "size"]
    assert entity.size == 8
    assert stored(volume)["size"] == 8
    assert stored(volume)["state"] == S.UPDATE_SCHEDULED


@pytest.mark.django_db
def test_a_field_a_transition_receiver_sets_is_saved(volume_type, receiver):
    @receiver
    def detach(sender, instance, name, **kwargs):
        if name == "begin_updating":
            instance.attachable = False

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, attachable=True)
    sql, _ = transition_sql(volume, "begin_updating")
    assert updated_columns(sql[1]) == ["state", "state_changed_at", "attachable"]
    assert stored(volume)["attachable"] is False


@pytest.mark.django_db
def test_a_transition_to_the_same_state_still_saves_the_state(volume_type):
    """erred -> erred with the same message: the state is written all the same (one
    UPDATE per transition, with its signals), and the time of the transition."""
    volume = Volume.objects.create(state=S.ERRED, error_message="boom")
    sql, _ = transition_sql(volume, "set_erred", error_message="boom")
    assert updated_columns(sql[1]) == ["state", "state_changed_at"]


@pytest.mark.django_db
def test_post_save_receivers_see_the_saved_fields(volume_type):
    """The save is a model save: pre_save/post_save are sent, with ``update_fields``."""
    seen = []

    def record(sender, instance, update_fields, **kwargs):
        seen.append((sender, update_fields))

    post_save.connect(record, dispatch_uid="tests.save.post_save", weak=False)
    try:
        volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
        seen.clear()
        apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        post_save.disconnect(dispatch_uid="tests.save.post_save")
    # The history row is inserted without model signals (task_workflow's own table).
    assert seen == [(Volume, frozenset({"state", "state_changed_at"}))]
    assert TransitionRecord.objects.for_entity(volume).count() == 1


# --- The UPDATE is the ORM's, compiled once ------------------------------------------------


@contextmanager
def sent_statements(kind: str) -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """(SQL, parameters) of every ``kind`` statement sent in the block, as Django hands
    them to the database cursor."""
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def wrapper(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith(kind):
            sent.append((sql, tuple(params or ())))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield sent


def orm_update(volume: Volume, name: str, fields: list[str]) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE that ``save(update_fields=fields)`` sends after transition ``name``."""
    with transaction.atomic(), sent_statements("UPDATE") as sent:
        entity = Volume.objects.select_for_update().get(pk=volume.pk)
        getattr(entity, name)()
        entity.save(update_fields=fields)
    [update] = sent
    return update


@pytest.mark.django_db
def test_the_update_is_the_statement_of_the_orm_s_save(volume_type):
    """The compiled UPDATE is the one ``save(update_fields=...)`` sends, on its first
    use (compiled then) and after (from the cache), with the same kind of parameters."""
    volumes = [Volume.objects.create(state=S.UPDATE_SCHEDULED, size=3) for _ in range(3)]
    with sent_statements("UPDATE") as sent:
        apply_transition(Volume, volumes[0].uuid, "begin_updating")
        apply_transition(Volume, volumes[1].uuid, "begin_updating")
    expected_sql, expected_params = orm_update(volumes[2], "begin_updating", ["state", "state_changed_at"])
    assert [sql for sql, _ in sent] == [expected_sql, expected_sql]
    for (_, params), volume in zip(sent, volumes, strict=False):
        assert [type(p) for p in params] == [type(p) for p in expected_params]
        assert params[0] == S.UPDATING
        assert params[-1] == volume.pk
    assert [stored(v)["state"] for v in volumes] == [S.UPDATING] * 3
    volume_statements = [compiled for key, compiled in _update_statements.items() if key[0] is Volume]
    assert volume_statements
    assert None not in volume_statements


@pytest.mark.django_db
def test_a_none_value_is_saved_by_the_statement_the_orm_sends_for_it():
    """A ``None`` is ``= NULL`` in the ORM's UPDATE (Django 5.2, 6.0) or a parameter
    (6.1): the same fields with and without a ``None`` get each the ORM's statement."""
    content_type = ContentType.objects.get_for_model(Volume)
    record, other = (
        TransitionRecord.objects.create(
            content_type=content_type, object_id="1", transition="t", source_state="a", target_state="b"
        )
        for _ in range(2)
    )
    fields = ["entity_uuid", "task_name"]
    new_uuid = uuid.uuid4()
    with transaction.atomic(), sent_statements("UPDATE") as sent, connection.cursor() as cursor:
        _save(record, "default", fields, cursor)
        other.save(update_fields=fields)
        record.entity_uuid = other.entity_uuid = new_uuid
        record.task_name = other.task_name = "tests.save"
        _save(record, "default", fields, cursor)
        other.save(update_fields=fields)
    assert sent[0][0] == sent[1][0]
    assert sent[2][0] == sent[3][0]
    assert sent[2][1][:-1] == sent[3][1][:-1]  # the same values; the primary keys differ
    # Both went through a compiled statement, one per set of None values.
    shapes = {
        key[3]: compiled
        for key, compiled in _update_statements.items()
        if key[0] is TransitionRecord and key[2] == tuple(fields)
    }
    assert None not in shapes.values()
    assert len(shapes) == 2
    assert TransitionRecord.objects.values_list("entity_uuid", "task_name").get(pk=record.pk) == (
        new_uuid,
        "tests.save",
    )


@pytest.mark.django_db
def test_pre_save_and_post_save_are_sent_as_by_save(volume_type):
    seen: list[tuple[str, dict[str, Any]]] = []

    def on_pre_save(sender, instance, **kwargs):
        seen.append(("pre_save", {"sender": sender, "pk": instance.pk, **kwargs}))

    def on_post_save(sender, instance, **kwargs):
        seen.append(("post_save", {"sender": sender, "pk": instance.pk, "state": instance.state, **kwargs}))

    first, second = (Volume.objects.create(state=S.UPDATE_SCHEDULED) for _ in range(2))
    pre_save.connect(on_pre_save, sender=Volume, dispatch_uid="tests.save.pre", weak=False)
    post_save.connect(on_post_save, sender=Volume, dispatch_uid="tests.save.post", weak=False)
    try:
        apply_transition(Volume, first.uuid, "begin_updating")
        by_transition = [(name, {**kwargs, "pk": None}) for name, kwargs in seen]
        seen.clear()
        orm_update(second, "begin_updating", ["state", "state_changed_at"])
        by_save = [(name, {**kwargs, "pk": None}) for name, kwargs in seen]
    finally:
        pre_save.disconnect(sender=Volume, dispatch_uid="tests.save.pre")
        post_save.disconnect(sender=Volume, dispatch_uid="tests.save.post")
    assert [name for name, _ in by_transition] == ["pre_save", "post_save"]
    for (_, got), (_, expected) in zip(by_transition, by_save, strict=True):
        got.pop("signal"), expected.pop("signal")
        assert got == expected
    assert by_transition[1][1]["created"] is False
    assert by_transition[1][1]["update_fields"] == frozenset({"state", "state_changed_at"})


@pytest.mark.django_db
def test_a_model_with_a_save_of_its_own_is_saved_through_it(volume_type, monkeypatch):
    calls = []

    def save(self, *args, **kwargs):
        calls.append(kwargs.get("update_fields"))
        return models.Model.save(self, *args, **kwargs)

    monkeypatch.setattr(Volume, "save", save, raising=False)
    _plain_save.cache_clear()
    try:
        assert not _plain_save(Volume)
        volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
        calls.clear()
        apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        monkeypatch.undo()
        _plain_save.cache_clear()
    assert calls == [["state", "state_changed_at"]]
    assert stored(volume)["state"] == S.UPDATING
    assert _plain_save(Volume)


@pytest.mark.django_db
def test_an_expression_set_by_a_receiver_is_saved_by_the_orm(volume_type, receiver):
    @receiver
    def grow(sender, instance, name, **kwargs):
        if name == "begin_updating":
            instance.size = F("size") + 10

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, size=1)
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert stored(volume)["size"] == 11
    assert stored(volume)["state"] == S.UPDATING


@pytest.mark.django_db
def test_an_update_that_matches_no_row_fails_and_writes_nothing(volume_type):
    """As ``save(update_fields=...)`` does, an UPDATE that matched no row (a ``pre_save``
    receiver deleted it) is an error; the whole transition is rolled back."""

    def delete_row(sender, instance, **kwargs):
        Volume.objects.filter(pk=instance.pk).delete()

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    pre_save.connect(delete_row, sender=Volume, dispatch_uid="tests.save.delete", weak=False)
    try:
        with pytest.raises(DatabaseError, match="did not affect any rows"):
            apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        pre_save.disconnect(sender=Volume, dispatch_uid="tests.save.delete")
    assert stored(volume)["state"] == S.UPDATE_SCHEDULED
    assert not TransitionRecord.objects.for_entity(volume).exists()


# --- No stale write-back -------------------------------------------------------------------


@pytest.mark.django_db
def test_a_column_updated_inside_the_transaction_is_not_overwritten(volume_type, receiver):
    """A receiver counts transitions with a queryset update of the same row, in the same
    transaction (so the row lock does not stop it). A full-row save() would write back
    the size loaded before (1): the increment would be lost."""

    @receiver
    def count(sender, instance, name, **kwargs):
        if name == "begin_updating":
            Volume.objects.filter(pk=instance.pk).update(size=F("size") + 1)

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, size=1)
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert stored(volume)["size"] == 2
    assert stored(volume)["state"] == S.UPDATING


# --- Which fields count as changed ---------------------------------------------------------


def test_immutable_values_are_compared_and_mutable_ones_always_saved():
    assert _changed("ok", "ok") is False
    assert _changed("ok", "erred") is True
    assert _changed(1, 1) is False
    assert _changed(None, 0) is True
    metadata = {"tags": []}
    assert _changed(metadata, metadata) is True  # may have been changed in place


class LastModifiedField(models.DateTimeField):
    """A field whose pre_save() sets a value on every save (like model_utils' fields)."""

    def pre_save(self, model_instance, add):  # pragma: no cover - never saved here
        return super().pre_save(model_instance, add)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (models.DateTimeField(auto_now=True), True),
        (models.DateField(auto_now=True), True),
        (LastModifiedField(), True),
        (models.DateTimeField(auto_now_add=True), False),  # set on insert only
        (models.DateTimeField(), False),
        (models.CharField(max_length=10), False),
        (models.FileField(), False),
        (FSMField(), False),
    ],
    ids=["auto_now", "date auto_now", "custom pre_save", "auto_now_add", "datetime", "char", "file", "fsm"],
)
def test_fields_a_save_may_set_are_always_saved(field, expected):
    assert _set_by_every_save(field) is expected


class UpperCaseField(models.CharField):
    """A text field that prepares its values its own way."""

    def get_prep_value(self, value):  # pragma: no cover - never saved here
        return super().get_prep_value(value).upper()


def test_a_str_is_passed_as_it_is_only_to_text_fields_that_prepare_it_as_django_does():
    assert _str_is_its_db_value(models.CharField)
    assert _str_is_its_db_value(models.TextField)
    assert _str_is_its_db_value(FSMField)
    assert _str_is_its_db_value(models.SlugField)
    assert not _str_is_its_db_value(UpperCaseField)
    assert not _str_is_its_db_value(models.IntegerField)
    assert not _str_is_its_db_value(models.UUIDField)
    assert _db_value(UpperCaseField(), "a", connection) == "A"
    assert _db_value(models.CharField(), "a", connection) == "a"


def test_the_save_plan_of_volume():
    plan = _save_plan(Volume, "begin_updating")
    names = [name for name, _ in plan.fields]
    assert names == ["uuid", "state", "error_message", "state_changed_at", "size", "attachable"]
    assert plan.always == {"state"}
