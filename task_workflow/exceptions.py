"""Exceptions raised by task_workflow.

Each takes its message as the only positional argument and its details as keywords,
so Celery can rebuild it from a JSON result (``cls(message)``) on the client side.
"""

from __future__ import annotations

import uuid as uuid_module
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django_fsm import TransitionNotAllowed


class TaskWorkflowError(Exception):
    """Base class of task_workflow's own errors."""


class InvalidEntityUuid(TaskWorkflowError, ValueError):
    """The value given as an entity's uuid is not a UUID; ``value`` holds it."""

    def __init__(self, message: str, *, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


class EntityNotFound(TaskWorkflowError, ObjectDoesNotExist):
    """No row of the model has the given uuid."""

    def __init__(self, message: str, *, uuid: uuid_module.UUID | None = None) -> None:
        super().__init__(message)
        self.uuid = uuid


class TransitionNotPermitted(TaskWorkflowError, TransitionNotAllowed):
    """The transition cannot proceed from the entity's current state.

    A subclass of django-fsm's ``TransitionNotAllowed``. ``uuid``, ``state`` and
    ``transition`` say which entity, where it was and what was refused.
    ``refused_message`` is ``True`` when a ``@transition`` task refused its own message
    with it (its body did not run, nothing was written): the error callback of
    :func:`~task_workflow.tasks.error_transition` then leaves that entity as it is.
    """

    #: Set by the ``transition`` decorator on the refusal of its task's own transition.
    refused_message: bool = False

    def __init__(
        self,
        message: str,
        *,
        uuid: uuid_module.UUID | None = None,
        state: str | None = None,
        transition: str | None = None,
        **fsm_kwargs: Any,
    ) -> None:
        super().__init__(message, **fsm_kwargs)
        self.uuid = uuid
        self.state = state
        self.transition = transition


class ImproperlyDecorated(TaskWorkflowError, TypeError):
    """A task decorator was applied to something it cannot work with."""
