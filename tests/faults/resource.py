"""The fault campaigns' fenced resource: rows of ``tests.testapp.models.FencedResource``
(a model with the public ``task_workflow.fencing.FencedMixin``) written with
``fenced_update(lease, ...)``, and a log of every attempt, in the run's own database.

A row accepts a write iff the lease's fencing token is newer than the one it stored, or
the same token from the same owner (``task_workflow.fencing``); a holder's write and its
log row are one transaction, so the accepted UPDATE holds the row lock while the log row
draws its id: accepted writes of a row are numbered in the order the row saw them.
Refusals are logged after the rolled-back transaction, with the helper's reason ("older
token", "same token, other owner", or "lease lost" / "lease released" when the helper
sent nothing).

``python -m tests.faults.resource NAME...`` (Django set up on the run's database) creates
the model's table and one row per name; the campaign runs it once per run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

#: The write log (created by the campaign in the run's database, beside the model's table).
LOG_SCHEMA = """
CREATE TABLE fenced_write_log (
    id bigserial PRIMARY KEY, name text NOT NULL, token bigint NOT NULL, accepted boolean NOT NULL,
    hostname text NOT NULL, pid integer NOT NULL, seq integer NOT NULL, owner text NOT NULL,
    refused text NOT NULL
);
"""

LOG_INSERT = """
INSERT INTO fenced_write_log (name, token, accepted, hostname, pid, seq, owner, refused)
VALUES (%(name)s, %(token)s, %(accepted)s, %(hostname)s, %(pid)s, %(seq)s, %(owner)s, %(refused)s)
"""

#: The log's columns in ``checker.LoggedWrite``'s order.
LOG_COLUMNS = "id, name, token, accepted, hostname, pid, seq, owner, refused"


def fenced_write(lease: Any, name: str, *, hostname: str, pid: int, seq: int) -> str:
    """Write to resource ``name`` under ``lease`` and log the attempt; return "" when the
    write was accepted, else the refusal's reason."""
    from django.db import connection, transaction
    from django.db.models import F

    from task_workflow.fencing import FencedWriteRefused
    from tests.testapp.models import FencedResource

    row: dict[str, Any] = {
        "name": name, "token": lease.fencing_token, "owner": lease.token, "hostname": hostname, "pid": pid,
        "seq": seq, "accepted": True, "refused": "",
    }  # fmt: skip
    try:
        with transaction.atomic():
            FencedResource.objects.filter(name=name).fenced_update(lease, writes=F("writes") + 1)
            with connection.cursor() as cursor:
                cursor.execute(LOG_INSERT, row)
    except FencedWriteRefused as refusal:
        row.update(accepted=False, refused=refusal.reason)
        with connection.cursor() as cursor:
            cursor.execute(LOG_INSERT, row)
    return str(row["refused"])


def create_resources(names: Sequence[str]) -> None:
    """Create the model's table and the write log in the (empty) database Django is set
    up on, and one row per name."""
    from django.db import connection

    from tests.testapp.models import FencedResource

    with connection.schema_editor() as editor:
        editor.create_model(FencedResource)
    with connection.cursor() as cursor:
        cursor.execute(LOG_SCHEMA)
    FencedResource.objects.bulk_create([FencedResource(name=name) for name in names])


def main(argv: Sequence[str]) -> None:
    import django

    django.setup()
    create_resources(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
