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

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django_fsm import FSMField, FSMModelMixin, transition

from .managers import TransitionRecordManager


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
    #: When ``state`` last changed (set by every transition): how long an entity has sat
    #: in a transitional state, for ``manage.py stuck_entities``.
    state_changed_at = models.DateTimeField(default=timezone.now, editable=False, db_index=True)

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


class TransitionRecord(models.Model):
    """One transition applied through task_workflow (task, errback or admin), written in
    the same transaction as the state change, so history and state never disagree."""

    # No foreign key constraint in the database, and no index of its own (the entity index
    # below starts with it): a constraint makes every transition's COMMIT lock the content
    # type's row (FOR KEY SHARE), one row shared by all transitions of a model, which cost
    # more server time than the history INSERT itself. The value comes from Django's
    # ContentType cache, and on_delete runs in the ORM either way.
    content_type = models.ForeignKey(
        ContentType,
        on_delete=models.CASCADE,
        related_name="+",
        db_constraint=False,
        db_index=False,
        verbose_name=_("content type"),
    )
    # A string, so integer and UUID primary keys fit alike.
    object_id = models.CharField(_("object id"), max_length=64)
    entity = GenericForeignKey("content_type", "object_id")
    entity_uuid = models.UUIDField(_("entity uuid"), null=True, blank=True, db_index=True)
    transition = models.CharField(_("transition"), max_length=100)
    source_state = models.CharField(_("source state"), max_length=64)
    target_state = models.CharField(_("target state"), max_length=64, db_index=True)
    task_name = models.CharField(_("task name"), max_length=255, blank=True, default="")
    task_id = models.CharField(_("task id"), max_length=255, blank=True, default="")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name=_("user"),
    )
    error_message = models.TextField(_("error message"), blank=True, default="")
    created_at = models.DateTimeField(_("created at"), default=timezone.now, db_index=True)

    objects = TransitionRecordManager()

    class Meta:
        ordering = ("-created_at", "-id")
        indexes = [models.Index(fields=["content_type", "object_id", "-created_at"])]
        verbose_name = _("transition record")
        verbose_name_plural = _("transition history")

    def __str__(self) -> str:
        return f"{self.transition}: {self.source_state} → {self.target_state}"


class ThrottleLock(models.Model):
    """Not a table: gives the admin index its "Throttle locks" entry and the permissions
    to view (``view_throttlelock``) and force-release (``release_throttlelock``) slots.
    The admin page reads held slots from the cache backend."""

    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = [("release_throttlelock", _("Can force-release throttle locks"))]
        verbose_name = _("throttle lock")
        verbose_name_plural = _("throttle locks")

    def __str__(self) -> str:
        return "throttle lock"


def _stamp_state_change(sender: type, instance: models.Model, target: str, **kwargs: object) -> None:
    """django-fsm ``post_transition`` receiver (connected in ``TaskWorkflowConfig.ready()``):
    remember when a StateMixin's state changed."""
    if isinstance(instance, StateMixin):
        instance.state_changed_at = timezone.now()
