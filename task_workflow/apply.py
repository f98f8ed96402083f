"""Apply a django-fsm transition to one row, under its lock, in one transaction."""

from __future__ import annotations

import logging
import uuid as uuid_module
from collections.abc import Mapping
from typing import Any, TypeVar

from django.db import models, router, transaction
from django_fsm import TransitionNotAllowed

from .conf import get_setting
from .entities import check_transition_name, parse_entity_uuid
from .exceptions import EntityNotFound, TransitionNotPermitted
from .history import TransitionOrigin, record_transition
from .save_plan import plan_save

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=models.Model)


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

    Runs in its own transaction (``transaction.atomic()``; a savepoint inside an outer
    one) on the model's write database: the row is read with
    ``select_for_update().get(uuid=...)`` through the model's default manager, the
    django-fsm method is called (with ``method_kwargs``), the entity saved and, unless
    ``TASK_WORKFLOW['TRANSITION_HISTORY']`` is off, a
    :class:`~task_workflow.models.TransitionRecord` written, attributed to ``origin``
    (default: the running Celery task, if any). ``error_message`` is stored on models
    that have that field (error transitions).

    Raises ``ImproperlyDecorated`` (no such transition), ``InvalidEntityUuid``,
    ``EntityNotFound`` or ``TransitionNotPermitted``, and any database error as it is (a
    lock timeout, a connection lost while waiting for the lock); in every failure case
    nothing is written.

    The save is ``save(update_fields=...)`` of the fields that need it: the state field,
    every field whose value differs from the row as loaded once the transition method and
    django-fsm's signal receivers have run (``error_message``, ``state_changed_at``, any
    field the method sets), every field holding a mutable value (a JSONField's dict: it
    may have been changed in place), and every field whose ``pre_save()`` may set a value
    (``auto_now``, custom fields). A model's own ``save()`` or a ``pre_save`` receiver
    that sets further fields must add them to ``update_fields``, as Django asks of any
    ``save(update_fields=...)``.
    """
    check_transition_name(model, transition_name)
    key = parse_entity_uuid(model, entity_uuid)
    plan = plan_save(model, transition_name)
    using = router.db_for_write(model)
    with transaction.atomic(using=using):
        try:
            entity = model._default_manager.using(using).select_for_update().get(uuid=key)
        except model.DoesNotExist:  # type: ignore[attr-defined]
            raise EntityNotFound(entity_not_found_message(model, key), uuid=key) from None
        loaded = plan.snapshot(entity)
        source_state = entity.state  # type: ignore[attr-defined]
        if error_message is not None and hasattr(entity, "error_message"):
            entity.error_message = error_message
        try:
            getattr(entity, transition_name)(**(method_kwargs or {}))
        except TransitionNotAllowed as exc:
            raise TransitionNotPermitted(
                f"{model._meta.label} {key}: transition {transition_name!r} is not allowed "
                f"from state {source_state!r} ({exc})",
                uuid=key,
                state=source_state,
                transition=transition_name,
                object=entity,
                method=getattr(entity, transition_name),
            ) from exc
        entity.save(using=using, update_fields=plan.fields_to_save(entity, loaded))
        if get_setting("TRANSITION_HISTORY"):
            record_transition(
                entity,
                using,
                transition_name=transition_name,
                source_state=source_state,
                origin=origin or TransitionOrigin.from_running_task(),
                error_message=error_message or "",
            )
    return entity


def entity_not_found_message(model: type[models.Model], entity_uuid: uuid_module.UUID) -> str:
    """The text of :class:`EntityNotFound`: the row is missing, or not committed yet (the
    usual cause in a worker: the caller sent the task inside the transaction that creates
    the row, and the worker ran before the commit)."""
    return (
        f"{model._meta.label} with uuid {entity_uuid} does not exist, or is not committed yet: "
        "a task sent inside the transaction that creates the row can run before that commit. "
        "Send it once the transaction is committed: transaction.on_commit(lambda: "
        "task.delay(...)) or task.delay_on_commit(...)"
    )


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

    ``error`` being the refusal of a ``@transition`` task's own message for this very entity
    (``TransitionNotPermitted`` with ``refused_message``: a duplicate message, an entity that
    moved on) leaves the entity as it is and returns ``None``: that task wrote nothing, and
    the entity belongs to whoever moved it on.
    """
    if (
        isinstance(error, TransitionNotPermitted)
        and error.refused_message
        and str(error.uuid) == str(entity_uuid)
    ):
        logger.info(
            "Not applying error transition %r to %s %s: the failed task was refused its transition "
            "%r from state %r and changed nothing",
            transition_name,
            model._meta.label,
            entity_uuid,
            error.transition,
            error.state,
        )
        return None
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
