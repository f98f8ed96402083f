"""Apply django-fsm transitions to rows under a lock, and the ``transition`` task decorator.

The decorator is stacked under ``@shared_task``::

    @shared_task(name="example.stop_instance")
    @transition(Instance, "begin_stopping", on_error="set_erred")
    def stop_instance(instance_uuid, transition_entity=None): ...

At run time it locks the row (``SELECT … FOR UPDATE``), applies the transition, saves,
commits, and only then calls the body with ``transition_entity=`` the saved instance.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid as uuid_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from django.db import models, router, transaction
from django_fsm import TransitionNotAllowed

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
    def from_running_task(cls) -> TransitionOrigin:
        task = running_task()
        if task is None:
            return cls()
        return cls(task_name=str(task.name), task_id=str(task.request.id or ""))


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
    """
    check_transition_name(model, transition_name)
    key = parse_entity_uuid(model, entity_uuid)
    using = router.db_for_write(model)
    with transaction.atomic(using=using):
        try:
            entity = model._default_manager.using(using).select_for_update().get(uuid=key)
        except model.DoesNotExist:  # type: ignore[attr-defined]
            raise EntityNotFound(f"{model._meta.label} with uuid {key} does not exist", uuid=key) from None
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
        entity.save()
        if get_setting("TRANSITION_HISTORY"):
            origin = origin or TransitionOrigin.from_running_task()
            TransitionRecord.objects.db_manager(using).record(
                entity,
                transition=transition_name,
                source_state=current_state,
                target_state=entity.state,  # type: ignore[attr-defined]
                task_name=origin.task_name,
                task_id=origin.task_id,
                user=origin.user,
                error_message=error_message or "",
            )
    return entity


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
            try:
                public_signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{func.__qualname__}: {exc}") from None
            task = running_task(run_with_transition)
            key = parse_entity_uuid(model, entity_uuid)
            marker_key = _marker_key(model, key, transition_name)
            applied = _applied(task, marker_key)
            if applied is None:
                try:
                    entity = apply_transition(model, key, transition_name)
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
