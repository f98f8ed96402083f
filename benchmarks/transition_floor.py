"""``apply_transition`` against the raw-SQL floor of the very statements it sends.

How to run (needs PostgreSQL; creates the database if it is missing and migrates it)::

    .venv/bin/python benchmarks/transition_floor.py [--rounds 20] [--ops 300]

``DATABASE_URL`` selects the database (default
``postgres://postgres@127.0.0.1:5432/task_workflow_bench_floor``); no broker is used.
Two variants move an example ``Instance`` from ``online`` to ``stopping``:

- ``apply_transition``: ``apply_transition(Instance, "<uuid>", "begin_stopping")``
  called in-process, the production path (uuid parsing, the router, ``atomic()``, the
  locked read, django-fsm's transition and its signals, the save, the history row, the
  commit), with the transition history on;
- ``raw SQL``: the statements ``apply_transition`` sent for that same row, replayed
  through a psycopg 3 connection of its own: same SQL text, same parameters, same
  cursor kind as Django's (client-side binding unless ``server_side_binding`` is on in
  ``OPTIONS``, the same ``prepare_threshold``), same adapters, the same ``BEGIN`` (in
  the first statement's message, ``BEGIN; SELECT ... FOR UPDATE``, where
  ``apply_transition`` sends it so; else psycopg's implicit one) and a ``COMMIT``,
  fetching every result row. That is the floor: the round trips and the server's work,
  without the ORM.

The replayed statements are captured, untimed, before the rounds: one
``apply_transition`` per row inside ``connection.execute_wrapper``, which sees the SQL
and parameters exactly as Django hands them to the psycopg cursor. Before timing, one
row is traced on the wire (libpq protocol trace) once through ``apply_transition`` and
once through the replay; the two traces must be identical (message type and text of
every statement, ``BEGIN`` and ``COMMIT`` included) or the script stops. So if
``apply_transition`` changes the statements it sends (e.g. a shorter ``UPDATE``), the
floor follows.

Each round runs ``--ops`` operations of each variant, alternating op by op (order flipped
every other round) on two disjoint sets of ``online`` rows that swap between rounds.
Between rounds, outside the timed part, one raw ``UPDATE`` puts every row back to
``online``, the history table is emptied, and a ``VACUUM`` removes the dead row versions.
Every op is timed on its own; the figure is the median over all ops. Goal:
``apply_transition`` <= 1.8x the raw-SQL floor.

``measure(rounds, ops)`` prints the same report and returns the goal (and both ms/op,
without a goal) as rows for ``benchmarks/performance.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.transition_overhead import (  # noqa: E402
    TRACE_STATEMENT,
    classify,
    make_rows,
    roundtrip_us,
    run_round,
    setup_django,
    summarize,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/task_workflow_bench_floor"
GOAL = 1.8
TRANSITION = "begin_stopping"
ORM, RAW = "apply_transition", "raw SQL"

#: One statement as Django handed it to the psycopg cursor: (sql, params, executemany).
Statement = tuple[str, Any, bool]


# --- Setup -------------------------------------------------------------------------------


def ensure_django(url: str) -> None:
    """Set Django up on ``url`` unless another benchmark of the same run already did
    (``benchmarks/performance.py`` imports several); then the configured database is used."""
    from django.conf import settings

    if settings.configured:
        import django
        from django.core.management import call_command

        django.setup()  # a no-op once the apps are ready
        call_command("migrate", verbosity=0)
        return
    from benchmarks.support import ensure_database

    ensure_database(url)
    setup_django(url)


@contextmanager
def history_on() -> Iterator[None]:
    """The transition history on (the default) for the measurement, whatever was set."""
    from django.conf import settings

    saved = settings.TASK_WORKFLOW
    settings.TASK_WORKFLOW = {**(saved or {}), "TRANSITION_HISTORY": True}
    try:
        yield
    finally:
        settings.TASK_WORKFLOW = saved


def raw_connection() -> Any:
    """A psycopg 3 connection set up as Django sets up its own: the same connection
    parameters (``OPTIONS``, adapters with Django's time zone loaders,
    ``prepare_threshold``), and a plain psycopg cursor of the same binding kind as
    Django's (``ClientCursor`` by default, server-side binding with
    ``OPTIONS["server_side_binding"]``). Not in autocommit: the first statement of a
    transaction sends the implicit ``BEGIN``, as in Django's ``atomic()``."""
    import psycopg
    from django.db import connection

    params = connection.get_connection_params()
    server_side = connection.settings_dict["OPTIONS"].get("server_side_binding") is True
    params["cursor_factory"] = psycopg.Cursor if server_side else psycopg.ClientCursor
    raw = psycopg.connect(**params)
    # Django sets the session time zone on connect when the server's differs.
    if raw.info.parameter_status("TimeZone") != connection.timezone_name:
        raw.execute("SELECT set_config('TimeZone', %s, false)", [connection.timezone_name])
    raw.commit()
    return raw


def reset_rows() -> None:
    """Every row back to online, the history emptied, dead row versions dropped (untimed)."""
    from django.db import connection

    from example_project.models import Instance
    from task_workflow.models import TransitionRecord

    table = connection.ops.quote_name(Instance._meta.db_table)
    history = connection.ops.quote_name(TransitionRecord._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET state = %s WHERE state <> %s", ["online", "online"])
        cursor.execute(f"TRUNCATE {history}")
        cursor.execute(f"VACUUM {table}")


# --- The two variants --------------------------------------------------------------------


def run_orm(instance_uuid: str) -> None:
    from example_project.models import Instance
    from task_workflow.transitions import apply_transition

    apply_transition(Instance, instance_uuid, TRANSITION)


def capture(instance_uuid: str) -> list[Statement]:
    """The statements one ``apply_transition`` of this row hands to psycopg (applied)."""
    from django.db import connection

    statements: list[Statement] = []

    def record(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append((sql, params, many))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        run_orm(instance_uuid)
    return statements


def replay(raw: Any, statements: list[Statement]) -> None:
    """The floor: the same statements, one cursor, every result row fetched, COMMIT.

    A first statement that opens the transaction itself (``BEGIN; ...``) is sent in
    autocommit, so that psycopg sends no ``BEGIN`` of its own; ``commit()`` ends the
    transaction the server has open either way."""
    opens_itself = statements[0][0].startswith("BEGIN")
    if raw.autocommit != opens_itself:
        raw.autocommit = opens_itself
    with raw.cursor() as cursor:
        for sql, params, many in statements:
            if many:
                cursor.executemany(sql, params)
            else:
                cursor.execute(sql, params)
            while True:  # BEGIN; SELECT ...: two results
                if cursor.description is not None:
                    cursor.fetchall()
                if not cursor.nextset():
                    break
    raw.commit()


# --- The check that the floor sends what apply_transition sends --------------------------


def wire_trace(pgconn: Any, fn: Callable[[], Any]) -> list[str]:
    """Every statement message (``Query``/``Parse``) ``fn`` sends on ``pgconn``."""
    from psycopg import pq

    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            fn()
        finally:
            pgconn.untrace()
        trace.seek(0)
        lines = trace.read().splitlines()
    return [f"{match.group(1)} {match.group(2)}" for line in lines if (match := TRACE_STATEMENT.match(line))]


def check_same_wire(raw: Any, instance_uuid: str) -> list[str]:
    """Trace one ``apply_transition`` and its replay on the wire; stop unless identical.
    Returns the statements (leaves the row applied; the caller resets)."""
    from django.db import connection

    connection.ensure_connection()
    captured: list[Statement] = []
    orm_wire = wire_trace(connection.connection.pgconn, lambda: captured.extend(capture(instance_uuid)))
    reset_rows()
    raw_wire = wire_trace(raw.pgconn, lambda: replay(raw, captured))
    if orm_wire != raw_wire:
        raise SystemExit(
            "the raw replay does not send what apply_transition sends:\n  "
            + "\n  ".join(orm_wire)
            + "\nvs\n  "
            + "\n  ".join(raw_wire)
        )
    return orm_wire


# --- Timing ------------------------------------------------------------------------------


def timed_rounds(raw: Any, uuids: list[str], rounds: int, ops: int) -> dict[str, list[int]]:
    """Interleaved rounds (plus one discarded warm-up round); ns per op of each variant."""
    reset_rows()
    statements = {instance_uuid: capture(instance_uuid) for instance_uuid in uuids}
    variants: dict[str, Callable[[str], Any]] = {
        ORM: run_orm,
        RAW: lambda instance_uuid: replay(raw, statements[instance_uuid]),
    }
    names = list(variants)
    halves = [uuids[:ops], uuids[ops : 2 * ops]]
    samples: dict[str, list[int]] = {name: [] for name in names}
    for round_no in range(-1, rounds):  # round -1 warms up
        reset_rows()
        order = names if round_no % 2 == 0 else names[::-1]
        sets = halves if round_no % 2 == 0 else halves[::-1]
        this_round: dict[str, list[int]] = {name: [] for name in names}
        run_round({name: variants[name] for name in order}, dict(zip(names, sets, strict=True)), this_round)
        if round_no >= 0:
            for name in names:
                samples[name].extend(this_round[name])
    reset_rows()
    return samples


def run(rounds: int, ops: int, url: str | None = None) -> dict[str, Any]:
    """Everything ``main()`` prints: samples, the wire statements, the setting."""
    ensure_django(url or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    from django.db import connection

    with history_on(), raw_connection() as raw:
        # The run empties and refills the table: another run on the same database waits.
        raw.execute("SELECT pg_advisory_lock(hashtext(%s))", ["task_workflow.benchmarks.transition_floor"])
        raw.commit()
        uuids = make_rows(2 * ops + 1)
        run_orm(uuids[-1])  # content type cache and first-use costs, outside the check
        reset_rows()
        wire = check_same_wire(raw, uuids[0])
        samples = timed_rounds(raw, uuids[: 2 * ops], rounds, ops)
    server = connection.connection.info.server_version
    return {
        "samples": samples,
        "wire": wire,
        "rtt_us": roundtrip_us(),
        "server": f"{server // 10000}.{server % 10000}",
        "database": "{HOST}:{PORT}/{NAME}".format(**connection.settings_dict),
        "binding": "server-side"
        if connection.settings_dict["OPTIONS"].get("server_side_binding") is True
        else "client-side",
    }


def result_rows(samples: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The goal (the ratio of the medians), then both medians as figures without a goal."""
    orm, raw = summarize(samples[ORM])[0], summarize(samples[RAW])[0]
    ratio = orm / raw
    return [
        {
            "name": "apply_transition / raw-SQL floor of its statements (median per op)",
            "value": round(ratio, 3),
            "goal": f"<= {GOAL}x",
            "met": ratio <= GOAL,
        },
        {"name": "apply_transition, ms per op (median)", "value": orm / 1000, "goal": None, "met": None},
        {"name": "raw SQL floor, ms per op (median)", "value": raw / 1000, "goal": None, "met": None},
    ]


def print_report(result: dict[str, Any], rounds: int, ops: int) -> None:
    samples = result["samples"]
    print(
        f"apply_transition vs raw SQL on PostgreSQL {result['server']} ({result['database']}, "
        f"{result['binding']} binding): {rounds} rounds x {ops} ops per variant, "
        "interleaved op by op, transition history on"
    )
    print(f"PostgreSQL round trip (SELECT 1 median): {result['rtt_us']:.1f} us")
    print("statements per transition on the wire (identical for both variants):")
    for statement in result["wire"]:
        kind = classify(statement.split(" ", 1)[1])
        print(f"  {kind:<30} {statement if len(statement) <= 110 else statement[:107] + '...'}")
    floor = summarize(samples[RAW])[0]
    print(f"{'variant':<18}{'median ms/op':>14}{'p90':>9}{'min':>9}{'vs raw':>9}")
    for name in (ORM, RAW):
        median, p90, low = summarize(samples[name])
        print(f"{name:<18}{median / 1000:>14.3f}{p90 / 1000:>9.3f}{low / 1000:>9.3f}{median / floor:>8.2f}x")
    goal = result_rows(samples)[0]
    print(
        f"goal apply_transition <= {GOAL}x raw SQL: {'met' if goal['met'] else 'NOT met'} "
        f"({goal['value']:.2f}x)"
    )


def measure(rounds: int, ops: int) -> list[dict[str, Any]]:
    """Run, print the report, and return the rows ``{"name", "value", "goal", "met"}``
    for ``benchmarks/performance.py``: the goal first, then both ms/op (no goal)."""
    result = run(rounds, ops)
    print_report(result, rounds, ops)
    return result_rows(result["samples"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ops", type=int, default=300, help="transitions per variant per round")
    args = parser.parse_args()
    measure(args.rounds, args.ops)


if __name__ == "__main__":
    main()
