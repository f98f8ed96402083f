"""The example's cloud ``Instance``: the standard lifecycle plus power states."""

from __future__ import annotations

from django.db import models
from django_fsm import transition

from task_workflow.models import StateMixin, UuidMixin


class Instance(UuidMixin, StateMixin, models.Model):
    """A virtual machine on a (simulated) cloud backend."""

    class States(StateMixin.States):
        ONLINE = "online"
        STOPPING = "stopping"
        OFFLINE = "offline"
        STARTING = "starting"
        TRANSITIONAL = (*StateMixin.States.TRANSITIONAL, STOPPING, STARTING)

    name = models.CharField(max_length=100)
    backend_id = models.CharField(max_length=100, blank=True)

    def __str__(self) -> str:
        return self.name

    @transition(field="state", source=[States.CREATING, States.STARTING], target=States.ONLINE)
    def set_online(self) -> None:
        """creating | starting → online."""

    @transition(field="state", source=States.ONLINE, target=States.STOPPING)
    def begin_stopping(self) -> None:
        """online → stopping."""

    @transition(field="state", source=States.STOPPING, target=States.OFFLINE)
    def set_offline(self) -> None:
        """stopping → offline."""

    @transition(field="state", source=States.OFFLINE, target=States.STARTING)
    def begin_starting(self) -> None:
        """offline → starting."""
