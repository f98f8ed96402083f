"""A message run again after it applied its transition: re-queued or redelivered.

A re-queue (``self.retry()``, Celery's autoretry, a busy throttle) resends the request's
headers: the first run records what it applied there, and the re-run checks that the
entity is still as that run left it. A message redelivered after its worker died
(``acks_late``) has no such header; the transition history tells whether this very
message applied the transition.
"""

from __future__ import annotations

import logging
import uuid as uuid_module
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Task
from django.db import models, router

from .apply import entity_not_found_message
from .conf import get_setting
from .exceptions import EntityNotFound, TransitionNotPermitted
from .models import TransitionRecord

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=models.Model)

#: Message header recording transitions already applied by an earlier run of the same
#: task message. Re-queues (``self.retry()``, a busy throttle) resend the request's
#: headers, so the re-run skips the transition instead of failing it from its target.
APPLIED_TRANSITIONS_HEADER = "task_workflow_applied_transitions"


def marker_key(model: type[models.Model], entity_uuid: uuid_module.UUID, transition_name: str) -> str:
    """The key of one transition of one entity in :data:`APPLIED_TRANSITIONS_HEADER`."""
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
        """What ``entity`` is now: its state and when it was set."""
        changed_at = getattr(entity, "state_changed_at", None)
        return cls(str(entity.state), None if changed_at is None else changed_at.isoformat())  # type: ignore[attr-defined]

    def as_header(self) -> dict[str, str | None]:
        """The JSON value stored under the transition's key in the header."""
        return {"state": self.state, "changed_at": self.changed_at}

    @classmethod
    def from_header(cls, value: Any) -> Application | None:
        """The application a header value records; ``None`` for anything else."""
        if isinstance(value, str):  # a message from before changed_at was recorded
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("state"), str):
            changed_at = value.get("changed_at")
            return cls(value["state"], changed_at if isinstance(changed_at, str) else None)
        return None


def applied_earlier(task: Task | None, key: str) -> Application | None:
    """What an earlier run of this message left the entity in, if it applied the
    transition ``key`` already (recorded in the message headers, which re-queues carry)."""
    if task is None:
        return None
    applied = (task.request.headers or {}).get(APPLIED_TRANSITIONS_HEADER) or {}
    return Application.from_header(applied.get(key))


def record_applied(task: Task | None, key: str, application: Application) -> None:
    """Record in the running request's headers that this run applied transition ``key``,
    for a re-queue of the message to carry."""
    if task is None:
        return
    headers = dict(task.request.headers or {})
    headers[APPLIED_TRANSITIONS_HEADER] = {
        **(headers.get(APPLIED_TRANSITIONS_HEADER) or {}),
        key: application.as_header(),
    }
    task.request.headers = headers


def load_unchanged(
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
            object=entity,
        )
    return entity


def applied_by_this_message(
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


def _load_from_primary(model: type[ModelT], entity_uuid: uuid_module.UUID) -> ModelT:
    try:
        return model._default_manager.using(router.db_for_write(model)).get(uuid=entity_uuid)
    except model.DoesNotExist:  # type: ignore[attr-defined]
        raise EntityNotFound(entity_not_found_message(model, entity_uuid), uuid=entity_uuid) from None
