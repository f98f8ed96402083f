"""Which fields the save after a transition writes (``save(update_fields=...)``).

The state field, every field whose value changed since the row was loaded (the
transition method, django-fsm's signal receivers, ``error_message``), every field holding
a value that may have changed in place (a JSONField's dict), and every field whose
``pre_save()`` may set a new value on any save (``auto_now``, custom fields). Saving only
those builds a shorter UPDATE, and does not write back a stale copy of a column the
transition left alone when code inside the same transaction changed it through another
path (a queryset ``update()`` in a ``post_transition`` receiver), as a full-row save would.
"""

from __future__ import annotations

import datetime
import functools
import uuid as uuid_module
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import models

#: Marks a field whose value was not loaded (deferred) in a snapshot.
_NOT_LOADED = object()

#: Values that cannot change without being replaced: one equal to the value loaded is
#: unchanged. Any other value (a JSONField's dict, a list, a file) may have been changed
#: in place, where no comparison with the loaded one can tell, so it is always saved.
#: (``bool`` is an ``int``, ``datetime`` a ``date``.)
IMMUTABLE_VALUES: tuple[type, ...] = (
    str,
    int,
    float,
    Decimal,
    bytes,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    uuid_module.UUID,
    type(None),
)

#: ``pre_save()`` of Django's own fields: none sets a value on save but for ``auto_now``
#: (checked apart); a FileField's only commits a newly assigned file, a changed value
#: anyway. A field with another ``pre_save()`` (a custom "last modified" field) may set
#: one on every save, so it is always saved, as a full ``save()`` would save it.
_PLAIN_PRE_SAVES = frozenset(
    {
        models.Field.pre_save,
        models.DateField.pre_save,
        models.DateTimeField.pre_save,
        models.TimeField.pre_save,
        models.FileField.pre_save,
    }
)


@dataclass(frozen=True)
class SavePlan:
    """The fields of one model and transition that a save may write, and those it
    always writes. Made once per model and transition (:func:`plan_save`)."""

    #: ``(name, attname)`` of every concrete field a full ``save()`` writes, in order.
    fields: tuple[tuple[str, str], ...]
    #: Names saved whatever their value: the state field and the ``pre_save()`` ones.
    always: frozenset[str]

    def snapshot(self, entity: models.Model) -> list[Any]:
        """The values as loaded, to compare after the transition (``__dict__``: no
        descriptor runs, a deferred field is not fetched)."""
        values = entity.__dict__
        return [values.get(attname, _NOT_LOADED) for _, attname in self.fields]

    def fields_to_save(self, entity: models.Model, loaded: list[Any]) -> list[str]:
        """The ``update_fields`` of ``entity``'s save, given its :meth:`snapshot` as loaded."""
        values = entity.__dict__
        names = []
        for (name, attname), before in zip(self.fields, loaded, strict=True):
            after = values.get(attname, _NOT_LOADED)
            if after is _NOT_LOADED:  # deferred and never read: a full save() skips it too
                continue
            if name in self.always or value_changed(before, after):
                names.append(name)
        return names


@functools.cache
def plan_save(model: type[models.Model], transition_name: str) -> SavePlan:
    """The :class:`SavePlan` of ``model``'s transition ``transition_name`` (a django-fsm
    transition method: its state field is always saved)."""
    fields = tuple(
        field
        for field in model._meta.concrete_fields
        if not field.primary_key and not getattr(field, "generated", False)
    )
    state_field = getattr(model, transition_name)._django_fsm.field
    always = {state_field.name if isinstance(state_field, models.Field) else str(state_field)}
    always.update(field.name for field in fields if set_by_every_save(field))
    return SavePlan(tuple((field.name, field.attname) for field in fields), frozenset(always))


def value_changed(before: Any, after: Any) -> bool:
    """Whether a field's value ``after`` the transition may differ from ``before`` it."""
    if not isinstance(after, IMMUTABLE_VALUES):  # may have been changed in place
        return True
    return after is not before and after != before


def set_by_every_save(field: models.Field) -> bool:
    """Whether ``field.pre_save()`` may give the field a new value on any save."""
    return getattr(field, "auto_now", False) or type(field).pre_save not in _PLAIN_PRE_SAVES
