"""What every benchmark script shares: Django and Redis set-up, interleaved timing, the
ratio table and the verdict lines.

The scripts import it as a sibling module (``import harness``: a script's own directory is
the first entry of ``sys.path``), not as ``benchmarks.harness``, so that a run can measure
another copy of the library::

    cd /work/before && PYTHONPATH=/work/before:/work/main .venv/bin/python /work/main/benchmarks/transition.py

There ``import task_workflow`` (and ``example_project``, ``tests``) resolve to the copy on
``PYTHONPATH``; the checkout holding this file is only appended to ``sys.path`` as a last
resort. Every script prints which ``task_workflow`` it measured first (:func:`show_code`).

Timing (:func:`interleaved`): rounds of ``ops`` operations of every variant, alternating op
by op (``A B C A B C ...``), the variants' order rotated every round, one warm-up round
discarded; every op is timed on its own with ``perf_counter_ns``. So drift, caching and the
machine's other work weigh on every variant alike, and each variant is compared with its
floor measured in the same rounds (:func:`ratio_table`: medians, p90, p99 and the ratio of
medians to the floor's). A verdict line (:func:`verdict`) reads::

    VERDICT transition: apply_transition / hand-written ORM = 1.04 (goal <= 1.10): met
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
#: The checkout holding the benchmarks (and, unless ``PYTHONPATH`` says otherwise, the code).
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: a copy there wins

POSTGRES = "postgres://postgres@127.0.0.1:5432"
#: The micro benchmarks' database (created and migrated when missing).
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL") or f"{POSTGRES}/task_workflow_bench"
#: Flushed by the scripts that use it (``BENCH_REDIS_URL`` picks another database).
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/13"


# -- set-up ---------------------------------------------------------------------------


def _git(where: Path, *args: str) -> str:
    """``git -C where args``'s output, stripped ("" when git fails)."""
    return subprocess.run(
        ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()


def show_code() -> str:
    """Print (and return) which ``task_workflow`` this process measures, and its commit."""
    import task_workflow

    where = Path(task_workflow.__file__).resolve().parent
    try:
        commit = _git(where, "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M")
        dirty = _git(where, "status", "--porcelain", "--", ".")
    except OSError:
        commit, dirty = "", ""
    note = f" (git {commit}{', uncommitted changes' if dirty else ''})" if commit else " (not a git checkout)"
    line = f"task_workflow: {task_workflow.__file__}{note}"
    print(line, flush=True)
    return line


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database named in ``url`` unless it exists (through a
    connection to the ``postgres`` database)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    params: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": unquote(parts.username or "postgres"),
        "dbname": "postgres",
        "autocommit": True,
    }
    if parts.password:
        params["password"] = unquote(parts.password)
    with psycopg.connect(**params) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}")


def django_env(
    settings_module: str, database_url: str | None = None, redis_url: str | None = None
) -> dict[str, str]:
    """The environment a benchmark process (or a worker it starts) sets Django up with:
    ``DEBUG`` off (Django would keep every query), the example project's files under the
    temporary directory, none of the test settings' alternative stores."""
    env = {
        "DJANGO_SETTINGS_MODULE": settings_module,
        "DJANGO_DEBUG": "0",
        "TASK_WORKFLOW_VAR_DIR": str(Path(tempfile.gettempdir()) / "task_workflow_bench"),
    }
    if database_url:
        env["DATABASE_URL"] = database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def setup_django(
    settings_module: str,
    *,
    database_url: str | None = DATABASE_URL,
    redis_url: str | None = None,
    migrate: bool = True,
    quiet: bool = False,
) -> dict[str, str]:
    """Django on ``settings_module``, with the database at ``database_url`` (created when
    missing and migrated, unless ``migrate`` is off or it is ``None``: then the settings'
    own) and ``redis_url`` as ``REDIS_URL``; returns the environment set (for workers)."""
    for name in ("THROTTLE_REDIS_URL", "THROTTLE_CACHE", "TEST_DATABASE"):
        os.environ.pop(name, None)
    env = django_env(settings_module, database_url, redis_url)
    os.environ.update(env)
    if database_url and database_url.startswith("postgres") and migrate:
        ensure_database(database_url)
    import django

    django.setup()
    if not quiet:
        show_code()
    if database_url and migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
    return env


def redis_client(url: str = REDIS_URL, *, flush: bool = False) -> Any:
    """A redis-py client of ``url``; its database flushed first with ``flush``."""
    import redis

    client = redis.Redis.from_url(url)
    if flush:
        client.flushdb()
    return client


# -- timing ---------------------------------------------------------------------------

#: One op of a variant: called with the op's index in the round (0 .. ops - 1).
Op = Callable[[int], Any]


def acquire_metadata(task_name: str, key: str | None, ttl: float) -> dict[str, Any]:
    """The metadata a throttle sends with an acquire, for benchmarks that call a backend
    directly (the same fields, so the scripts store as much as in real use)."""
    return {
        "task_name": task_name,
        "key": key,
        "concurrency": 1,
        "task_id": None,
        "hostname": "bench-host",
        "pid": os.getpid(),
        "ttl": ttl,
        "acquired_at": time.time(),
    }


def interleaved(
    variants: Mapping[str, Op],
    *,
    rounds: int,
    ops: int,
    before_round: Callable[[int, list[str]], None] | None = None,
    warmup: int = 1,
) -> dict[str, list[int]]:
    """Nanoseconds per op of every variant over ``rounds`` rounds (after ``warmup`` rounds
    discarded). Each round runs op ``i`` of every variant before op ``i + 1`` of any, in an
    order rotated every round; ``before_round(round_no, order)`` runs untimed first
    (``round_no`` < 0 for warm-up rounds)."""
    import gc

    names = list(variants)
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {name: [] for name in names}
    for round_no in range(-warmup, rounds):
        shift = round_no % len(names)
        order = names[shift:] + names[:shift]
        if round_no % 2:
            order.reverse()
        if before_round is not None:
            before_round(round_no, order)
        gc.collect()
        fns = [(variants[name], samples[name] if round_no >= 0 else []) for name in order]
        for i in range(ops):
            for fn, out in fns:
                start = clock()
                fn(i)
                out.append(clock() - start)
    return samples


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.99 for p99)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(math.ceil(fraction * len(ordered)) - 1, 0))]


@dataclass
class Stats:
    """Microseconds per op."""

    n: int
    median: float
    p90: float
    p99: float
    low: float

    @classmethod
    def of(cls, values_ns: Sequence[int]) -> Stats:
        us = [v / 1000 for v in values_ns]
        return cls(len(us), statistics.median(us), percentile(us, 0.90), percentile(us, 0.99), min(us))


def ratio_table(
    title: str,
    samples: Mapping[str, Sequence[int]],
    floor: str,
    *,
    informational: Iterable[str] = (),
) -> dict[str, float]:
    """Print each variant's median, p90, p99 and min (µs per op) and its ratio of medians
    to ``floor``'s; variants in ``informational`` are marked so. Returns the ratios."""
    extra = set(informational)
    stats = {name: Stats.of(values) for name, values in samples.items()}
    base = stats[floor].median
    width = max(len(name) for name in samples) + 2
    print(f"\n{title}")
    print(f"  {'variant':<{width}}{'median us':>11}{'p90':>9}{'p99':>9}{'min':>9}{'/ floor':>9}")
    ratios: dict[str, float] = {}
    for name, st in stats.items():
        ratios[name] = st.median / base
        mark = "  (floor)" if name == floor else ("  (information)" if name in extra else "")
        print(
            f"  {name:<{width}}{st.median:>11.1f}{st.p90:>9.1f}{st.p99:>9.1f}{st.low:>9.1f}"
            f"{ratios[name]:>8.3f}x{mark}"
        )
    n = min(st.n for st in stats.values())
    print(f"  ({n} timed ops per variant)")
    return ratios


def verdict(
    benchmark: str, what: str, value: float, goal: float, *, unit: str = "", at_least: bool = False
) -> bool:
    """Print ``VERDICT <benchmark>: <what> = <value> (goal <= <goal>): met`` (``>=`` with
    ``at_least``); return whether the goal was met."""
    met = value >= goal if at_least else value <= goal
    sign = ">=" if at_least else "<="
    print(
        f"VERDICT {benchmark}: {what} = {value:.3f}{unit} (goal {sign} {goal:g}{unit}): "
        f"{'met' if met else 'NOT met'}",
        flush=True,
    )
    return met


def info(benchmark: str, what: str, value: float, unit: str = "") -> None:
    """A figure printed beside the verdicts, without a goal."""
    print(f"INFO {benchmark}: {what} = {value:.3f}{unit}", flush=True)
