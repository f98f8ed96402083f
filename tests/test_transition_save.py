"""What ``apply_transition`` reads, saves and commits, seen through its public API.

The transition is Django's own transaction: ``atomic()``, the row read with
``select_for_update().get(uuid=...)``, the entity saved with ``save(update_fields=...)``
and its history row created through the ORM. The save writes the state field and every
field whose value the transition method, django-fsm's signal receivers or
``error_message`` changed (plus those a save may change by itself: ``auto_now``, custom
``pre_save()``, mutable values). So the UPDATE is shorter, and a column that code inside
the transition's own transaction updated through another path (a queryset ``update()``
in a receiver) is not overwritten with the stale copy loaded before. In every failure
case nothing is written. Runs on PostgreSQL and SQLite (a few tests PostgreSQL only).

(Between two connections a full-row save loses nothing either: the row lock taken by the
``SELECT ... FOR UPDATE`` makes another writer of the row wait for the commit, and the
values written back were read under that lock. The lost update a full-row save can cause
is the one inside the transaction, below.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError, IntegrityError, OperationalError, connection, models, transaction
from django.db.models import F
from django.db.models.signals import post_save, pre_save
from django.test.utils import CaptureQueriesContext, isolate_apps
from django_fsm.signals import post_transition

from task_workflow.models import StateMixin, TransitionRecord, UuidMixin
from task_workflow.tasks import TransitionNotPermitted, apply_transition
from tests.test_transitions import statements, updated_columns
from tests.testapp.models import Volume

S = Volume.States

needs_postgres = pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL")


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


@contextmanager
def connected(signal: Any, receiver: Any, **kwargs: Any) -> Iterator[None]:
    """``receiver`` connected to ``signal`` for the block."""
    uid = f"tests.save.{receiver.__name__}"
    signal.connect(receiver, weak=False, dispatch_uid=uid, **kwargs)
    try:
        yield
    finally:
        signal.disconnect(dispatch_uid=uid, **kwargs)


@pytest.fixture
def receiver():
    """Connect a django-fsm ``post_transition`` receiver for Volume for one test."""
    connected_uids = []

    def connect(fn):
        uid = f"tests.save.{fn.__name__}"
        post_transition.connect(fn, sender=Volume, weak=False, dispatch_uid=uid)
        connected_uids.append(uid)
        return fn

    yield connect
    for uid in connected_uids:
        post_transition.disconnect(sender=Volume, dispatch_uid=uid)


# --- The locking read ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_locking_read_is_the_orm_s_get(volume_type):
    """The SELECT ... FOR UPDATE is what ``select_for_update().get(uuid=...)`` sends,
    and gives the same instance."""
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
    assert not entity._state.adding


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


# --- The save is the model's save ----------------------------------------------------------


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


@pytest.mark.django_db
def test_pre_save_and_post_save_are_sent_as_by_save(volume_type):
    seen: list[tuple[str, dict[str, Any]]] = []

    def on_pre_save(sender, instance, **kwargs):
        seen.append(("pre_save", {"sender": sender, "pk": instance.pk, **kwargs}))

    def on_post_save(sender, instance, **kwargs):
        seen.append(("post_save", {"sender": sender, "pk": instance.pk, "state": instance.state, **kwargs}))

    first, second = (Volume.objects.create(state=S.UPDATE_SCHEDULED) for _ in range(2))
    with connected(pre_save, on_pre_save, sender=Volume), connected(post_save, on_post_save, sender=Volume):
        apply_transition(Volume, first.uuid, "begin_updating")
        by_transition = [(name, {**kwargs, "pk": None}) for name, kwargs in seen]
        seen.clear()
        orm_update(second, "begin_updating", ["state", "state_changed_at"])
        by_save = [(name, {**kwargs, "pk": None}) for name, kwargs in seen]
    assert [name for name, _ in by_transition] == ["pre_save", "post_save"]
    for (_, got), (_, expected) in zip(by_transition, by_save, strict=True):
        got.pop("signal"), expected.pop("signal")
        assert got == expected
    assert by_transition[1][1]["created"] is False
    assert by_transition[1][1]["update_fields"] == frozenset({"state", "state_changed_at"})


@pytest.mark.django_db
def test_the_history_row_is_created_through_the_orm(volume_type):
    """Its ``post_save`` says ``created``, after the entity's own, in the same transaction."""
    seen = []

    def record(sender, instance, created, update_fields, **kwargs):
        seen.append((sender, created, update_fields))

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    with connected(post_save, record):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert seen == [
        (Volume, False, frozenset({"state", "state_changed_at"})),
        (TransitionRecord, True, None),
    ]
    history = TransitionRecord.objects.for_entity(volume).get()
    assert (history.source_state, history.target_state, history.entity_uuid) == (
        S.UPDATE_SCHEDULED,
        S.UPDATING,
        volume.uuid,
    )


@pytest.mark.django_db
def test_a_model_with_a_save_of_its_own_is_saved_through_it(volume_type, monkeypatch):
    calls = []

    def save(self, *args, **kwargs):
        calls.append(kwargs.get("update_fields"))
        return models.Model.save(self, *args, **kwargs)

    monkeypatch.setattr(Volume, "save", save, raising=False)
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    calls.clear()
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert calls == [["state", "state_changed_at"]]
    assert stored(volume)["state"] == S.UPDATING


@pytest.mark.django_db
def test_an_expression_set_by_a_receiver_is_saved(volume_type, receiver):
    @receiver
    def grow(sender, instance, name, **kwargs):
        if name == "begin_updating":
            instance.size = F("size") + 10

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED, size=1)
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert stored(volume)["size"] == 11
    assert stored(volume)["state"] == S.UPDATING


# --- Fields a save may set, values changed in place ----------------------------------------


class RevisionField(models.PositiveIntegerField):
    """A counter whose ``pre_save()`` bumps it on every save (like a version field)."""

    calls = 0

    def pre_save(self, model_instance, add):
        type(self).calls += 1
        value = getattr(model_instance, self.attname) + 1
        setattr(model_instance, self.attname, value)
        return value


@contextmanager
def disk_model() -> Iterator[type[models.Model]]:
    """A StateMixin model with a JSONField, an ``auto_now`` field and a
    :class:`RevisionField`, its table created for the block (outside the app registry,
    so no migration knows of it)."""
    with isolate_apps("tests.testapp"):

        class Disk(UuidMixin, StateMixin, models.Model):
            metadata = models.JSONField(default=dict)
            revision = RevisionField(default=0)
            touched_at = models.DateTimeField(auto_now=True)
            label = models.CharField(max_length=20, default="")

            class Meta:
                app_label = "testapp"

            def __str__(self) -> str:
                return f"disk {self.uuid}"

        with connection.schema_editor() as editor:
            editor.create_model(Disk)
        try:
            ContentType.objects.get_for_model(Disk, for_concrete_model=False)
            yield Disk
        finally:
            with connection.schema_editor() as editor:
                editor.delete_model(Disk)
            ContentType.objects.filter(app_label="testapp", model="disk").delete()
            ContentType.objects.clear_cache()


@pytest.mark.django_db(transaction=True)
def test_fields_a_save_may_set_are_saved_once_by_one_update():
    """The JSONField (it may have been changed in place), the ``auto_now`` field and the
    custom ``pre_save()`` field are saved with the state; the unchanged ones are not. Each
    ``pre_save()`` runs once: the counter goes up by one."""
    with disk_model() as disk_class:
        disk = disk_class.objects.create(state=S.UPDATE_SCHEDULED, metadata={"tier": "ssd"})
        # As stored: how often create() ran pre_save() differs between Django versions.
        stored_revision = disk_class.objects.values_list("revision", flat=True).get(pk=disk.pk)
        RevisionField.calls = 0
        with CaptureQueriesContext(connection) as captured:
            entity = apply_transition(disk_class, disk.uuid, "begin_updating")
        sql = statements(captured)
        assert [s.split(None, 1)[0] for s in sql] == ["SELECT", "UPDATE", "INSERT"], sql
        assert updated_columns(sql[1]) == ["state", "state_changed_at", "metadata", "revision", "touched_at"]
        assert RevisionField.calls == 1
        assert entity.revision == stored_revision + 1
        assert disk_class.objects.values_list("state", "revision", "metadata").get(pk=disk.pk) == (
            S.UPDATING,
            stored_revision + 1,
            {"tier": "ssd"},
        )


@pytest.mark.django_db(transaction=True)
def test_a_json_value_changed_in_place_by_a_receiver_is_saved():
    with disk_model() as disk_class:

        def tag(sender, instance, name, **kwargs):
            instance.metadata["tags"] = ["resized"]

        disk = disk_class.objects.create(state=S.UPDATE_SCHEDULED, metadata={"tier": "ssd"})
        with connected(post_transition, tag, sender=disk_class):
            apply_transition(disk_class, disk.uuid, "begin_updating")
        assert disk_class.objects.get(pk=disk.pk).metadata == {"tier": "ssd", "tags": ["resized"]}


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


# --- Nothing written on failure ------------------------------------------------------------


def assert_unchanged(volume: Volume, state: str = S.UPDATE_SCHEDULED) -> None:
    assert stored(volume)["state"] == state
    assert not TransitionRecord.objects.for_entity(volume).exists()


@pytest.mark.django_db
def test_an_update_that_matches_no_row_fails_and_writes_nothing(volume_type):
    """As ``save(update_fields=...)`` does, an UPDATE that matched no row (a ``pre_save``
    receiver deleted it) is an error; the whole transition is rolled back."""

    def delete_row(sender, instance, **kwargs):
        Volume.objects.filter(pk=instance.pk).delete()

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    with connected(pre_save, delete_row, sender=Volume), pytest.raises(DatabaseError, match="did not affect"):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert_unchanged(volume)


@pytest.mark.django_db
def test_a_failing_history_row_rolls_the_state_change_back(volume_type):
    def refuse(sender, instance, **kwargs):
        raise RuntimeError("history refused")

    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    with (
        connected(pre_save, refuse, sender=TransitionRecord),
        pytest.raises(RuntimeError, match="history refused"),
    ):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert_unchanged(volume)


@pytest.mark.django_db
def test_a_refused_transition_writes_nothing(volume_type):
    volume = Volume.objects.create(state=S.OK)
    with pytest.raises(TransitionNotPermitted):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert_unchanged(volume, S.OK)


# --- Its own transaction ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_outside_any_transaction_it_is_one_transaction_of_three_statements():
    """Django's BEGIN and COMMIT around the locking read, the UPDATE and the INSERT;
    nothing else (the content type comes from ContentType's cache)."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    ContentType.objects.get_for_model(Volume, for_concrete_model=False)
    with CaptureQueriesContext(connection) as captured:
        apply_transition(Volume, volume.uuid, "begin_updating")
    sql = [query["sql"] for query in captured.captured_queries]
    assert [s.split(None, 1)[0] for s in sql] == ["BEGIN", "SELECT", "UPDATE", "INSERT", "COMMIT"], sql
    assert connection.get_autocommit()
    assert stored(volume)["state"] == S.UPDATING


def other_connection() -> Any:
    """A psycopg connection of its own to the test database, in autocommit."""
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg.connect(**params, autocommit=True)


@contextmanager
def failing_commit() -> Iterator[None]:
    """A deferred constraint trigger on the history table that fails every COMMIT after
    an INSERT into it."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION tw_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; END $$"
        )
        cursor.execute(
            "CREATE CONSTRAINT TRIGGER tw_test_refuse AFTER INSERT ON task_workflow_transitionrecord "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tw_test_refuse()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER tw_test_refuse ON task_workflow_transitionrecord")
            cursor.execute("DROP FUNCTION tw_test_refuse()")


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
@needs_postgres
def test_a_commit_that_fails_leaves_nothing_written():
    """A deferred constraint fails at the COMMIT: the error is raised, nothing was
    written, and the connection is fit for the next transition."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    with failing_commit(), pytest.raises(IntegrityError, match="refused at commit"):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert_unchanged(volume)
    assert connection.get_autocommit()
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert stored(volume)["state"] == S.UPDATING


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
@needs_postgres
def test_a_lock_timeout_is_raised_once_and_writes_nothing():
    """Another session holds the row lock: the locking read times out, the error is the
    caller's (no second attempt), and the connection is fit for the next transition."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '100ms'")  # this session's: reset below
    try:
        with other_connection() as holder, holder.transaction():
            holder.execute("SELECT 1 FROM testapp_volume WHERE id = %s FOR UPDATE", [volume.pk])
            with sent_statements("SELECT") as sent, pytest.raises(OperationalError, match="lock timeout"):
                apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert len([sql for sql, _ in sent if "FOR UPDATE" in sql]) == 1, sent
    assert_unchanged(volume)
    assert connection.get_autocommit()
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert stored(volume)["state"] == S.UPDATING


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
@needs_postgres
def test_on_commit_callbacks_run_once_the_transition_is_committed():
    """Registered inside the transition (a post_transition receiver): they run after the
    COMMIT, when another connection sees the new state."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    seen: list[str] = []

    def read_state() -> None:
        with other_connection() as other:
            row = other.execute("SELECT state FROM testapp_volume WHERE id = %s", [volume.pk]).fetchone()
        seen.append(row[0])

    def register(sender, instance, **kwargs):
        transaction.on_commit(read_state)

    with connected(post_transition, register, sender=Volume):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert seen == [S.UPDATING]
