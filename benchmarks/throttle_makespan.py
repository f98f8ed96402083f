"""Makespan of 40 throttled 100 ms tasks at concurrency 2 on a real 4-process Celery worker.

How to run (needs Redis on 127.0.0.1:6379, FLUSHES db 13; and PostgreSQL on
127.0.0.1:5432, user postgres, where it creates and migrates ``task_workflow_bench``)::

    .venv/bin/python benchmarks/throttle_makespan.py [--tasks 40] [--seconds 0.1] [--no-requeue]

Starts ``celery -A example_project worker --pool prefork --concurrency 4 -Q bench_q``
with ``--include benchmarks.bench_tasks`` (settings ``tests.settings``, Redis as broker,
result backend and throttle store), waits until it answers ``ping``, warms every pool
process up, then sends the tasks as one group and waits for their results. Each task
returns when it started and finished inside its slot (``time.time()``).

- ``bench.throttled``: ``@throttle(concurrency=2, wait=None)``; two processes hold the
  slots, the other two wait in-process and are woken by a release. Ideal makespan =
  tasks x seconds / 2 (2.0 s); target efficiency = ideal / makespan >= 0.9.
- ``bench.throttled_requeue`` (for comparison): ``wait=0``; a busy slot re-queues the
  task with jittered backoff (``THROTTLE_RETRY_BACKOFF``) instead of waiting.

Makespan = last finish - first start. "Max overlap" is the most intervals in progress
at any instant and must never exceed 2. The worker is stopped (SIGTERM) at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/13"
DB_NAME = "task_workflow_bench"
ENV = {
    "DJANGO_SETTINGS_MODULE": "tests.settings",
    "REDIS_URL": REDIS_URL,
    "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}",
}
QUEUE, CONCURRENCY, SLOTS, TARGET = "bench_q", 4, 2, 0.9
HOSTNAME = f"bench-makespan@{socket.gethostname()}"


def prepare() -> Any:
    """Create and migrate the database, flush Redis db 13; return the Celery app."""
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone():
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    os.environ.update(ENV)
    sys.path.insert(0, str(ROOT))
    import django
    import redis

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    redis.Redis.from_url(REDIS_URL).flushdb()
    from example_project.celery import app

    return app


def start_worker(app: Any, log: Any) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "celery", "-A", "example_project", "worker", "--pool", "prefork"]
    command += ["--concurrency", str(CONCURRENCY), "-Q", QUEUE, "-n", HOSTNAME, "--without-gossip"]
    command += ["--without-mingle", "--loglevel", "WARNING", "--include", "benchmarks.bench_tasks"]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}")
        if app.control.ping(destination=[HOSTNAME], timeout=0.5):
            return worker
    raise RuntimeError("worker did not answer ping within 60 s")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)  # warm shutdown
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def run_batch(app: Any, task: str, count: int, seconds: float) -> tuple[list[dict[str, Any]], float]:
    from celery import group

    sent = time.time()
    batch = group([app.signature(task, args=(i, seconds), queue=QUEUE) for i in range(count)], app=app)
    results = batch.apply_async().get(timeout=120 + count * seconds * 20)
    return results, time.time() - sent


def max_overlap(results: list[dict[str, Any]]) -> int:
    # At equal instants ends (-1) sort before starts (+1): back to back is not overlap.
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def report(label: str, results: list[dict[str, Any]], wall: float, count: int, seconds: float) -> float:
    """Print one variant's figures; return its efficiency."""
    makespan = max(r["end"] for r in results) - min(r["start"] for r in results)
    ideal = count * seconds / SLOTS
    busy = sum(r["end"] - r["start"] for r in results)
    overlap = max_overlap(results)
    print(f"{label}:")
    print(f"  makespan {makespan:.3f} s  ideal {ideal:.3f} s  efficiency {ideal / makespan:.3f}")
    print(f"  sent->all results {wall:.3f} s  mean held {busy / count * 1000:.1f} ms  ", end="")
    print(f"pool processes used {len({r['pid'] for r in results})}")
    print(f"  max overlap {overlap} (limit {SLOTS}): {'OK' if overlap <= SLOTS else 'EXCEEDED'}")
    return ideal / makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.1)
    parser.add_argument("--no-requeue", action="store_true", help="skip the wait=0 comparison")
    args = parser.parse_args()

    app = prepare()
    with tempfile.NamedTemporaryFile("w+b", prefix="bench-worker-", suffix=".log") as log:
        worker = start_worker(app, log)
        try:
            run_batch(app, "bench.throttled", CONCURRENCY * 4, 0.02)  # warm every pool process
            print(f"{args.tasks} tasks x {args.seconds * 1000:g} ms, throttle concurrency {SLOTS}, ", end="")
            print(f"prefork worker with {CONCURRENCY} processes ({os.cpu_count()} CPUs)")
            results, wall = run_batch(app, "bench.throttled", args.tasks, args.seconds)
            label = "wait=None (wait in-process, woken by release)"
            efficiency = report(label, results, wall, args.tasks, args.seconds)
            verdict = "MET" if efficiency >= TARGET else "MISSED"
            print(f"  target efficiency >= {TARGET}: {verdict} ({efficiency:.3f})")
            if not args.no_requeue:
                results, wall = run_batch(app, "bench.throttled_requeue", args.tasks, args.seconds)
                label = "wait=0 (re-queue with backoff when busy), for comparison"
                report(label, results, wall, args.tasks, args.seconds)
        except Exception:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            stop_worker(worker)


if __name__ == "__main__":
    main()
