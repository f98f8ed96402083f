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


class FencedWriteRefused(TaskWorkflowError):
    """A fenced write was refused: the row has seen a newer holder, or the lease is gone.

    ``reason`` is one of:

    - ``"older token"``: the row holds a larger fencing token than the lease's (a newer
      holder has written since: this holder is stale);
    - ``"same token, other owner"``: the row holds the lease's token written by another
      owner (two holders were granted one token: only the first to write may go on);
    - ``"lease lost"``: ``lease.lost`` was already true, so nothing was sent (the store may
      have given the slot away; the newer holder may not have written yet);
    - ``"lease released"``: the lease was released before the write, so nothing was sent.

    ``model`` is the model's label, ``pk`` the row's primary key (for a queryset: the row
    holding the newest token), ``fencing_token`` and ``owner`` the lease's,
    ``stored_fencing_token`` and ``stored_owner`` what the row held when read just after
    the refusal (``None`` when nothing was sent).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        model: str | None = None,
        pk: Any = None,
        fencing_token: int | None = None,
        owner: str | None = None,
        stored_fencing_token: int | None = None,
        stored_owner: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.model = model
        self.pk = pk
        self.fencing_token = fencing_token
        self.owner = owner
        self.stored_fencing_token = stored_fencing_token
        self.stored_owner = stored_owner
