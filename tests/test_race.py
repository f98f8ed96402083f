"""Many processes run the same transition task on one row at once: exactly one wins.

Each contender is a separate OS process with its own PostgreSQL connection, so the
only thing keeping them apart is the row lock (``SELECT ... FOR UPDATE``) that
``apply_transition`` takes.

Why this can fail: without the lock, the window between a contender's read of the
state and its commit is a few milliseconds, and contenders released together by a
barrier might still happen to run one after the other. So the window is widened
deterministically: django-fsm's ``pre_transition`` signal fires after the state was
read and checked, before the row is saved; there every contender waits on a second
barrier (``checked``) for all the others. With the lock, the first contender waits
there holding it while the others are blocked in their ``SELECT ... FOR UPDATE``; the
wait times out (``CHECKED_WAIT``), it commits, and each of the others then reads the
new state and is refused before reaching the signal. Without the lock, every
contender reads the old state, all meet at the barrier, and all save:
``test_the_race_is_caught_without_the_row_lock`` shows that the assertions of the main
test would then fail.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading

import kombu.pools
import pytest
from celery import current_app, shared_task
from django.db import connection, connections
from django.db.models import QuerySet
from django_fsm.signals import pre_transition

from task_workflow.tasks import transition
from tests.testapp.models import BodyRun, Volume

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL row locks"),
]

S = Volume.States
CONTENDERS = 8
#: How long a contender that passed the state check waits for others to pass it too.
#: With a working lock nobody else can, so the main test always spends this long.
CHECKED_WAIT = 2.0
#: Upper bounds for things that should take well under a second.
START_WAIT = 60.0
RESULT_WAIT = 120.0


@shared_task(name="tests.race.update_volume")
@transition(Volume, "begin_updating")
def race_update_volume(volume_uuid, transition_entity=None):
    """update_scheduled -> updating; counts its run with the state it reads back."""
    seen = Volume.objects.get(uuid=volume_uuid).state
    BodyRun.objects.create(task="race_update_volume", entity_uuid=volume_uuid, state_seen=seen)


def contend(start, results, volume_uuid):
    """One contender process: wait for all the others, then run the task once."""
    # The parent closed its connections before forking, so the inherited wrappers hold
    # no socket; closing again makes sure this process opens its own connection
    # (closing a live inherited one would terminate the parent's session).
    connections.close_all()
    try:
        start.wait(timeout=START_WAIT)
        result = race_update_volume.apply(args=(volume_uuid,))
        outcome = "success" if result.successful() else type(result.result).__name__
    except BaseException as exc:
        outcome = f"crashed: {exc!r}"
    finally:
        connections.close_all()
    results.put(outcome)


def run_contenders(volume: Volume):
    """Start CONTENDERS processes on ``volume`` at once; return their outcomes and how
    many of them passed the state check (reached ``pre_transition``)."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(CONTENDERS)
    checked = context.Barrier(CONTENDERS)
    passed_check = context.Value("i", 0)
    results = context.Queue()

    def widen_the_window(sender, name, **kwargs):
        """Between the state check and the save: wait for the other contenders."""
        if name != "begin_updating":
            return
        with passed_check.get_lock():
            passed_check.value += 1
        # Times out (breaking the barrier) unless every contender gets here.
        with contextlib.suppress(threading.BrokenBarrierError):
            checked.wait(timeout=CHECKED_WAIT)

    pre_transition.connect(widen_the_window, sender=Volume, weak=False, dispatch_uid="tests.race")
    connections.close_all()  # never fork a live database connection
    # Nor a live broker connection: a child's after-fork cleanup would close the inherited
    # channel and, if an earlier test left a BRPOP on it, wait for that reply for ever. So
    # close every kombu pool here (the app's come from kombu's registry) and drop the app's
    # references to them, as Celery's after-fork handler does (without its signal, which is
    # for a child): later tests get new pools.
    kombu.pools.reset()
    app = current_app._get_current_object()
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    processes = [
        context.Process(target=contend, args=(start, results, str(volume.uuid))) for _ in range(CONTENDERS)
    ]
    try:
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=RESULT_WAIT) for _ in processes]
    finally:
        pre_transition.disconnect(sender=Volume, dispatch_uid="tests.race")
        for process in processes:
            process.join(timeout=RESULT_WAIT)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    return sorted(outcomes), passed_check.value


def test_concurrent_transitions_let_exactly_one_through():
    """8 processes, one row, one transition: one success, seven refusals, one body run."""
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)

    outcomes, passed_check = run_contenders(volume)

    assert outcomes == ["TransitionNotPermitted"] * (CONTENDERS - 1) + ["success"]
    assert passed_check == 1
    run = BodyRun.objects.get()
    assert (run.entity_uuid, run.state_seen) == (volume.uuid, S.UPDATING)
    volume.refresh_from_db()
    assert (volume.state, volume.error_message) == (S.UPDATING, "")


def test_the_race_is_caught_without_the_row_lock(monkeypatch):
    """Control: with ``select_for_update()`` made a no-op (the forked contenders inherit
    the patch), the locking read is a plain one, the contenders all pass the state check
    and all run the body, so the main test's assertions would fail."""
    monkeypatch.setattr(QuerySet, "select_for_update", lambda self, *args, **kwargs: self)
    volume = Volume.objects.create(state=S.UPDATE_SCHEDULED)

    outcomes, passed_check = run_contenders(volume)

    assert outcomes == ["success"] * CONTENDERS
    assert passed_check == CONTENDERS
    assert BodyRun.objects.count() == CONTENDERS
