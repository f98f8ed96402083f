"""Fairness of the throttle's line: grant order vs arrival order of 20 waiting processes.

How to run (needs Redis on 127.0.0.1:6379; uses and FLUSHES db 13, ``BENCH_REDIS_URL``
picks another)::

    .venv/bin/python benchmarks/throttle_fairness.py [--waiters 20] [--rounds 3] [--hold 2.5]

Each round: the main process takes the one slot of a fresh group (``concurrency=1``);
then 20 spawned processes arrive one after another, each entering
``with throttle(..., wait=None)`` only once the previous one stands in line
(``backend.waiting(group)``), so the arrival order is known. The main process holds the
slot ``--hold`` seconds (every waiter attempts again about once a second meanwhile, which
in the first protocol moved it to the back of the line), then releases; each waiter holds
the slot 5 ms when its turn comes. Printed per backend: the Kendall rank correlation (tau)
between arrival order and grant order (1.0 = exactly first come, first served) and the
number of waiters served out of turn. Target: tau = 1 on every round.

With ``--database`` the same runs on the DatabaseCache backend (SQLite in a temporary
directory), whose waiters poll.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/13"
HOLD_EACH = 0.005


def setup_django(env: dict[str, str]) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.update(env)
    import django

    django.setup()


def waiter(conn: Connection, env: dict[str, str], name: str, number: int) -> None:
    setup_django(env)
    from task_workflow.tasks import throttle

    conn.send("ready")
    conn.recv()  # arrive now
    with throttle(name=name, ttl=30, wait=None):
        conn.send((number, time.monotonic_ns()))
        time.sleep(HOLD_EACH)


def kendall_tau(order: list[int]) -> float:
    """Kendall's tau between ``order`` and ``sorted(order)`` (no ties)."""
    n = len(order)
    concordant = sum(1 for i in range(n) for j in range(i + 1, n) if order[i] < order[j])
    pairs = n * (n - 1) // 2
    return (2 * concordant - pairs) / pairs if pairs else 1.0


def one_round(env: dict[str, str], waiters: int, hold: float) -> list[int]:
    from task_workflow.tasks import throttle
    from task_workflow.throttle import SlotGroup, get_backend

    name = f"bench.fairness.{uuid.uuid4().hex[:8]}"
    backend, group = get_backend(), SlotGroup(name)
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for number in range(waiters):
        ours, theirs = context.Pipe()
        process = context.Process(target=waiter, args=(theirs, env, name, number), daemon=True)
        process.start()
        pipes.append(ours)
        processes.append(process)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    holder = throttle(name=name, ttl=30).acquire()
    for number, pipe in enumerate(pipes):
        pipe.send("go")
        deadline = time.monotonic() + 30
        while len(backend.waiting(group)) < number + 1:
            if time.monotonic() > deadline:
                raise SystemExit(f"waiter {number} never stood in line")
            time.sleep(0.001)
    time.sleep(hold)  # the point of the benchmark: waiters attempt again meanwhile
    holder.release()
    grants = [pipe.recv() for pipe in pipes]
    for process in processes:
        process.join(30)
    return [number for number, _ in sorted(grants, key=lambda grant: grant[1])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waiters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=2.5, help="seconds the first holder keeps the slot")
    parser.add_argument("--database", action="store_true", help="also on the DatabaseCache backend (SQLite)")
    args = parser.parse_args()

    setups = [("redis", {"DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": REDIS_URL})]
    if args.database:
        directory = tempfile.mkdtemp(prefix="tw-fairness-")
        setups.append(
            (
                "database-cache (sqlite)",
                {
                    "DJANGO_SETTINGS_MODULE": "tests.settings",
                    "TEST_DATABASE": "sqlite",
                    "DATABASE_URL": f"sqlite:///{directory}/db.sqlite3",
                },
            )
        )
    met = True
    for label, env in setups:
        # Each backend in a process of its own: settings are read once per process.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=run_backend, args=(theirs, label, env, args))
        process.start()
        for line in iter(ours.recv, None):
            print(line, flush=True)
        met = ours.recv() and met
        process.join()
    print(f"target tau = 1.0 on every round: {'MET' if met else 'MISSED'}")


def run_backend(conn: Connection, label: str, env: dict[str, str], args: argparse.Namespace) -> None:
    setup_django(env)
    if label == "redis":
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
    else:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        call_command("createcachetable", verbosity=0)
    met = True
    for number in range(args.rounds):
        order = one_round(env, args.waiters, args.hold)
        tau = kendall_tau(order)
        out_of_turn = sum(1 for place, waiter in enumerate(order) if place != waiter)
        met = met and tau == 1.0
        conn.send(
            f"{label:24} round {number + 1}: {args.waiters} waiters, held {args.hold:.1f}s first, "
            f"Kendall tau {tau:.3f}, served out of turn {out_of_turn}, grant order {order}"
        )
    conn.send(None)
    conn.send(met)


if __name__ == "__main__":
    main()
