"""The throttle backends' stateful property tests, with a large example budget.

How to run (Redis for ``redis``, PostgreSQL for ``postgresql``; ``sqlite`` needs nothing)::

    .venv/bin/python benchmarks/throttle_properties.py                      # 2000 x 50 per backend
    .venv/bin/python benchmarks/throttle_properties.py --examples 300 --steps 30 --backend redis
    THROTTLE_PROPERTIES_EXAMPLES=5000 .venv/bin/python benchmarks/throttle_properties.py --no-shrink

The same state machines as ``tests/test_throttle_properties.py`` (rules and invariants:
``tests/throttle_model.py``), run with ``--examples`` sequences (default 2000, or
``THROTTLE_PROPERTIES_EXAMPLES``) of up to ``--steps`` steps (default 50) per backend:

- ``redis``: ``RedisThrottleBackend`` on ``BENCH_REDIS_URL`` (default
  ``redis://127.0.0.1:6379/13``), a fresh key prefix per example, deleted after it (the
  database is not flushed);
- ``postgresql``: ``DatabaseCacheThrottleBackend`` on the table ``tw_bench_throttle_properties``
  of ``DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/task_workflow_bench``,
  created when missing; only the cache table is created, no migrations);
- ``sqlite``: the same backend on a SQLite file in the temporary directory.

Each backend runs in a process of its own (Django is set up once per process). Failing
examples are printed by hypothesis as it finds them (shrunk, unless ``--no-shrink``) and
kept in ``.hypothesis/``, where ``make test`` replays them. Prints per backend: examples
run (including hypothesis' replays and shrinking), steps, distinct failures, seconds.
Exits non-zero if any backend failed. Leases are 0.15-1 s and the "let leases lapse" rule
sleeps, so a run takes roughly 0.1-0.3 s per example.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("redis", "postgresql", "sqlite")
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/task_workflow_bench"
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/13"
CACHE_TABLE = "tw_bench_throttle_properties"
SUMMARY = "SUMMARY "


def setup_django(backend: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in ("THROTTLE_REDIS_URL", "THROTTLE_CACHE", "TEST_DATABASE"):
        os.environ.pop(name, None)
    if backend == "sqlite":
        os.environ["TEST_DATABASE"] = "sqlite"
        path = Path(tempfile.gettempdir()) / "tw_throttle_properties.sqlite3"
        os.environ["DATABASE_URL"] = f"sqlite:///{path}"
    else:
        url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        os.environ["DATABASE_URL"] = url
        os.environ["REDIS_URL"] = REDIS_URL
        if backend == "postgresql":
            from benchmarks.support import ensure_database

            ensure_database(url)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ["DJANGO_DEBUG"] = "0"  # DEBUG keeps every query in memory
    import django

    django.setup()
    if backend != "redis":
        from django.core.management import call_command

        call_command("createcachetable", CACHE_TABLE, verbosity=0)


def run_one(backend: str, examples: int, steps: int, shrink: bool, seed: int | None) -> dict:
    """Run one backend's machine in this process; its summary."""
    setup_django(backend)
    from hypothesis import Phase
    from hypothesis.stateful import run_state_machine_as_test

    from tests.throttle_model import ThrottleMachine, database_subject, machine_for, redis_subject

    if backend == "redis":
        label = "redis"
        machine = machine_for(label, lambda: redis_subject(REDIS_URL))
    else:
        from django.conf import settings

        vendor = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        label = f"database-{vendor}"  # the test's machine: failures replay there too
        machine = machine_for(label, lambda: database_subject(CACHE_TABLE, label))
    if seed is not None:
        machine._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    phases = list(Phase) if shrink else [p for p in Phase if p not in (Phase.shrink, Phase.explain)]
    options = {"phases": phases, "report_multiple_bugs": True}
    from tests.throttle_model import settings_for

    found: list[BaseException] = []
    start = time.perf_counter()
    try:
        run_state_machine_as_test(machine, settings=settings_for(examples, steps, **options))
    except BaseExceptionGroup as group:
        found = list(group.exceptions)
    except Exception as exc:
        found = [exc]
    seconds = time.perf_counter() - start
    for exc in found:  # with hypothesis' notes: the failing sequence of steps
        print(f"=== {label}: failure", flush=True)
        traceback.print_exception(exc, file=sys.stdout)
    failures = [f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}" for exc in found]
    stats = ThrottleMachine.stats
    return {
        "backend": backend,
        "label": label,
        "examples": stats[f"{label}:examples"],
        "steps": stats[f"{label}:steps"],
        "failures": failures,
        "seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--examples", type=int, default=int(os.environ.get("THROTTLE_PROPERTIES_EXAMPLES", 2000))
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--backend", choices=BACKENDS, action="append", help="(repeatable; default: all)")
    parser.add_argument("--no-shrink", action="store_true", help="report failures unshrunk (faster)")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: random)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backends = args.backend or list(BACKENDS)

    if args.child:
        summary = run_one(backends[0], args.examples, args.steps, not args.no_shrink, args.seed)
        print(SUMMARY + json.dumps(summary), flush=True)
        return 0

    summaries = []
    for backend in backends:
        print(f"--- {backend}: {args.examples} examples x up to {args.steps} steps", flush=True)
        command = [sys.executable, __file__, "--child", "--backend", backend]
        command += ["--examples", str(args.examples), "--steps", str(args.steps)]
        command += ["--no-shrink"] if args.no_shrink else []
        command += ["--seed", str(args.seed)] if args.seed is not None else []
        child = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
        summary = None
        for line in child.stdout.splitlines():
            if line.startswith(SUMMARY):
                summary = json.loads(line[len(SUMMARY) :])
            else:
                print(line)
        if summary is None:
            summary = {"backend": backend, "examples": 0, "steps": 0, "seconds": 0.0}
            summary["failures"] = [f"the run itself failed (exit code {child.returncode})"]
        summaries.append(summary)

    print()
    print(f"{'backend':<12} {'examples':>9} {'steps':>9} {'failures':>9} {'seconds':>9}")
    for s in summaries:
        print(
            f"{s['backend']:<12} {s['examples']:>9} {s['steps']:>9} {len(s['failures']):>9} {s['seconds']:>9}"
        )
        for failure in s["failures"]:
            print(f"    {failure}")
    return 1 if any(s["failures"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
