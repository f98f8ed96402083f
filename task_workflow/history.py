"""The transition history: who applied a transition, and its ``TransitionRecord``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Task
from django.db import models

from .models import TransitionRecord
from .running import running_task


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
        """The Celery task running in this thread; empty outside one."""
        return cls.of_task(running_task())


def record_transition(
    entity: models.Model,
    using: str,
    *,
    transition_name: str,
    source_state: str,
    origin: TransitionOrigin,
    error_message: str,
) -> TransitionRecord:
    """Write the ``TransitionRecord`` of a transition just saved on ``entity``, on the
    database ``using``: call it inside the transition's transaction, so history and
    state commit or roll back together. One INSERT: the content type comes from
    ``ContentType``'s cache once it was looked up."""
    record: TransitionRecord = TransitionRecord.objects.db_manager(using).record(
        entity,
        transition=transition_name,
        source_state=source_state,
        target_state=entity.state,  # type: ignore[attr-defined]
        task_name=origin.task_name,
        task_id=origin.task_id,
        user=origin.user,
        error_message=error_message,
    )
    return record
