"""The ``transition`` task decorator.

It is stacked under ``@shared_task``::

    @shared_task(name="example.stop_instance")
    @transition(Instance, "begin_stopping", on_error="set_erred")
    def stop_instance(instance_uuid, transition_entity=None): ...

At run time it applies the transition (:func:`~task_workflow.apply.apply_transition`:
row lock, save, commit) and only then calls the body with ``transition_entity=`` the
saved instance. A re-run of the same message checks the entity instead of applying the
transition again (:mod:`task_workflow.redelivery`).

A transition that is not allowed (a duplicate message, an entity that moved on) is an
expected refusal, not a crash: the task is told so through Celery's public ``Task.throws``
(Celery then logs its failure at INFO, "raised expected", without a traceback) and the
decorator logs one WARNING line naming the entity, its state, the transition and the
task; or, with ``if_not_permitted="ignore"``, the message is dropped (Celery's ``Ignore``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from django.db import models

from .apply import apply_error_transition, apply_transition
from .conf import IF_NOT_PERMITTED_CHOICES, get_setting
from .entities import check_transition_name, parse_entity_uuid
from .exceptions import ImproperlyDecorated, TransitionNotPermitted
from .history import TransitionOrigin
from .redelivery import (
    APPLIED_TRANSITIONS_HEADER,
    Application,
    applied_by_this_message,
    applied_earlier,
    load_unchanged,
    marker_key,
    record_applied,
)
from .running import celery_will_retry, running_task

# The decorator, and names kept importable from here, where they were defined before
# the modules of a transition were split out (the admin, commands and projects import
# them from this module).
__all__ = [
    "APPLIED_TRANSITIONS_HEADER",
    "Application",
    "TransitionOrigin",
    "apply_error_transition",
    "apply_transition",
    "check_transition_name",
    "parse_entity_uuid",
    "transition",
]

#: Celery raises these to steer a task (re-queue, drop, reject); they are not failures
#: of the body and must never move the entity to its error state.
CONTROL_FLOW_EXCEPTIONS: tuple[type[BaseException], ...] = (Retry, Ignore, Reject)

ENTITY_ARGUMENT = "transition_entity"

logger = logging.getLogger(__name__)

#: What a ``@transition`` task does with a message whose transition is not allowed.
IfNotPermitted = Literal["fail", "ignore"]


def _expect_refusals(task: Task) -> None:
    """Add ``TransitionNotPermitted`` to the task's ``throws`` (Celery's documented list
    of expected errors: logged at INFO without a traceback, still a FAILURE)."""
    throws = tuple(task.throws or ())
    if not any(issubclass(TransitionNotPermitted, expected) for expected in throws):
        task.throws = (*throws, TransitionNotPermitted)


def _entity_text(exc: TransitionNotPermitted) -> str:
    """`` ('<str>')`` of the refused entity when its model defines ``__str__`` (the row is
    already loaded; the default "Model object (pk)" adds nothing), else ``""``."""
    entity = getattr(exc, "object", None)
    if entity is None or type(entity).__str__ is models.Model.__str__:
        return ""
    try:
        return f" ({str(entity)!r})"
    except Exception:  # a __str__ that fails must not hide the refusal
        return ""


def _refuse(
    task: Task, exc: TransitionNotPermitted, model: type[models.Model], if_not_permitted: str
) -> None:
    """Log the refusal of the task's own transition, then raise ``Ignore`` ("ignore") or
    return for the caller to re-raise ``exc`` ("fail")."""
    exc.refused_message = True
    action = (
        "the message is dropped (if_not_permitted='ignore')"
        if if_not_permitted == "ignore"
        else "the task fails with TransitionNotPermitted"
    )
    arguments = (
        task.name,
        task.request.id,
        model._meta.label,
        exc.uuid,
        _entity_text(exc),
        exc.state,
        exc.transition,
        action,
    )
    line = (
        "Task %s[%s] refused: %s %s%s is in state %r, where transition %r is not allowed "
        "(a duplicate message, or the entity moved on); %s"
    )
    if if_not_permitted == "ignore":
        logger.debug(line, *arguments)
        raise Ignore() from exc
    _expect_refusals(task)
    logger.warning(line, *arguments)


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
    if_not_permitted: IfNotPermitted | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a task body so it runs only after ``transition_name`` was applied.

    The task's first positional argument (after ``self`` for ``bind=True`` tasks) is
    the entity's uuid. The body gets ``transition_entity=`` the saved instance; the row
    lock is released before the body runs. If the body raises, ``on_error`` (e.g.
    ``"set_erred"``) is applied with the error text and the exception re-raised;
    Celery's ``Retry``, ``Ignore`` and ``Reject`` are not errors.

    When the transition is not allowed from the entity's state (a duplicate message, an
    entity that moved on), the body does not run and nothing is written; then
    ``if_not_permitted`` (default: ``TASK_WORKFLOW['IF_NOT_PERMITTED']``, ``"fail"``) says
    what happens to the message:

    - ``"fail"``: the task fails with ``TransitionNotPermitted`` (FAILURE, a chain stops),
      logged as one WARNING line (entity, state, transition, task name and id) and by
      Celery at INFO as an expected error, without a traceback. An
      :func:`~task_workflow.tasks.error_transition` errback leaves the entity as it is.
    - ``"ignore"``: the message is acknowledged and dropped through Celery's ``Ignore``: no
      result is stored, no errback runs, task_workflow logs it at DEBUG only.

    Misuse fails at import time: an unknown transition or ``on_error`` name, an
    ``if_not_permitted`` other than ``"fail"`` or ``"ignore"``, or a body that does not
    accept ``transition_entity``.
    """
    check_transition_name(model, transition_name)
    if on_error is not None:
        check_transition_name(model, on_error)
    if if_not_permitted is not None and if_not_permitted not in IF_NOT_PERMITTED_CHOICES:
        raise ImproperlyDecorated(
            f"transition({model.__name__}, {transition_name!r}): if_not_permitted must be one of "
            f"{', '.join(map(repr, IF_NOT_PERMITTED_CHOICES))} (or None for "
            f"TASK_WORKFLOW['IF_NOT_PERMITTED']), got {if_not_permitted!r}"
        )

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
            applied_key = marker_key(model, key, transition_name)
            applied = applied_earlier(task, applied_key)
            try:
                if applied is None:
                    # Without a task of its own the body may run inside another task's:
                    # apply_transition then attributes it to whichever task is running.
                    origin = None if task is None else TransitionOrigin.of_task(task)
                    try:
                        entity = apply_transition(model, key, transition_name, origin=origin)
                    except TransitionNotPermitted:
                        resumed = applied_by_this_message(model, key, transition_name, task)
                        if resumed is None:
                            raise
                        entity = resumed
                    record_applied(task, applied_key, Application.of(entity))
                else:
                    entity = load_unchanged(model, key, transition_name, applied)
            except TransitionNotPermitted as exc:
                if task is not None:
                    _refuse(task, exc, model, if_not_permitted or get_setting("IF_NOT_PERMITTED"))
                raise
            try:
                return func(*args, **kwargs, **{ENTITY_ARGUMENT: entity})
            except CONTROL_FLOW_EXCEPTIONS:
                raise
            except Exception as exc:
                if isinstance(exc, TransitionNotPermitted) and task is not None:
                    # Not this message's refusal but the body's failure: logged here with
                    # its traceback, since the task's throws (set here, as on a refusal)
                    # has Celery log it without one.
                    _expect_refusals(task)
                    logger.error(
                        "Task %s[%s]: its body raised TransitionNotPermitted",
                        task.name,
                        task.request.id,
                        exc_info=True,
                    )
                # An attempt that Celery retries is not the task's failure: the error
                # transition waits for the final one (retries exhausted, or not retried).
                if on_error is not None and not (task is not None and celery_will_retry(task, exc)):
                    apply_error_transition(model, key, on_error, exc)
                raise

        run_with_transition.__signature__ = public_signature  # type: ignore[attr-defined]
        run_with_transition.task_workflow_transition = (model, transition_name, on_error)  # type: ignore[attr-defined]
        return run_with_transition

    return decorator
