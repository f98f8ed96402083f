"""Public API: the task decorators and the ready-made error callback.

Import them from here::

    from task_workflow.tasks import transition, error_transition
"""

from __future__ import annotations

import uuid as uuid_module
from typing import Any

from celery import shared_task
from celery.canvas import Signature
from django.apps import apps
from django.db import models

from .exceptions import (
    EntityNotFound,
    FencedWriteRefused,
    ImproperlyDecorated,
    InvalidEntityUuid,
    TaskWorkflowError,
    TransitionNotPermitted,
)
from .throttle import ThrottleTimeout, ThrottleUnavailable, throttle
from .transitions import (
    TransitionOrigin,
    apply_error_transition,
    apply_transition,
    check_transition_name,
    parse_entity_uuid,
    transition,
)

__all__ = [
    "EntityNotFound",
    "FencedWriteRefused",
    "ImproperlyDecorated",
    "InvalidEntityUuid",
    "TaskWorkflowError",
    "ThrottleTimeout",
    "ThrottleUnavailable",
    "TransitionNotPermitted",
    "TransitionOrigin",
    "apply_transition",
    "error_transition",
    "on_task_failure",
    "throttle",
    "transition",
]


@shared_task(name="task_workflow.on_task_failure")
def on_task_failure(
    request: Any,
    exc: BaseException,
    traceback: Any,
    model_label: str,
    entity_uuid: str,
    transition_name: str = "set_erred",
) -> None:
    """Errback: move the entity to its error state with the failed task's error text.

    Celery calls an errback that takes ``(request, exc, traceback)`` in the worker that
    ran the failed task, with the live exception, so the text does not depend on the
    result backend. Build it with :func:`error_transition`.
    """
    model = apps.get_model(model_label)
    # The history names the task that failed, not this callback.
    origin = TransitionOrigin(
        task_name=str(getattr(request, "task", "") or ""), task_id=str(request.id or "")
    )
    apply_error_transition(model, entity_uuid, transition_name, exc, origin=origin)


def error_transition(
    model: type[models.Model],
    entity_uuid: uuid_module.UUID | str,
    transition_name: str = "set_erred",
) -> Signature:
    """A ``link_error=`` signature that applies ``transition_name`` when a task fails.

    Example::

        backend_call.apply_async(args=(...), link=done.si(uuid),
                                 link_error=error_transition(Instance, uuid))
    """
    check_transition_name(model, transition_name)
    # Checked now, where the mistake is made, not when the errback runs after a failure.
    key = parse_entity_uuid(model, entity_uuid)
    return on_task_failure.s(model._meta.label, str(key), transition_name)
