"""Fairness of the throttle's line: grant order = arrival order of 20 waiting processes.

Each round: this process takes the one slot of a fresh group (``concurrency=1``); then 20
spawned processes arrive one after another, each entering ``with throttle(..., wait=None)``
only once the previous one stands in line (``get_backend().waiting(group)``), so the
arrival order is known. The slot is held ``CAMPAIGN_FAIRNESS_HOLD`` seconds (2.5: every
waiter attempts again about once a second meanwhile, which in the first protocol moved it
to the back of the line), then released; each waiter holds it 5 ms when its turn comes.
The Kendall rank correlation between arrival and grant order must be 1 (exactly first
come, first served) on every round.

On the test Redis (the Redis backend, whose waiters are woken by releases).
``CAMPAIGN_FAIRNESS_ROUNDS`` (3) and ``CAMPAIGN_FAIRNESS_WAITERS`` (20) set the size. The
waiter processes are stopped when the test ends, also when it fails.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.campaigns.fairness import kendall_tau, waiter

pytestmark = [pytest.mark.campaign, pytest.mark.services]

ROUNDS = int(os.environ.get("CAMPAIGN_FAIRNESS_ROUNDS", "3"))
WAITERS = int(os.environ.get("CAMPAIGN_FAIRNESS_WAITERS", "20"))
HOLD = float(os.environ.get("CAMPAIGN_FAIRNESS_HOLD", "2.5"))


@pytest.fixture
def processes() -> Iterator[list[multiprocessing.Process]]:
    """Processes the test started: killed if still alive when it ends."""
    started: list[multiprocessing.Process] = []
    yield started
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll the store until ``predicate()`` (the line's state has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.001)


def one_round(processes: list[multiprocessing.Process]) -> list[int]:
    """The waiters' numbers in the order they were granted the slot."""
    from task_workflow.tasks import throttle
    from task_workflow.throttle import SlotGroup, get_backend

    if not settings.REDIS_URL.startswith("redis://"):
        pytest.skip("needs Redis")
    env = {"DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": settings.REDIS_URL}
    name = f"campaign.fairness.{uuid.uuid4().hex[:8]}"
    backend, group = get_backend(), SlotGroup(name)
    context = multiprocessing.get_context("spawn")
    pipes = []
    for number in range(WAITERS):
        ours, theirs = context.Pipe()
        process = context.Process(target=waiter, args=(theirs, env, name, number), daemon=True)
        process.start()
        processes.append(process)
        pipes.append(ours)
    for number, pipe in enumerate(pipes):
        assert pipe.poll(120), f"waiter {number} did not start"
        assert pipe.recv() == "ready"
    holder = throttle(name=name, ttl=30).acquire()
    try:
        for number, pipe in enumerate(pipes):
            pipe.send("go")
            wait_for(lambda n=number: len(backend.waiting(group)) >= n + 1, 30, f"waiter {number} in line")
        time.sleep(HOLD)  # the scenario itself: the waiters attempt again meanwhile
    finally:
        holder.release()
    grants = []
    for number, pipe in enumerate(pipes):
        assert pipe.poll(30 + WAITERS), f"waiter {number} was never granted the slot"
        grants.append(pipe.recv())
    return [number for number, _ in sorted(grants, key=lambda grant: grant[1])]


def test_waiters_are_served_in_arrival_order(processes) -> None:
    for round_no in range(ROUNDS):
        order = one_round(processes)
        tau = kendall_tau(order)
        out_of_turn = sum(1 for place, number in enumerate(order) if place != number)
        print(f"round {round_no + 1}: {WAITERS} waiters, Kendall tau {tau:.3f}, out of turn {out_of_turn}")
        assert tau == 1.0, f"round {round_no + 1}: grant order {order}"
