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
from .running import running_task

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


def _applied_state(task: Task | None, marker_key: str) -> str | None:
    """The state an earlier run of this message left the entity in, if it applied the
    transition already."""
    if task is None:
        return None
    applied = (task.request.headers or {}).get(APPLIED_TRANSITIONS_HEADER) or {}
    state = applied.get(marker_key)
    return state if isinstance(state, str) else None


def _record_applied(task: Task | None, marker_key: str, state: str) -> None:
    if task is None:
        return
    headers = dict(task.request.headers or {})
    headers[APPLIED_TRANSITIONS_HEADER] = {
        **(headers.get(APPLIED_TRANSITIONS_HEADER) or {}),
        marker_key: state,
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
    ``InvalidEntityUuid``, ``EntityNotFound`` or ``TransitionNotPermitted``; in every
    failure case nothing is written. ``error_message`` is stored on models that have
    that field (error transitions). Unless ``TASK_WORKFLOW['TRANSITION_HISTORY']`` is off,
    a :class:`~task_workflow.models.TransitionRecord` is written in the same transaction,
    attributed to ``origin`` (default: the running Celery task, if any).
    """
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
    model: type[ModelT], entity_uuid: uuid_module.UUID | str, transition_name: str, applied_state: str
) -> ModelT:
    """Load the entity for a re-run whose transition was applied by an earlier run; it
    must still be in the state that run left it in."""
    key = parse_entity_uuid(model, entity_uuid)
    try:
        entity = model._default_manager.get(uuid=key)
    except model.DoesNotExist:  # type: ignore[attr-defined]
        raise EntityNotFound(f"{model._meta.label} with uuid {key} does not exist", uuid=key) from None
    state = entity.state  # type: ignore[attr-defined]
    if state != applied_state:
        raise TransitionNotPermitted(
            f"{model._meta.label} {key}: transition {transition_name!r} was applied by an earlier run "
            f"of this task (to {applied_state!r}), but the entity has since moved to {state!r}",
            uuid=key,
            state=state,
            transition=transition_name,
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
            applied_state = _applied_state(task, marker_key)
            if applied_state is None:
                entity = apply_transition(model, key, transition_name)
                _record_applied(task, marker_key, entity.state)  # type: ignore[attr-defined]
            else:
                entity = _load_unchanged(model, key, transition_name, applied_state)
            try:
                return func(*args, **kwargs, **{ENTITY_ARGUMENT: entity})
            except CONTROL_FLOW_EXCEPTIONS:
                raise
            except Exception as exc:
                if on_error is not None:
                    apply_error_transition(model, key, on_error, exc)
                raise

        run_with_transition.__signature__ = public_signature  # type: ignore[attr-defined]
        run_with_transition.task_workflow_transition = (model, transition_name, on_error)  # type: ignore[attr-defined]
        return run_with_transition

    return decorator
