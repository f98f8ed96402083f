"""Model mixins: a UUID for addressing entities from tasks, and a django-fsm lifecycle.

``StateMixin`` holds the standard lifecycle of a managed resource (a VM, a tenant, a
volume). Subclasses add their own states and transitions on the same ``state`` field::

    class Instance(UuidMixin, StateMixin, models.Model):
        class States(StateMixin.States):
            STOPPING = "stopping"
            OFFLINE = "offline"
            TRANSITIONAL = (*StateMixin.States.TRANSITIONAL, STOPPING)

        @transition(field="state", source=States.OK, target=States.STOPPING)
        def begin_stopping(self) -> None: ...
"""

from __future__ import annotations

import uuid

from django.db import models
from django_fsm import FSMField, FSMModelMixin, transition


class UuidMixin(models.Model):
    """Adds a unique, non-editable ``uuid``: the handle tasks use to find the row."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)

    class Meta:
        abstract = True


class StateMixin(FSMModelMixin, models.Model):
    """A django-fsm ``state`` with the standard lifecycle and an ``error_message``.

    The field is protected: state changes only through transitions (plain assignment
    raises ``AttributeError``). django-fsm changes state in memory only; the
    ``transition`` task decorator takes the row lock and saves.
    """

    class States:
        """State values of the standard lifecycle; subclass to add more."""

        CREATION_SCHEDULED = "creation_scheduled"
        CREATING = "creating"
        UPDATE_SCHEDULED = "update_scheduled"
        UPDATING = "updating"
        DELETION_SCHEDULED = "deletion_scheduled"
        DELETING = "deleting"
        OK = "ok"
        ERRED = "erred"

        #: States in which some task is expected to move the entity on; an entity
        #: that sits in one of these for long was probably abandoned by a dead worker.
        TRANSITIONAL: tuple[str, ...] = (
            CREATION_SCHEDULED,
            CREATING,
            UPDATE_SCHEDULED,
            UPDATING,
            DELETION_SCHEDULED,
            DELETING,
        )

        @classmethod
        def values(cls) -> list[str]:
            """All state values declared on this class and its bases."""
            found: dict[str, None] = {}
            for klass in reversed(cls.__mro__):
                for name, value in vars(klass).items():
                    if name.isupper() and isinstance(value, str):
                        found[value] = None
            return list(found)

        @classmethod
        def choices(cls) -> list[tuple[str, str]]:
            """``(value, label)`` pairs, e.g. for forms and admin filters."""
            return [(value, value.replace("_", " ").capitalize()) for value in cls.values()]

    state = FSMField(default=States.CREATION_SCHEDULED, max_length=64, protected=True, db_index=True)
    error_message = models.TextField(blank=True, default="")

    class Meta:
        abstract = True

    @transition(field="state", source=States.CREATION_SCHEDULED, target=States.CREATING)
    def begin_creating(self) -> None:
        """creation_scheduled → creating."""

    @transition(field="state", source=[States.OK, States.ERRED], target=States.UPDATE_SCHEDULED)
    def schedule_updating(self) -> None:
        """ok | erred → update_scheduled."""

    @transition(field="state", source=States.UPDATE_SCHEDULED, target=States.UPDATING)
    def begin_updating(self) -> None:
        """update_scheduled → updating."""

    @transition(field="state", source=[States.OK, States.ERRED], target=States.DELETION_SCHEDULED)
    def schedule_deleting(self) -> None:
        """ok | erred → deletion_scheduled."""

    @transition(field="state", source=States.DELETION_SCHEDULED, target=States.DELETING)
    def begin_deleting(self) -> None:
        """deletion_scheduled → deleting."""

    @transition(field="state", source=[States.CREATING, States.UPDATING], target=States.OK)
    def set_ok(self) -> None:
        """creating | updating → ok. Never from erred or deleting: a late success
        report must not hide an error or resurrect an entity being deleted."""

    @transition(field="state", source="*", target=States.ERRED)
    def set_erred(self) -> None:
        """any → erred. Callers set ``error_message`` (the task decorator does)."""

    @transition(field="state", source=States.ERRED, target=States.OK)
    def recover(self) -> None:
        """erred → ok, clearing the error message."""
        self.error_message = ""
