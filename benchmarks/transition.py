"""``apply_transition`` against the same transaction written by hand with Django's ORM.

How to run (needs PostgreSQL on 127.0.0.1:5432; the database ``task_workflow_bench``,
``BENCH_DATABASE_URL``, is created when missing and migrated; no broker, no Redis)::

    .venv/bin/python benchmarks/transition.py                 # 20 rounds x 200 ops per variant
    .venv/bin/python benchmarks/transition.py --rounds 5 --ops 100

The example project's ``Instance`` goes from ``online`` to ``stopping``, in-process:

- ``hand-written ORM`` (the floor): ``with transaction.atomic(): e =
  Instance.objects.select_for_update().get(uuid=u); e.begin_stopping();
  e.save(update_fields=[the fields the transition changes]);
  TransitionRecord.objects.create(the same values)``;
- ``apply_transition``: ``apply_transition(Instance, "<uuid>", "begin_stopping")`` from
  ``task_workflow.tasks``, with the transition history on (the default). Goal: <= 1.10x
  the floor (ratio of the medians);
- for information, what a worker pays per task with the recommended settings
  (``CONN_MAX_AGE`` > 0, ``close_old_connections()`` connected to Celery's
  ``task_prerun``): ``close_old_connections()`` then ``apply_transition``, with
  ``CONN_HEALTH_CHECKS`` on and off (the connection's ``health_check_enabled``, flipped
  op by op). The difference is what the setting costs per task (one ``SELECT 1`` unless
  the transition's own first statement serves as the check).

Every variant has its own set of ``online`` rows; the sets rotate among the variants every
round and, between rounds (untimed), one ``UPDATE`` puts every row back to ``online``, the
history table is emptied and a ``VACUUM`` drops the dead row versions. Before timing, one
op of each variant is checked to write the same row and the same history record, and
the statements of one op are counted (``CaptureQueriesContext``). A ``SELECT 1`` round trip
is printed for scale: a transition is a few round trips and a ``COMMIT`` that waits for
the WAL flush, so the absolute figures are mostly the server's and its disk's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import harness

GOAL = 1.10
NAME = "transition"
TRANSITION = "begin_stopping"
FLOOR = "hand-written ORM"
DECORATED = "apply_transition"
CHECK_ON = "close_old_connections + apply_transition, CONN_HEALTH_CHECKS on"
CHECK_OFF = "close_old_connections + apply_transition, CONN_HEALTH_CHECKS off"


def changed_fields() -> list[str]:
    """The fields ``begin_stopping`` changes on an ``online`` instance (its receivers too)."""
    from example_project.models import Instance

    probe = Instance(name="probe", state=Instance.States.ONLINE)
    before = {field.attname: getattr(probe, field.attname) for field in Instance._meta.concrete_fields}
    time.sleep(0.001)  # a timestamp set by the transition differs from the default's
    getattr(probe, TRANSITION)()
    return [name for name, value in before.items() if getattr(probe, name) != value]


def make_variants(fields: list[str]) -> dict[str, Callable[[str], Any]]:
    from django.contrib.contenttypes.models import ContentType
    from django.db import close_old_connections, connection, transaction

    from example_project.models import Instance
    from task_workflow.models import TransitionRecord
    from task_workflow.tasks import apply_transition

    def hand_written(instance_uuid: str) -> None:
        with transaction.atomic():
            entity = Instance.objects.select_for_update().get(uuid=instance_uuid)
            source = entity.state
            getattr(entity, TRANSITION)()
            entity.save(update_fields=fields)
            TransitionRecord.objects.create(
                content_type=ContentType.objects.get_for_model(Instance, for_concrete_model=False),
                object_id=str(entity.pk),
                entity_uuid=entity.uuid,
                transition=TRANSITION,
                source_state=source,
                target_state=entity.state,
            )

    def decorated(instance_uuid: str) -> None:
        apply_transition(Instance, instance_uuid, TRANSITION)

    def with_checks(enabled: bool) -> Callable[[str], None]:
        def op(instance_uuid: str) -> None:
            connection.health_check_enabled = enabled
            close_old_connections()
            apply_transition(Instance, instance_uuid, TRANSITION)

        return op

    return {
        FLOOR: hand_written,
        DECORATED: decorated,
        CHECK_ON: with_checks(True),
        CHECK_OFF: with_checks(False),
    }


def make_rows(count: int) -> list[str]:
    """``count`` fresh ``online`` instances (the tables are emptied first); their uuids."""
    from example_project.models import Instance
    from task_workflow.models import TransitionRecord

    TransitionRecord.objects.all().delete()
    Instance.objects.all().delete()
    rows = [
        Instance(name=f"bench-{i}", backend_id=f"i-{i}", state=Instance.States.ONLINE) for i in range(count)
    ]
    Instance.objects.bulk_create(rows)
    return [str(row.uuid) for row in rows]


def reset_rows() -> None:
    """Every row back to ``online``, the history emptied, dead row versions dropped."""
    from django.db import connection

    from example_project.models import Instance
    from task_workflow.models import TransitionRecord

    table = connection.ops.quote_name(Instance._meta.db_table)
    history = connection.ops.quote_name(TransitionRecord._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET state = %s WHERE state <> %s", ["online", "online"])
        cursor.execute(f"TRUNCATE {history}")
        cursor.execute(f"VACUUM {table}")


def check_same_writes(variants: dict[str, Callable[[str], Any]], uuids: list[str]) -> None:
    """One op of each variant writes the same row and history values (else it stops);
    prints the statements per op."""
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection
    from django.forms.models import model_to_dict
    from django.test.utils import CaptureQueriesContext

    from example_project.models import Instance
    from task_workflow.models import TransitionRecord

    ContentType.objects.get_for_model(Instance, for_concrete_model=False)  # cached from now on
    seen: dict[str, tuple[Any, Any]] = {}
    print("statements per op (CaptureQueriesContext; BEGIN/COMMIT included where Django logs them):")
    for (name, fn), instance_uuid in zip(variants.items(), uuids, strict=False):
        connection.health_check_enabled = False
        with CaptureQueriesContext(connection) as captured:
            fn(instance_uuid)
        kinds = [query["sql"].split(None, 1)[0].upper() for query in captured.captured_queries]
        print(f"  {name}: {len(kinds)}: {' '.join(kinds)}")
        row = model_to_dict(
            Instance.objects.get(uuid=instance_uuid), exclude=["id", "uuid", "name", "backend_id"]
        )
        record = model_to_dict(
            TransitionRecord.objects.get(entity_uuid=instance_uuid),
            exclude=["id", "object_id", "entity_uuid"],
        )
        if not row.pop("state_changed_at", True) or not record.pop("created_at", True):
            raise SystemExit(f"{name}: no state_changed_at / created_at written")
        seen[name] = (row, record)
    reference = seen[FLOOR]
    for name, writes in seen.items():
        if writes != reference:
            raise SystemExit(f"{name} writes {writes}, {FLOOR} writes {reference}: not the same transaction")


def roundtrip_us(n: int = 1000) -> float:
    from django.db import connection

    samples = []
    with connection.cursor() as cursor:
        for _ in range(n):
            start = time.perf_counter_ns()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (plus one warm-up)")
    parser.add_argument("--ops", type=int, default=200, help="transitions per variant per round")
    args = parser.parse_args()

    harness.setup_django("example_project.settings")
    from django.conf import settings
    from django.db import connection

    # The recommended worker settings: a persistent connection (close_old_connections
    # keeps it), health checks switched per op by the two informational variants.
    connection.close()
    connection.settings_dict["CONN_MAX_AGE"] = 600
    connection.settings_dict["CONN_HEALTH_CHECKS"] = False
    settings.TASK_WORKFLOW = {**settings.TASK_WORKFLOW, "TRANSITION_HISTORY": True}

    fields = changed_fields()
    variants = make_variants(fields)
    names = list(variants)
    uuids = make_rows(args.ops * len(names) + len(names))
    sets = [uuids[k * args.ops : (k + 1) * args.ops] for k in range(len(names))]
    spare = uuids[len(names) * args.ops :]
    print(f"begin_stopping changes {fields}: the floor saves them (update_fields)")
    reset_rows()
    check_same_writes(variants, spare)

    assignment: dict[str, list[str]] = {}

    def before_round(round_no: int, order: list[str]) -> None:
        reset_rows()
        for k, name in enumerate(names):
            assignment[name] = sets[(k + round_no) % len(sets)]

    ops = {name: (lambda i, name=name: variants[name](assignment[name][i])) for name in names}
    connection.health_check_enabled = False
    samples = harness.interleaved(ops, rounds=args.rounds, ops=args.ops, before_round=before_round)
    reset_rows()

    connection.ensure_connection()
    server = connection.connection.info.server_version
    database = "{HOST}:{PORT}/{NAME}".format(**connection.settings_dict)
    rtt = roundtrip_us()
    print(f"\nPostgreSQL {server // 10000}.{server % 10000} ({database}), SELECT 1: {rtt:.1f} us")
    ratios = harness.ratio_table(
        f"{NAME}: {args.rounds} rounds x {args.ops} ops per variant, interleaved op by op (us per op)",
        samples,
        FLOOR,
        informational=[CHECK_ON, CHECK_OFF],
    )
    on, off = (harness.Stats.of(samples[name]).median for name in (CHECK_ON, CHECK_OFF))
    harness.info(
        NAME, "CONN_HEALTH_CHECKS on - off, per op (close_old_connections before each)", on - off, " us"
    )
    harness.info(NAME, "CONN_HEALTH_CHECKS on / off", on / off)
    harness.verdict(NAME, f"{DECORATED} / {FLOOR}", ratios[DECORATED], GOAL, unit="x")


if __name__ == "__main__":
    main()
