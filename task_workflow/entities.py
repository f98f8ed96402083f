"""What a transition is applied to: a model with django-fsm transitions, a row by uuid."""

from __future__ import annotations

import uuid as uuid_module
from typing import Any

from django.db import models

from .exceptions import ImproperlyDecorated, InvalidEntityUuid


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
