"""Apply django-fsm transitions to rows under a lock, and the ``transition`` task decorator.

The decorator is stacked under ``@shared_task``::

    @shared_task(name="example.stop_instance")
    @transition(Instance, "begin_stopping", on_error="set_erred")
    def stop_instance(instance_uuid, transition_entity=None): ...

At run time it locks the row (``SELECT … FOR UPDATE``), applies the transition, saves,
commits, and only then calls the body with ``transition_entity=`` the saved instance.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import logging
import uuid as uuid_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar, cast

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from django.contrib.contenttypes.models import ContentType
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.backends.utils import CursorWrapper
from django.db.models.query import MAX_GET_RESULTS
from django.db.models.signals import post_save, pre_save
from django.db.models.sql import InsertQuery, UpdateQuery
from django_fsm import TransitionNotAllowed

from . import own_transaction
from .conf import get_setting
from .exceptions import EntityNotFound, ImproperlyDecorated, InvalidEntityUuid, TransitionNotPermitted
from .models import TransitionRecord
from .running import celery_will_retry, running_task

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=models.Model)

#: Celery raises these to steer a task (re-queue, drop, reject); they are not failures
#: of the body and must never move the entity to its error state.
CONTROL_FLOW_EXCEPTIONS: tuple[type[BaseException], ...] = (Retry, Ignore, Reject)

ENTITY_ARGUMENT = "transition_entity"

#: Message header recording transitions already applied by an earlier run of the same
#: task message. Re-queues (``self.retry()``, a busy throttle) resend the request's
#: headers, so the re-run skips the transition instead of failing it from its target.
APPLIED_TRANSITIONS_HEADER = "task_workflow_applied_transitions"


@dataclass(frozen=True)
class TransitionOrigin:
    """Who applied a transition, for the history: a task (name, id) or a user."""

    task_name: str = ""
    task_id: str = ""
    user: Any = None

    @classmethod
    def of_task(cls, task: Task | None) -> TransitionOrigin:
        """The task's name and id; empty for ``None``."""
        if task is None:
            return cls()
        return cls(task_name=str(task.name), task_id=str(task.request.id or ""))

    @classmethod
    def from_running_task(cls) -> TransitionOrigin:
        return cls.of_task(running_task())


def _marker_key(model: type[models.Model], entity_uuid: uuid_module.UUID, transition_name: str) -> str:
    return f"{model._meta.label}:{entity_uuid}:{transition_name}"


@dataclass(frozen=True)
class Application:
    """What one application of a transition left behind: the state, and when it was set
    (``state_changed_at`` of a StateMixin model), so a re-run can tell "still the state
    this message left" from "left it, then came back to the same state name" (ABA)."""

    state: str
    changed_at: str | None = None

    @classmethod
    def of(cls, entity: models.Model) -> Application:
        changed_at = getattr(entity, "state_changed_at", None)
        return cls(str(entity.state), None if changed_at is None else changed_at.isoformat())  # type: ignore[attr-defined]

    def as_header(self) -> dict[str, str | None]:
        return {"state": self.state, "changed_at": self.changed_at}

    @classmethod
    def from_header(cls, value: Any) -> Application | None:
        if isinstance(value, str):  # a message from before changed_at was recorded
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("state"), str):
            changed_at = value.get("changed_at")
            return cls(value["state"], changed_at if isinstance(changed_at, str) else None)
        return None


def _applied(task: Task | None, marker_key: str) -> Application | None:
    """What an earlier run of this message left the entity in, if it applied the
    transition already (recorded in the message headers, which re-queues carry)."""
    if task is None:
        return None
    applied = (task.request.headers or {}).get(APPLIED_TRANSITIONS_HEADER) or {}
    return Application.from_header(applied.get(marker_key))


def _record_applied(task: Task | None, marker_key: str, application: Application) -> None:
    if task is None:
        return
    headers = dict(task.request.headers or {})
    headers[APPLIED_TRANSITIONS_HEADER] = {
        **(headers.get(APPLIED_TRANSITIONS_HEADER) or {}),
        marker_key: application.as_header(),
    }
    task.request.headers = headers


def fsm_transition_names(model: type[models.Model]) -> list[str]:
    """Names of the django-fsm transition methods declared on ``model``."""
    return sorted(
        name
        for name in dir(model)
        if not name.startswith("__") and hasattr(getattr(model, name, None), "_django_fsm")
    )


def check_transition_name(model: type[models.Model], transition_name: str) -> None:
    """Raise ``ImproperlyDecorated`` unless ``model`` has a transition of that name."""
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise ImproperlyDecorated(f"transition() needs a Django model class, got {model!r}")
    if not hasattr(getattr(model, transition_name, None), "_django_fsm"):
        raise ImproperlyDecorated(
            f"{model._meta.label} has no django-fsm transition {transition_name!r}; "
            f"its transitions are: {', '.join(fsm_transition_names(model)) or '(none)'}"
        )


def parse_entity_uuid(model: type[models.Model], value: Any) -> uuid_module.UUID:
    """Return ``value`` as a UUID, or raise ``InvalidEntityUuid`` naming it."""
    if isinstance(value, uuid_module.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid_module.UUID(value)
        except ValueError:
            pass
    raise InvalidEntityUuid(
        f"{model._meta.label}: {value!r} is not a valid uuid "
        "(expected a uuid.UUID or its string form as the task's first argument)",
        value=value,
    )


def apply_transition(
    model: type[ModelT],
    entity_uuid: uuid_module.UUID | str,
    transition_name: str,
    *,
    error_message: str | None = None,
    origin: TransitionOrigin | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
) -> ModelT:
    """Lock the row, apply the named transition, save, commit; return the saved entity.

    Runs in its own transaction (or a savepoint, inside an outer one). Raises
    ``ImproperlyDecorated`` (no such transition), ``InvalidEntityUuid``, ``EntityNotFound``
    or ``TransitionNotPermitted``; in every
    failure case nothing is written. ``error_message`` is stored on models that have
    that field (error transitions). Unless ``TASK_WORKFLOW['TRANSITION_HISTORY']`` is off,
    a :class:`~task_workflow.models.TransitionRecord` is written in the same transaction,
    attributed to ``origin`` (default: the running Celery task, if any).

    The save is ``save(update_fields=...)`` of the fields that need it: the state field,
    every field whose value differs from the row as loaded once the transition method and
    django-fsm's signal receivers have run (``error_message``, ``state_changed_at``, any
    field the method sets), every field holding a mutable value (a JSONField's dict: it
    may have been changed in place), and every field whose ``pre_save()`` may set a value
    (``auto_now``, custom fields). A model's own ``save()`` or a ``pre_save`` receiver
    that sets further fields must add them to ``update_fields``, as Django asks of any
    ``save(update_fields=...)``. A model that saves the way Django's ``Model`` does (no
    ``save()`` of its own, one table) gets the same signals and the same UPDATE, from a
    statement compiled once instead of built by the ORM on every call.

    Outside any transaction, on PostgreSQL with psycopg 3, the transaction goes as three
    messages, and its first statement doubles as the connection's due health check
    (:mod:`task_workflow.own_transaction`): a connection that died while idle is replaced
    and the transition run once more (nothing was written).
    """
    check_transition_name(model, transition_name)
    key = parse_entity_uuid(model, entity_uuid)
    plan = _save_plan(model, transition_name)
    using = router.db_for_write(model)
    connection = connections[using]
    # The DB-API connection whose due health check the first statement makes, or None.
    checked_raw = own_transaction.defer_health_check(connection)
    arguments = (model, key, transition_name, plan, using, error_message, origin, method_kwargs)
    try:
        return _apply_locked(*arguments, checked=checked_raw is not None)
    except _FirstStatementFailed as failed:
        if not own_transaction.connection_died(connection, checked_raw):
            raise failed.error from None
        logger.info("%s: the database connection had died since its last use; reconnected", model._meta.label)
    # Nothing was written: the transaction ended with its first statement.
    return _apply_locked(*arguments, checked=False)


class _FirstStatementFailed(Exception):
    """The locked read, a transaction's first statement and its health check, failed."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _apply_locked(
    model: type[ModelT],
    key: uuid_module.UUID,
    transition_name: str,
    plan: _SavePlan,
    using: str,
    error_message: str | None,
    origin: TransitionOrigin | None,
    method_kwargs: Mapping[str, Any] | None,
    *,
    checked: bool,
) -> ModelT:
    """``apply_transition`` in one transaction; ``checked``: its first statement is the
    connection's health check (a failure raises ``_FirstStatementFailed``)."""
    # One cursor for the transaction's own statements (the locked read, the UPDATE, the
    # history INSERT): a Django cursor costs as much Python as a statement sent with it.
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        try:
            entity = _lock_entity(model, key, using, cursor)
        except model.DoesNotExist:  # type: ignore[attr-defined]
            raise EntityNotFound(f"{model._meta.label} with uuid {key} does not exist", uuid=key) from None
        except (OperationalError, InterfaceError) as exc:
            if checked:
                raise _FirstStatementFailed(exc) from exc
            raise
        loaded = plan.snapshot(entity)
        current_state = entity.state  # type: ignore[attr-defined]
        if error_message is not None and hasattr(entity, "error_message"):
            entity.error_message = error_message
        try:
            getattr(entity, transition_name)(**(method_kwargs or {}))
        except TransitionNotAllowed as exc:
            raise TransitionNotPermitted(
                f"{model._meta.label} {key}: transition {transition_name!r} is not allowed "
                f"from state {current_state!r} ({exc})",
                uuid=key,
                state=current_state,
                transition=transition_name,
                object=entity,
                method=getattr(entity, transition_name),
            ) from exc
        _save(entity, using, plan.fields_to_save(entity, loaded), cursor)
        if get_setting("TRANSITION_HISTORY"):
            _write_history(
                entity,
                using,
                cursor,
                transition_name=transition_name,
                source_state=current_state,
                origin=origin or TransitionOrigin.from_running_task(),
                error_message=error_message or "",
            )
    return entity


def _lock_entity(model: type[ModelT], key: uuid_module.UUID, using: str, cursor: CursorWrapper) -> ModelT:
    """The entity, read with ``SELECT ... FOR UPDATE`` through its default manager, as
    ``select_for_update().get(uuid=key)`` reads it (``DoesNotExist`` if there is none)."""
    select = _locking_select(model, using)
    if select is None:
        return model._default_manager.using(using).select_for_update().get(uuid=key)
    return select.get(model, key, using, cursor)


@dataclass(frozen=True)
class _LockingSelect:
    """The statement ``select_for_update().get(uuid=...)`` sends for a model, compiled
    once by the ORM, and the fields of its columns: run with each call's uuid, its row
    becomes the instance through ``Model.from_db()`` as in a queryset."""

    sql: str
    attnames: tuple[str, ...]
    uuid_field: models.Field

    def get(self, model: type[ModelT], key: uuid_module.UUID, using: str, cursor: CursorWrapper) -> ModelT:
        begin = own_transaction.begin_prefix(cursor)
        cursor.execute(begin + self.sql, [self.uuid_field.get_db_prep_value(key, cursor.db)])
        if begin:
            cursor.nextset()
        rows = cursor.fetchall()
        if not rows:
            raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")  # type: ignore[attr-defined]
        if len(rows) > 1:
            raise model.MultipleObjectsReturned(  # type: ignore[attr-defined]
                f"get() returned more than one {model._meta.object_name} -- it returned {len(rows)}!"
            )
        return model.from_db(using, self.attnames, rows[0])


@functools.cache
def _locking_select(model: type[models.Model], using: str) -> _LockingSelect | None:
    """The locking read of ``model`` compiled once, when it is the same statement on
    every call and its rows need nothing but ``from_db()``; ``None`` otherwise, and every
    call goes through the ORM. Building and compiling the queryset is most of the ORM's
    cost of that read, and for a plain default manager nothing a call does can change the
    statement: only the uuid differs.

    Plain: the default manager is exactly ``models.Manager`` (a custom manager or
    queryset may filter, annotate, select related rows or load them its own way, so it
    always goes through the ORM), the statement has one parameter (the uuid), and no
    column has a from-database converter (``from_db_value()`` of a custom field, SQLite's
    UUIDs, ...). Called inside the transaction (``select_for_update()`` compiles only
    there)."""
    if type(model._default_manager) is not models.Manager:
        return None
    # What get(uuid=...) sends: no ordering, and a LIMIT where FOR UPDATE allows one.
    queryset = model._default_manager.using(using).select_for_update().filter(uuid=uuid_module.UUID(int=0))
    queryset = queryset.order_by()
    if connections[using].features.supports_select_for_update_with_limit:
        queryset.query.set_limits(high=MAX_GET_RESULTS)
    compiler = queryset.query.get_compiler(using=using)
    sql, params = compiler.as_sql()
    columns = [expression for expression, _sql, _alias in compiler.select]
    if len(params) != 1 or compiler.get_converters(columns):
        return None
    attnames = tuple(column.target.attname for column in columns)
    # The filter above compiled, so "uuid" is a concrete field.
    return _LockingSelect(sql, attnames, cast(models.Field, model._meta.get_field("uuid")))


#: Marks a field whose value was not loaded (deferred) in a snapshot.
_NOT_LOADED = object()

#: Values that cannot change without being replaced: one equal to the value loaded is
#: unchanged. Any other value (a JSONField's dict, a list, a file) may have been changed
#: in place, where no comparison with the loaded one can tell, so it is always saved.
#: (``bool`` is an ``int``, ``datetime`` a ``date``.)
_IMMUTABLE_VALUES: tuple[type, ...] = (
    str,
    int,
    float,
    Decimal,
    bytes,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid_module.UUID,
    type(None),
)

#: ``pre_save()`` of Django's own fields: none sets a value on save but for ``auto_now``
#: (checked apart); a FileField's only commits a newly assigned file, a changed value
#: anyway. A field with another ``pre_save()`` (a custom "last modified" field) may set
#: one on every save, so it is always saved, as a full ``save()`` would save it.
_PLAIN_PRE_SAVES = frozenset(
    {
        models.Field.pre_save,
        models.DateField.pre_save,
        models.DateTimeField.pre_save,
        models.TimeField.pre_save,
        models.FileField.pre_save,
    }
)


@dataclass(frozen=True)
class _SavePlan:
    """Which fields the save after a transition writes: the transition's state field,
    the fields whose value changed since the row was loaded (the transition method, the
    signal receivers, ``error_message``), and the fields whose ``pre_save()`` may set a
    new value on every save. Saving only those (``save(update_fields=...)``) builds a
    shorter UPDATE, and does not write back a stale copy of a column the transition left
    alone when code inside the same transaction changed it through another path (a
    queryset ``update()`` in a ``post_transition`` receiver), as a full-row save would.
    Computed once per model and transition."""

    #: ``(name, attname)`` of every concrete field a full ``save()`` writes, in order.
    fields: tuple[tuple[str, str], ...]
    #: Names saved whatever their value: the state field and the ``pre_save()`` ones.
    always: frozenset[str]

    def snapshot(self, entity: models.Model) -> list[Any]:
        """The values as loaded, to compare after the transition (``__dict__``: no
        descriptor runs, a deferred field is not fetched)."""
        values = entity.__dict__
        return [values.get(attname, _NOT_LOADED) for _, attname in self.fields]

    def fields_to_save(self, entity: models.Model, loaded: list[Any]) -> list[str]:
        values = entity.__dict__
        names = []
        for (name, attname), before in zip(self.fields, loaded, strict=True):
            after = values.get(attname, _NOT_LOADED)
            if after is _NOT_LOADED:  # deferred and never read: a full save() skips it too
                continue
            if name in self.always or _changed(before, after):
                names.append(name)
        return names


def _changed(before: Any, after: Any) -> bool:
    if not isinstance(after, _IMMUTABLE_VALUES):  # may have been changed in place
        return True
    return after is not before and after != before


@functools.cache
def _save_plan(model: type[models.Model], transition_name: str) -> _SavePlan:
    fields = tuple(
        field
        for field in model._meta.concrete_fields
        if not field.primary_key and not getattr(field, "generated", False)
    )
    state_field = getattr(model, transition_name)._django_fsm.field
    always = {state_field.name if isinstance(state_field, models.Field) else str(state_field)}
    always.update(field.name for field in fields if _set_by_every_save(field))
    return _SavePlan(tuple((field.name, field.attname) for field in fields), frozenset(always))


def _set_by_every_save(field: models.Field) -> bool:
    """Whether ``field.pre_save()`` may give the field a new value on any save."""
    return getattr(field, "auto_now", False) or type(field).pre_save not in _PLAIN_PRE_SAVES


def _save(entity: models.Model, using: str, update_fields: list[str], cursor: CursorWrapper) -> None:
    """``entity.save(update_fields=update_fields)``, with the UPDATE compiled once.

    For a model whose saving is Django's own (``_plain_save``) this does what
    ``save()`` does for it, in order: the related-fields check, ``pre_save``, each
    field's ``pre_save()`` and ``get_db_prep_save()``, the UPDATE by primary key (an
    error if it matched no row), the instance's ``_state``, ``post_save`` with
    ``created=False`` and the ``update_fields``. Only building and compiling the UPDATE
    is left out, when ``_update_compiled`` has the statement for these fields. A value
    that is an expression, or anything the statement was not checked for, goes through
    the ORM's own ``_save_table()`` at the same point instead.
    """
    model = type(entity)
    if not _plain_save(model):
        entity.save(using=using, update_fields=update_fields)
        return
    entity._prepare_related_fields_for_save(operation_name="save")  # type: ignore[attr-defined]
    fields = frozenset(update_fields)
    pre_save.send(sender=model, instance=entity, raw=False, using=using, update_fields=fields)
    with transaction.mark_for_rollback_on_error(using=using):
        if not _update_compiled(entity, using, fields, cursor):
            entity._save_table(cls=model, using=using, update_fields=fields)  # type: ignore[attr-defined]
    entity._state.db = using
    entity._state.adding = False
    post_save.send(sender=model, instance=entity, created=False, update_fields=fields, raw=False, using=using)


@functools.cache
def _plain_save(model: type[models.Model]) -> bool:
    """Whether saving ``model`` is Django's ``save()`` with nothing of its own: the save
    methods are ``Model``'s, the base manager is a plain ``Manager`` and the table is the
    model's only one (no proxy, no multi-table parents, no generated or composite-key
    columns, no field with a placeholder of its own). Anything else saves through
    ``save()``."""
    meta = model._meta
    own = ("save", "save_base", "_save_table", "_do_update", "_prepare_related_fields_for_save")
    return (
        all(getattr(model, name) is getattr(models.Model, name) for name in own)
        and type(model._base_manager) is models.Manager
        and not (meta.proxy or meta.parents or meta.auto_created)
        and len(getattr(meta, "pk_fields", [meta.pk])) == 1
        and not any(getattr(field, "generated", False) for field in meta.concrete_fields)
        and not any(hasattr(field, "get_placeholder") for field in meta.local_concrete_fields)
    )


def _update_compiled(
    entity: models.Model, using: str, update_fields: frozenset[str], cursor: CursorWrapper
) -> bool:
    """Run the UPDATE of ``update_fields`` by primary key as the ORM would send it,
    from a statement compiled once; ``False`` (nothing sent) where the ORM must build it.

    The values are prepared as ``SQLUpdateCompiler`` prepares them (``pre_save()``,
    ``get_db_prep_save()``). A ``None`` is a ``NULL`` written in the statement (Django
    5.2, 6.0) or a parameter (6.1): the statement is compiled once per set of fields and
    of ``None`` values, and its first compilation is checked: the ORM's parameters for
    that call must be the values computed here (with or without the ``None`` ones), or
    that statement is never used."""
    model = type(entity)
    connection = cursor.db
    columns = [field for field in model._meta.local_concrete_fields if field.name in update_fields]
    values = [field.pre_save(entity, False) for field in columns]
    params = []
    for field, value in zip(columns, values, strict=True):
        if hasattr(value, "resolve_expression") or hasattr(value, "prepare_database_save"):
            return False
        prepared = _db_value(field, value, connection)
        if hasattr(prepared, "as_sql"):
            return False
        params.append(prepared)
    pk_field = model._meta.pk
    params.append(pk_field.get_db_prep_value(pk_field.get_prep_value(entity.pk), connection, prepared=True))
    key = (model, using, tuple(field.name for field in columns), tuple(p is None for p in params))
    compiled = _update_statements.get(key, _NOT_COMPILED)
    if compiled is _NOT_COMPILED:
        compiled = _update_statements[key] = _compile_update(entity, using, columns, values, params)
    if compiled is None:
        return False
    statement, nulls_are_parameters = compiled
    cursor.execute(statement, params if nulls_are_parameters else [p for p in params if p is not None])
    updated = cursor.rowcount
    if not updated:
        error = getattr(model, "NotUpdated", DatabaseError)  # Django 6.1's, a DatabaseError
        raise error("Save with update_fields did not affect any rows.")
    return True


_NOT_COMPILED: Any = object()
#: (model, database, fields, which values are None) -> (the UPDATE, whether its NULLs are
#: parameters), or None: use the ORM.
_update_statements: dict[tuple[Any, ...], tuple[str, bool] | None] = {}


def _compile_update(
    entity: models.Model, using: str, columns: list[models.Field], values: list[Any], params: list[Any]
) -> tuple[str, bool] | None:
    """The UPDATE that ``filter(pk=...)._update(...)`` sends for these fields and values
    (as ``pre_save()`` gave them), if its parameters are ``params`` (``True``) or
    ``params`` without the ``None`` ones (``False``)."""
    model = type(entity)
    queryset = model._base_manager.using(using).filter(pk=entity.pk)
    query = cast(UpdateQuery, queryset.query.chain(UpdateQuery))
    query.add_update_fields([(field, None, value) for field, value in zip(columns, values, strict=True)])
    query.annotations = {}
    compiler = query.get_compiler(using=using)
    sql, orm_params = compiler.as_sql()
    if query.get_related_updates():
        return None
    if list(orm_params) == params:
        return sql, True
    if list(orm_params) == [p for p in params if p is not None]:
        return sql, False
    return None


def _write_history(
    entity: models.Model,
    using: str,
    cursor: CursorWrapper,
    *,
    transition_name: str,
    source_state: str,
    origin: TransitionOrigin,
    error_message: str,
) -> None:
    """Insert the transition's TransitionRecord: the last statement of the transition's
    transaction (in a transaction of its own, sent with the ``COMMIT``).

    The row is this app's own, written by nothing else, and its INSERT is the same
    statement every time: it is compiled once per database (``_history_insert``) and run
    with this record's values, prepared by the fields as Django's compiler prepares
    them. What ``save()`` adds around an insert is left out, as a new history row has
    no use for it: the parents and related-fields checks, the ``RETURNING`` of its id
    (nobody reads it), the ``pre_save``/``post_save`` signals.
    """
    content_type = _content_types(using).get_for_model(entity, for_concrete_model=False)
    values = {
        "content_type_id": content_type.pk,
        "object_id": str(entity.pk),
        "entity_uuid": getattr(entity, "uuid", None),
        "transition": transition_name,
        "source_state": source_state,
        "target_state": entity.state,  # type: ignore[attr-defined]
        "task_name": origin.task_name,
        "task_id": origin.task_id,
        "error_message": error_message,
    }
    if origin.user is not None:
        record = TransitionRecord(**values)
        record.user = origin.user  # checks the user's type and database, as create() did
        values["user_id"] = record.user_id
    statement, fields = _history_insert(using)
    # What a new TransitionRecord(**values) holds, read without building one: its fields'
    # pre_save() return the value as it is (_history_insert checks).
    params = [
        _db_value(field, values[field.attname] if field.attname in values else field.get_default(), cursor.db)
        for field in fields
    ]
    # The transaction's last statement: in a transaction of its own, the COMMIT goes with it.
    cursor.execute(statement + own_transaction.commit_suffix(cursor), params)


def _db_value(field: models.Field, value: Any, connection: Any) -> Any:
    """``field.get_db_prep_save(value, connection)``; a ``str`` for a text field that
    prepares values as ``CharField`` or ``TextField`` do is that ``str`` (it saves a
    handful of calls per value on the hot path)."""
    field_class: Any = type(field)  # a class is hashable; the stubs' Field type says not
    if type(value) is str and _str_is_its_db_value(field_class):
        return value
    return field.get_db_prep_save(value, connection)


@functools.cache
def _str_is_its_db_value(field_class: Any) -> bool:
    """Whether ``get_db_prep_save()`` of a ``str`` returns it unchanged for this field
    class: a ``CharField`` or ``TextField`` (django-fsm's ``FSMField`` is one) that
    overrides none of the methods it goes through."""
    for text_field in (models.CharField, models.TextField):
        if issubclass(field_class, text_field) and all(
            getattr(field_class, name) is getattr(text_field, name)
            for name in ("get_db_prep_save", "get_db_prep_value", "get_prep_value", "to_python")
        ):
            return True
    return False


@functools.cache
def _content_types(using: str) -> Any:
    """``ContentType.objects`` on the database ``using`` (``db_manager()`` copies the
    manager on each call; the copies share its cache)."""
    return ContentType.objects.db_manager(using)


@functools.cache
def _history_insert(using: str) -> tuple[str, tuple[models.Field, ...]]:
    """The INSERT of one TransitionRecord as Django's compiler writes it for the
    database ``using`` (no RETURNING), and the fields of its parameters, in order."""
    fields = tuple(field for field in TransitionRecord._meta.local_concrete_fields if not field.primary_key)
    assert not any(_set_by_every_save(field) or getattr(field, "auto_now_add", False) for field in fields)
    query = InsertQuery(TransitionRecord)
    query.insert_values(fields, [TransitionRecord()])
    [(statement, _)] = query.get_compiler(using=using).as_sql()
    return statement, fields


def _load_unchanged(
    model: type[ModelT], entity_uuid: uuid_module.UUID, transition_name: str, applied: Application
) -> ModelT:
    """Load the entity for a re-run whose transition was applied by an earlier run of the
    same message: it must still be in the state that run left it in, set by that run
    (not set again since by another task). Read from the primary, never a replica."""
    entity = _load_from_primary(model, entity_uuid)
    now = Application.of(entity)
    moved = now.state != applied.state
    if moved or (applied.changed_at is not None and now.changed_at != applied.changed_at):
        since = "moved to" if moved else "left it and come back to"
        raise TransitionNotPermitted(
            f"{model._meta.label} {entity_uuid}: transition {transition_name!r} was applied by an earlier "
            f"run of this task (to {applied.state!r}), but the entity has since {since} {now.state!r}",
            uuid=entity_uuid,
            state=now.state,
            transition=transition_name,
        )
    return entity


def _load_from_primary(model: type[ModelT], entity_uuid: uuid_module.UUID) -> ModelT:
    try:
        return model._default_manager.using(router.db_for_write(model)).get(uuid=entity_uuid)
    except model.DoesNotExist:  # type: ignore[attr-defined]
        raise EntityNotFound(
            f"{model._meta.label} with uuid {entity_uuid} does not exist", uuid=entity_uuid
        ) from None


def _applied_by_this_message(
    model: type[ModelT], entity_uuid: uuid_module.UUID, transition_name: str, task: Task | None
) -> ModelT | None:
    """The entity, if durable state shows that this very message (same task id) applied
    the transition and nothing has changed the entity since: a message redelivered after
    its worker died (``acks_late``) resumes instead of failing its own transition. Needs
    the transition history; without it, ``None``."""
    if task is None or not task.request.id or not get_setting("TRANSITION_HISTORY"):
        return None
    using = router.db_for_write(model)
    entity = _load_from_primary(model, entity_uuid)
    latest = TransitionRecord.objects.db_manager(using).for_entity(entity).first()
    if (
        latest is None
        or latest.task_id != str(task.request.id)
        or latest.transition != transition_name
        or latest.target_state != entity.state  # type: ignore[attr-defined]
    ):
        return None
    logger.warning(
        "%s %s: transition %r was applied by an earlier delivery of task %s (redelivered); resuming",
        model._meta.label,
        entity_uuid,
        transition_name,
        task.request.id,
    )
    return entity


def format_error(exc: BaseException) -> str:
    """The error text stored in ``error_message``: exception type and message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def apply_error_transition(
    model: type[models.Model],
    entity_uuid: uuid_module.UUID | str,
    transition_name: str,
    error: BaseException | str,
    origin: TransitionOrigin | None = None,
) -> models.Model | None:
    """Apply an error transition recording ``error``; log instead of raising.

    Used while another exception is already on its way out: failing here must not mask
    it. Returns the entity, or ``None`` when the transition could not be applied.
    """
    message = error if isinstance(error, str) else format_error(error)
    try:
        return apply_transition(model, entity_uuid, transition_name, error_message=message, origin=origin)
    except Exception:
        logger.exception(
            "Could not apply error transition %r to %s %s (error was: %s)",
            transition_name,
            model._meta.label,
            entity_uuid,
            message,
        )
        return None


def _check_entity_parameter(
    func: Callable[..., Any], model: type[models.Model], transition_name: str
) -> None:
    """The body must take ``transition_entity`` by keyword, and no positional argument
    may land in it (that would be found out only after the transition was saved)."""
    parameters = list(inspect.signature(func).parameters.values())
    for index, parameter in enumerate(parameters):
        if parameter.name != ENTITY_ARGUMENT:
            continue
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            break
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and any(
            later.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            for later in parameters[index + 1 :]
        ):
            raise ImproperlyDecorated(
                f"{func.__qualname__}: {ENTITY_ARGUMENT!r} must be the last positional parameter "
                "(or keyword-only): a positional argument after the uuid would land in it"
            )
        return
    else:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return
    raise ImproperlyDecorated(
        f"{func.__qualname__} must accept a {ENTITY_ARGUMENT!r} keyword argument "
        f"to be decorated with transition({model.__name__}, {transition_name!r})"
    )


def transition(
    model: type[models.Model],
    transition_name: str,
    *,
    on_error: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a task body so it runs only after ``transition_name`` was applied.

    The task's first positional argument (after ``self`` for ``bind=True`` tasks) is
    the entity's uuid. The body gets ``transition_entity=`` the saved instance; the row
    lock is released before the body runs. If the body raises, ``on_error`` (e.g.
    ``"set_erred"``) is applied with the error text and the exception re-raised;
    Celery's ``Retry``, ``Ignore`` and ``Reject`` are not errors.

    Misuse fails at import time: an unknown transition or ``on_error`` name, or a body
    that does not accept ``transition_entity``.
    """
    check_transition_name(model, transition_name)
    if on_error is not None:
        check_transition_name(model, on_error)

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(func):
            raise ImproperlyDecorated(f"transition() decorates a function, got {func!r}")
        if isinstance(func, Task):
            raise ImproperlyDecorated(
                f"transition() must be placed under @shared_task, not above it ({func.name})"
            )
        _check_entity_parameter(func, model, transition_name)
        # Celery checks call arguments against the signature: hide the injected one.
        signature = inspect.signature(func)
        public_signature = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != ENTITY_ARGUMENT]
        )
        # Whether a call binds depends only on how many positional arguments it has and
        # which keywords: the shapes that bound once are not bound again.
        bound_shapes: set[tuple[int, frozenset[str]]] = set()

        @functools.wraps(func)
        def run_with_transition(*args: Any, **kwargs: Any) -> Any:
            # bind=True tasks get the task instance first; the uuid follows it.
            uuid_index = 1 if args and isinstance(args[0], Task) else 0
            if len(args) <= uuid_index:
                raise TypeError(
                    f"{func.__qualname__}: the entity uuid must be the first positional "
                    f"argument (transition {model._meta.label}.{transition_name})"
                )
            entity_uuid = args[uuid_index]
            kwargs.pop(ENTITY_ARGUMENT, None)
            # Refuse a malformed call before anything is written.
            shape = (len(args), frozenset(kwargs))
            if shape not in bound_shapes:
                try:
                    public_signature.bind(*args, **kwargs)
                except TypeError as exc:
                    raise TypeError(f"{func.__qualname__}: {exc}") from None
                bound_shapes.add(shape)
            task = running_task(run_with_transition)
            key = parse_entity_uuid(model, entity_uuid)
            marker_key = _marker_key(model, key, transition_name)
            applied = _applied(task, marker_key)
            if applied is None:
                # Without a task of its own the body may run inside another task's:
                # apply_transition then attributes it to whichever task is running.
                origin = None if task is None else TransitionOrigin.of_task(task)
                try:
                    entity = apply_transition(model, key, transition_name, origin=origin)
                except TransitionNotPermitted:
                    resumed = _applied_by_this_message(model, key, transition_name, task)
                    if resumed is None:
                        raise
                    entity = resumed
                _record_applied(task, marker_key, Application.of(entity))
            else:
                entity = _load_unchanged(model, key, transition_name, applied)
            try:
                return func(*args, **kwargs, **{ENTITY_ARGUMENT: entity})
            except CONTROL_FLOW_EXCEPTIONS:
                raise
            except Exception as exc:
                # An attempt that Celery retries is not the task's failure: the error
                # transition waits for the final one (retries exhausted, or not retried).
                if on_error is not None and not (task is not None and celery_will_retry(task, exc)):
                    apply_error_transition(model, key, on_error, exc)
                raise

        run_with_transition.__signature__ = public_signature  # type: ignore[attr-defined]
        run_with_transition.task_workflow_transition = (model, transition_name, on_error)  # type: ignore[attr-defined]
        return run_with_transition

    return decorator
