"""Models used only by the tests."""

from django.db import models
from django_fsm import transition

from task_workflow.fencing import FencedMixin
from task_workflow.models import StateMixin, UuidMixin


class Volume(UuidMixin, StateMixin, models.Model):
    """A StateMixin subclass with a conditional transition and a run counter."""

    size = models.PositiveIntegerField(default=1)
    attachable = models.BooleanField(default=True)

    class States(StateMixin.States):
        ATTACHING = "attaching"
        TRANSITIONAL = (*StateMixin.States.TRANSITIONAL, ATTACHING)

    def __str__(self) -> str:
        return f"volume {self.uuid}"

    @transition(
        field="state",
        source=StateMixin.States.OK,
        target=States.ATTACHING,
        conditions=[lambda volume: volume.attachable],
    )
    def begin_attaching(self) -> None:
        """ok → attaching, only when attachable."""

    @transition(field="state", source=StateMixin.States.OK, target=StateMixin.States.UPDATE_SCHEDULED)
    def schedule_resizing(self, size: int) -> None:
        """ok → update_scheduled, with the new size: a transition that sets another field."""
        self.size = size


class BodyRun(models.Model):
    """One row per executed task body: lets tests count runs across processes."""

    task = models.CharField(max_length=100)
    entity_uuid = models.UUIDField()
    state_seen = models.CharField(max_length=64)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.task} on {self.entity_uuid}"


class SaveCountField(models.PositiveIntegerField):
    """An integer that every save bumps in its ``pre_save()`` (a save counter, as a
    version or "last modified" field would be): a save that computes the values twice
    bumps it twice."""

    def pre_save(self, model_instance: models.Model, add: bool) -> int:
        value = (getattr(model_instance, self.attname) or 0) + 1
        setattr(model_instance, self.attname, value)
        return value


class Server(UuidMixin, StateMixin, models.Model):
    """A StateMixin model with a JSONField and a field whose ``pre_save()`` sets a value."""

    config = models.JSONField(default=dict)
    saves = SaveCountField(default=0)

    def __str__(self) -> str:
        return f"server {self.uuid}"


class Divisor(models.Model):
    """Rows a ``post_transition`` receiver reads lazily (``1 / n`` fails where n is 0)."""

    n = models.IntegerField()

    def __str__(self) -> str:
        return f"divisor {self.n}"


class FencedResource(FencedMixin, models.Model):
    """A resource that only the newest throttle holder may write (``FencedMixin``):
    ``payload`` says who wrote last, ``writes`` counts accepted writes."""

    name = models.CharField(max_length=100, unique=True)
    payload = models.CharField(max_length=200, default="", blank=True)
    writes = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"fenced resource {self.name}"


class DocsBackend(FencedMixin, models.Model):
    """The ``Backend`` of the fencing example in docs/design/throttle-protocol.md, run by
    tests/test_fencing.py: ``spec``, written under the fence, and ``fence``, the
    hand-rolled column of the example as first documented (``fence__lte``)."""

    spec = models.JSONField(default=dict)
    fence = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"docs backend {self.pk}"
