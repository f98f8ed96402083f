"""Every performance goal of the library in one run: each goal, the measured value, met or not.

How to run (needs what the three scripts need: PostgreSQL on 127.0.0.1:5432, Redis on
127.0.0.1:6379, whose db 12 ``end_to_end.py`` flushes, and ``redis-server`` on the PATH)::

    .venv/bin/python benchmarks/performance.py            # the scripts' default sizes (~10 min)
    .venv/bin/python benchmarks/performance.py --quick    # short runs (~2 min), noisier
    .venv/bin/python benchmarks/performance.py --only throttle_scale,end_to_end

It runs, one after the other, each in a process of its own (each sets Django up with its
own settings and database):

- ``throttle_scale.py``: throttle acquire+release latency with 1, 100, 10,000 and 100,000
  live groups and with 0 to 1,000 waiters in line (must not grow with groups, at most
  logarithmically with waiters);
- ``transition_floor.py``: ``apply_transition`` vs the raw-SQL floor of the same statements
  (<= 1.8x); skipped with "transition_floor: not available" when that module is missing;
- ``end_to_end.py``: tasks per second through a real worker, bare vs ``@throttle``,
  ``@transition`` and both, in the recommended worker configuration (the goals) and in
  Celery's default (for comparison).

Each script prints its own tables as it goes; this script then prints one summary table.
Each module exposes ``measure(...) -> list[dict]`` with rows ``{"name", "value", "goal",
"met"}`` (``goal`` and ``met`` are ``None`` for figures shown without a goal). Exit status 1
when a script failed (not when a goal is missed).
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Script -> (keyword arguments of its ``measure()``: default run, quick run).
SCRIPTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "throttle_scale": ({"rounds": 60, "ops": 100}, {"rounds": 10, "ops": 100}),
    "transition_floor": ({"rounds": 20, "ops": 300}, {"rounds": 4, "ops": 100}),
    "end_to_end": ({"rounds": 5, "tasks": 2000}, {"rounds": 2, "tasks": 500}),
}


def _run_in_child(name: str, kwargs: dict[str, Any], conn: Connection) -> None:
    """Import ``benchmarks.<name>`` and send back what its ``measure(**kwargs)`` returned."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module_name = f"benchmarks.{name}"
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                conn.send(("missing", None))
                return
            raise
        measure = getattr(module, "measure", None)
        if measure is None:
            conn.send(("missing", None))
            return
        rows = measure(**kwargs)
        sys.stdout.flush()
        conn.send(("ok", rows))
    except BaseException as exc:
        sys.stdout.flush()
        conn.send(("error", "".join(traceback.format_exception(exc))))
        if not isinstance(exc, Exception):
            raise


def run_script(name: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """``("ok", rows)``, ``("missing", None)`` or ``("error", traceback)``."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_run_in_child, args=(name, kwargs, sender), name=f"bench-{name}")
    process.start()
    sender.close()
    try:
        try:
            outcome: tuple[str, Any] = receiver.recv()
        except EOFError:
            outcome = ("error", f"the {name} process exited ({process.exitcode}) without a result")
        process.join()
        return outcome
    except BaseException:
        # Ctrl-C reached the child too: give it the time to stop its workers and servers.
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
            process.join(timeout=30)
        raise


def format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def summary(results: dict[str, tuple[str, Any]]) -> bool:
    """Print the summary table; ``True`` when no script failed."""
    width = max(
        [
            len(str(row.get("name", "")))
            for _, rows in results.values()
            if isinstance(rows, list)
            for row in rows
        ]
        + [40]
    )
    print("\n" + "=" * (width + 32))
    print(f"{'figure':<{width}}  {'value':>8}  {'goal':<8}  met")
    print("-" * (width + 32))
    counts = {"met": 0, "NOT met": 0}
    ok = True
    for name, (status, rows) in results.items():
        if status == "missing":
            print(f"{name}: not available")
            continue
        if status == "error":
            ok = False
            print(f"{name}: FAILED ({str(rows).strip().splitlines()[-1]})")
            continue
        for row in rows:
            goal, met = row.get("goal"), row.get("met")
            verdict = "" if met is None else ("met" if met else "NOT met")
            if met is not None:
                counts[verdict] += 1
            goal_text = "" if goal is None else str(goal)
            print(f"{row['name']:<{width}}  {format_value(row['value']):>8}  {goal_text:<8}  {verdict}")
    print("-" * (width + 32))
    print(f"goals: {counts['met']} met, {counts['NOT met']} NOT met")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (fewer rounds and operations)")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated scripts to run")
    args = parser.parse_args()
    names = args.only.split(",")
    for name in names:
        if name not in SCRIPTS:
            parser.error(f"unknown script {name!r} (known: {', '.join(SCRIPTS)})")
    results: dict[str, tuple[str, Any]] = {}
    for name in names:
        kwargs = SCRIPTS[name][1 if args.quick else 0]
        print(f"\n### {name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})", flush=True)
        started = time.monotonic()
        results[name] = run_script(name, kwargs)
        status, detail = results[name]
        if status == "missing":
            print(f"{name}: not available")
        elif status == "error":
            print(f"{name} failed:\n{detail}", file=sys.stderr)
        print(f"### {name}: {time.monotonic() - started:.0f} s", flush=True)
    sys.exit(0 if summary(results) else 1)


if __name__ == "__main__":
    main()
