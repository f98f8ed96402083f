"""The transition guard's re-run rules, in-process (Celery's eager ``apply()``, which
builds a real task request with headers and follows retries).

- A re-run of a message that applied its transition (its headers say so) runs the body
  only if the entity is still in the state *that* application set: not when it went away
  and came back to the same state name through other tasks (ABA), which the first
  version let through.
- ``bind=True`` + ``autoretry_for``: the retry runs with the transition applied once, and
  the entity is not erred by an attempt Celery retries.
- A message whose own earlier delivery applied the transition (same task id, per the
  transition history) resumes; another message is refused.
"""

from __future__ import annotations

import uuid

import pytest
from celery import shared_task

from task_workflow.models import TransitionRecord
from task_workflow.redelivery import APPLIED_TRANSITIONS_HEADER, Application, marker_key
from task_workflow.running import celery_will_retry
from task_workflow.tasks import TransitionNotPermitted, apply_transition, transition
from task_workflow.transitions import TransitionOrigin
from tests.testapp import guard_tasks
from tests.testapp.models import BodyRun, Volume

pytestmark = pytest.mark.django_db

S = Volume.States


@shared_task(name="tests.guard.update_recording", bind=True)
@transition(Volume, "begin_updating")
def update_recording(self, volume_uuid: str, transition_entity=None) -> str:
    BodyRun.objects.create(
        task=self.name, entity_uuid=transition_entity.uuid, state_seen=transition_entity.state
    )
    return "ran"


def rerun_headers(volume: Volume, application: Application) -> dict:
    """The headers a re-queued message carries after its first run applied begin_updating."""
    return {
        APPLIED_TRANSITIONS_HEADER: {
            marker_key(Volume, volume.uuid, "begin_updating"): application.as_header()
        }
    }


def runs(volume: Volume, task_name: str = "tests.guard.update_recording") -> int:
    return BodyRun.objects.filter(task=task_name, entity_uuid=volume.uuid).count()


def test_a_rerun_whose_entity_is_still_as_its_first_run_left_it_runs_the_body():
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    applied = Application.of(apply_transition(Volume, volume.uuid, "begin_updating"))
    result = update_recording.apply(args=(str(volume.uuid),), headers=rerun_headers(volume, applied))
    assert result.get() == "ran"
    assert runs(volume) == 1


def test_a_rerun_after_the_entity_left_and_came_back_to_the_same_state_is_refused():
    """updating (this message) -> erred -> update_scheduled -> updating (another task):
    the same state name, another application. The old message must not run its body."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    applied = Application.of(apply_transition(Volume, volume.uuid, "begin_updating"))
    for name in ("set_erred", "schedule_updating", "begin_updating"):
        apply_transition(
            Volume, volume.uuid, name, origin=TransitionOrigin(task_name="other", task_id="other")
        )

    result = update_recording.apply(args=(str(volume.uuid),), headers=rerun_headers(volume, applied))

    with pytest.raises(TransitionNotPermitted, match="left it and come back to 'updating'"):
        result.get()
    assert runs(volume) == 0


def test_a_rerun_of_a_message_from_before_changed_at_was_recorded_checks_the_state():
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    apply_transition(Volume, volume.uuid, "begin_updating")
    headers = {APPLIED_TRANSITIONS_HEADER: {marker_key(Volume, volume.uuid, "begin_updating"): S.UPDATING}}
    assert update_recording.apply(args=(str(volume.uuid),), headers=headers).get() == "ran"


def test_bound_autoretry_task_retries_with_the_transition_applied_once():
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task = guard_tasks.update_with_autoretry
    assert task.apply(args=(str(volume.uuid), 2)).get() == 3
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (S.UPDATING, "")
    records = TransitionRecord.objects.for_entity(volume)
    assert list(records.values_list("transition", flat=True)) == ["begin_updating"]


def test_bound_autoretry_task_errs_the_entity_once_when_retries_are_exhausted():
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    result = guard_tasks.update_with_autoretry.apply(args=(str(volume.uuid), 99))
    with pytest.raises(guard_tasks.TransientBackendError, match="run 3"):
        result.get()
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (S.ERRED, "TransientBackendError: backend busy (run 3)")
    records = TransitionRecord.objects.for_entity(volume).order_by("created_at", "id")
    assert list(records.values_list("transition", flat=True)) == ["begin_updating", "set_erred"]


class _Request:
    def __init__(self, retries: int, called_directly: bool = False) -> None:
        self.retries, self.called_directly = retries, called_directly


class _Task:
    """Just the attributes celery_will_retry reads."""

    _orig_run = None

    def __init__(self, retries: int, max_retries=3, retry_kwargs=None, **attrs) -> None:
        self.request = _Request(retries)
        self.max_retries = max_retries
        self.retry_kwargs = retry_kwargs or {}
        self.autoretry_for = (ValueError,)
        self.dont_autoretry_for = ()
        self.__dict__.update(attrs)


@pytest.mark.parametrize(
    ("task", "exc", "expected"),
    [
        (_Task(0), ValueError(), True),
        (_Task(2), ValueError(), True),
        (_Task(3), ValueError(), False),  # the limit is reached: this failure is final
        (_Task(0), KeyError(), False),  # not retried at all
        (_Task(0, dont_autoretry_for=(UnicodeError,)), UnicodeDecodeError("x", b"", 0, 1, "r"), False),
        (_Task(5, max_retries=None), ValueError(), True),
        (_Task(1, retry_kwargs={"max_retries": 1}), ValueError(), False),
        (_Task(0, autoretry_for=()), ValueError(), False),
    ],
)
@pytest.mark.django_db(databases=[])
def test_celery_will_retry_mirrors_autoretry(task, exc, expected):
    assert celery_will_retry(task, exc) is expected


def test_a_redelivered_message_resumes_from_the_history_and_another_message_is_refused():
    """Same task id as the delivery that applied the transition (its worker died before
    the message was acknowledged): the body runs again. Another task id: refused."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task_id = str(uuid.uuid4())
    apply_transition(
        Volume,
        volume.uuid,
        "begin_updating",
        origin=TransitionOrigin(task_name=update_recording.name, task_id=task_id),
    )
    assert update_recording.apply(args=(str(volume.uuid),), task_id=task_id).get() == "ran"
    with pytest.raises(TransitionNotPermitted):
        update_recording.apply(args=(str(volume.uuid),)).get()
    assert runs(volume) == 1
    assert TransitionRecord.objects.for_entity(volume).count() == 1


def test_without_history_a_redelivered_message_is_refused(settings):
    settings.TASK_WORKFLOW = {**settings.TASK_WORKFLOW, "TRANSITION_HISTORY": False}
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)
    task_id = str(uuid.uuid4())
    apply_transition(Volume, volume.uuid, "begin_updating")
    with pytest.raises(TransitionNotPermitted):
        update_recording.apply(args=(str(volume.uuid),), task_id=task_id).get()
