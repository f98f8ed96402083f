"""Query helpers of task_workflow's models."""

from __future__ import annotations

from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import models


class TransitionRecordQuerySet(models.QuerySet):
    """Transition history, newest first."""

    def for_entity(self, entity: models.Model) -> TransitionRecordQuerySet:
        """The history of one entity (any model, integer or UUID primary key)."""
        content_type = ContentType.objects.get_for_model(entity, for_concrete_model=False)
        return self.filter(content_type=content_type, object_id=str(entity.pk))

    def record(self, entity: Any, **fields: Any) -> Any:
        """Write one record for ``entity`` (call inside the transition's transaction)."""
        return self.create(
            content_type=ContentType.objects.db_manager(self.db).get_for_model(
                entity, for_concrete_model=False
            ),
            object_id=str(entity.pk),
            entity_uuid=getattr(entity, "uuid", None),
            **fields,
        )


class TransitionRecordManager(models.Manager.from_queryset(TransitionRecordQuerySet)):  # type: ignore[misc]
    """Manager of :class:`~task_workflow.models.TransitionRecord`."""
