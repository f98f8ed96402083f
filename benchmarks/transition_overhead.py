"""Overhead of the ``@transition`` decorator over the same locked transition written by hand.

How to run (needs PostgreSQL; creates the database if it is missing and migrates it)::

    .venv/bin/python benchmarks/transition_overhead.py [--rounds 20] [--ops 300]

``DATABASE_URL`` selects the database (default
``postgres://postgres@127.0.0.1:5432/task_workflow_bench``); no broker is used. Two
variants apply ``Instance.begin_stopping`` (online -> stopping) to a row and then call an
empty body:

- ``decorated``: a ``@transition(Instance, "begin_stopping")`` function called directly
  (as a plain function, so no Celery request; everything else is the production path:
  uuid parsing, the re-run marker lookup, the router, the locked read, the transition,
  the save, the commit);
- ``hand-written``: ``with transaction.atomic(): inst = Instance.objects
  .select_for_update().get(uuid=...); inst.begin_stopping(); inst.save()`` and then the
  same empty body.

Each round runs ``--ops`` operations of each variant, alternating op by op (``A B A B``,
order flipped every other round) on two disjoint sets of ``online`` rows that swap
between rounds, so drift, caching and the rows themselves hit both alike. Between rounds,
outside the timed part, one raw ``UPDATE`` puts every row back to ``online`` and a
``VACUUM`` removes the dead row versions. Every op is timed on its own; the figure is the
median over all ops (p90 and the median of per-round means are shown too). Target:
decorated <= 1.10x hand-written. A ``SELECT 1`` round trip is printed for scale.

It also prints the statements one transition of each variant sends, twice: as Django
logs them (``CaptureQueriesContext``; Django 5.2 logs ``BEGIN`` and ``COMMIT`` too) and
as they go over the wire (libpq protocol trace of the psycopg connection: every statement
the server receives, and the round trips, counted as ``ReadyForQuery`` replies), so a
statement that bypasses Django's cursor (an implicit ``BEGIN``) cannot hide. Last, the
decorated call inside a caller's ``transaction.atomic()``, where its own ``atomic()``
becomes a savepoint.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/task_workflow_bench"
TARGET = 1.10


def setup_django(url: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "example_project.settings"
    # DEBUG would make Django keep every query in connection.queries: not production.
    os.environ["DJANGO_DEBUG"] = "0"
    # The example settings keep their embedded broker and cache under a var/ directory.
    os.environ.setdefault("TASK_WORKFLOW_VAR_DIR", str(Path(tempfile.gettempdir()) / "task_workflow_bench"))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def make_variants() -> dict[str, Callable[[str], Any]]:
    from django.contrib.contenttypes.models import ContentType
    from django.db import transaction

    from example_project.models import Instance
    from task_workflow.conf import get_setting
    from task_workflow.models import TransitionRecord
    from task_workflow.tasks import transition

    def body(instance_uuid: str, transition_entity: Instance | None = None) -> None:
        """The task body: does nothing."""

    decorated = transition(Instance, "begin_stopping")(body)

    history = get_setting("TRANSITION_HISTORY")

    def hand_written(instance_uuid: str) -> None:
        with transaction.atomic():
            inst = Instance.objects.select_for_update().get(uuid=instance_uuid)
            source = inst.state
            inst.begin_stopping()
            inst.save()
            if history:  # the same history row the decorator writes
                TransitionRecord.objects.create(
                    content_type=ContentType.objects.get_for_model(Instance, for_concrete_model=False),
                    object_id=str(inst.pk),
                    entity_uuid=inst.uuid,
                    transition="begin_stopping",
                    source_state=source,
                    target_state=inst.state,
                )
        body(instance_uuid, transition_entity=inst)

    return {"decorated": decorated, "hand-written": hand_written}


def make_rows(count: int) -> list[str]:
    """``count`` fresh online instances (the table is emptied first); their uuids."""
    from example_project.models import Instance

    Instance.objects.all().delete()
    rows = [
        Instance(name=f"bench-{i}", backend_id=f"i-{i}", state=Instance.States.ONLINE) for i in range(count)
    ]
    Instance.objects.bulk_create(rows)
    return [str(row.uuid) for row in rows]


def reset_rows() -> None:
    """Every row back to online, then drop the dead row versions (untimed)."""
    from django.db import connection

    from example_project.models import Instance

    table = connection.ops.quote_name(Instance._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET state = %s WHERE state <> %s", ["online", "online"])
        cursor.execute(f"VACUUM {table}")


def run_round(
    variants: dict[str, Callable[[str], Any]], row_sets: dict[str, list[str]], samples: dict[str, list[int]]
) -> None:
    """One op of each variant in turn, on that variant's rows; append ns per op."""
    names = list(variants)
    clock = time.perf_counter_ns
    for position in range(len(row_sets[names[0]])):
        for name in names:
            fn, instance_uuid = variants[name], row_sets[name][position]
            start = clock()
            fn(instance_uuid)
            samples[name].append(clock() - start)


def roundtrip_us(n: int = 2000) -> float:
    from django.db import connection

    times = []
    with connection.cursor() as cursor:
        for _ in range(n):
            start = time.perf_counter_ns()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def classify(sql: str) -> str:
    text = sql.lstrip().upper()
    # Statements sharing a message (apply_transition's own transaction):
    # BEGIN; SELECT ... FOR UPDATE, and INSERT ...; COMMIT.
    if text.startswith("BEGIN") and ";" in text:
        first, rest = text.split(";", 1)
        return f"{classify(first)} + {classify(rest)}"
    if text.endswith("; COMMIT"):
        return f"{classify(text.removesuffix('; COMMIT'))} + COMMIT"
    if text.startswith("SELECT") and "FOR UPDATE" in text:
        return "SELECT ... FOR UPDATE"
    for keyword in ("SELECT", "UPDATE", "INSERT", "DELETE", "BEGIN", "COMMIT", "ROLLBACK"):
        if text.startswith(keyword):
            return keyword
    if text.startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")):
        return "SAVEPOINT/RELEASE"
    return text.split(None, 1)[0] if text else "(empty)"


def captured_statements(fn: Callable[[str], Any], instance_uuid: str) -> list[str]:
    """SQL run through Django cursors by one call (``CaptureQueriesContext``)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        fn(instance_uuid)
    return [query["sql"] for query in captured.captured_queries]


TRACE_STATEMENT = re.compile(r'^F\t\d+\t(Query|Parse)\t (?:"[^"]*" )?"(.*)"')


def wire_statements(fn: Callable[[str], Any], instance_uuid: str) -> tuple[list[str], int]:
    """Statements one call sends to the server (libpq protocol trace) and how many round
    trips it makes (``ReadyForQuery`` messages: one per statement exchange)."""
    from django.db import connection
    from psycopg import pq

    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            fn(instance_uuid)
        finally:
            pgconn.untrace()
        trace.seek(0)
        lines = trace.read().splitlines()
    statements = [match.group(2) for line in lines if (match := TRACE_STATEMENT.match(line))]
    roundtrips = sum(1 for line in lines if line.startswith("B\t") and "\tReadyForQuery\t" in line)
    return statements, roundtrips


def print_statements(variants: dict[str, Callable[[str], Any]], uuids: list[str]) -> None:
    for index, name in enumerate(variants):
        reset_rows()
        django_sql = captured_statements(variants[name], uuids[2 * index])
        wire_sql, roundtrips = wire_statements(variants[name], uuids[2 * index + 1])
        django_counts = Counter(classify(sql) for sql in django_sql)
        wire_counts = Counter(classify(sql) for sql in wire_sql)
        print(f"\nSQL per transition, {name}:")
        print(f"  CaptureQueriesContext: {len(django_sql)} statements: {dict(django_counts)}")
        for sql in django_sql:
            print(f"    {sql if len(sql) <= 150 else sql[:147] + '...'}")
        print(
            f"  on the wire (libpq trace): {len(wire_sql)} statements, {roundtrips} round trips:",
            dict(wire_counts),
        )
    # Inside a caller's transaction the decorator's atomic() becomes a savepoint.
    from django.db import transaction

    reset_rows()
    with transaction.atomic():
        nested_sql = captured_statements(variants["decorated"], uuids[-1])
    nested_counts = Counter(classify(sql) for sql in nested_sql)
    print(f"\nSQL per transition, decorated inside an outer atomic(): {len(nested_sql)} statements:")
    print(f"  {dict(nested_counts)}")


def summarize(values_ns: list[int]) -> tuple[float, float, float]:
    us = sorted(v / 1000 for v in values_ns)
    return statistics.median(us), us[int(len(us) * 0.9)], us[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ops", type=int, default=300, help="transitions per variant per round")
    parser.add_argument(
        "--no-history",
        action="store_true",
        help="TRANSITION_HISTORY off (both variants skip the history row)",
    )
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.support import ensure_database

    ensure_database(url)
    setup_django(url)
    from django.conf import settings
    from django.db import connection

    settings.TASK_WORKFLOW = {**settings.TASK_WORKFLOW, "TRANSITION_HISTORY": not args.no_history}
    print(f"transition history: {'off' if args.no_history else 'on (both variants write the history row)'}")
    variants = make_variants()
    names = list(variants)
    uuids = make_rows(args.ops * len(names))
    row_sets = {name: uuids[i * args.ops : (i + 1) * args.ops] for i, name in enumerate(names)}

    reset_rows()
    run_round(variants, row_sets, {name: [] for name in names})  # warm-up, not counted

    samples: dict[str, list[int]] = {name: [] for name in names}
    round_means: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        reset_rows()
        order = names if round_no % 2 == 0 else names[::-1]
        # Swap the row sets every round so each variant works on every row.
        sets = list(row_sets.values())
        if round_no % 2:
            sets = sets[::-1]
        this_round: dict[str, list[int]] = {name: [] for name in order}
        run_round({name: variants[name] for name in order}, dict(zip(names, sets, strict=True)), this_round)
        for name, values in this_round.items():
            samples[name].extend(values)
            round_means[name].append(statistics.fmean(values) / 1000)

    rtt = roundtrip_us()
    settings = connection.settings_dict
    connection.ensure_connection()
    server = connection.connection.info.server_version
    print(
        f"transition overhead on PostgreSQL {server // 10000}.{server % 10000} "
        f"({settings['HOST']}:{settings['PORT']}/{settings['NAME']}): "
        f"{args.rounds} rounds x {args.ops} ops per variant, interleaved op by op"
    )
    print(f"PostgreSQL round trip (SELECT 1 median): {rtt:.1f} us")
    print(f"{'variant':<14}{'median us/op':>14}{'p90':>9}{'min':>9}{'round means':>13}{'vs hand':>9}")
    base = summarize(samples["hand-written"])[0]
    for name in names:
        median, p90, low = summarize(samples[name])
        print(
            f"{name:<14}{median:>14.1f}{p90:>9.1f}{low:>9.1f}"
            f"{statistics.median(round_means[name]):>13.1f}{median / base:>8.3f}x"
        )
    ratio = summarize(samples["decorated"])[0] / base
    delta = summarize(samples["decorated"])[0] - base
    verdict = "MET" if ratio <= TARGET else "MISSED"
    print(f"target decorated <= {TARGET:.2f}x hand-written: {verdict} ({ratio:.3f}x, {delta:+.1f} us/op)")

    print_statements(variants, uuids)


if __name__ == "__main__":
    main()
