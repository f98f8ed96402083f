"""Issue #19: ``apply_transition`` keeps its promises wherever the same transaction
written with the public ORM keeps them (``transaction.atomic()``, ``select_for_update()
.get()``, the django-fsm method, ``save(update_fields=...)``, ``TransitionRecord.objects
.create()``).

The five cases of the issue, on PostgreSQL with real connections, through the public API
only (``apply_transition``, Django's documented hooks: ``execute_wrapper``, django-fsm's
``post_transition``, ``on_commit``, a database backend, a database router):

1. An error raised after a statement of the transition ran (a query guard or APM hook
   wrapping the execution), the last one (the history INSERT) included: nothing is
   written, and no ``on_commit`` callback registered inside the transition runs.
2. A ``post_transition`` receiver that reads the first rows of a queryset with
   ``.iterator()``: rows it never read are never computed, so an error in one of them
   does not fail the transition.
3. A backend that runs a statement on each new cursor (``SET search_path``, as
   schema-per-tenant backends do), on a connection the server dropped while idle, with
   ``CONN_HEALTH_CHECKS`` on: Django's health check replaces the connection and the
   transition is applied.
4. A model with a JSONField and a field whose ``pre_save()`` sets a value: one
   transition saves once (the field's ``pre_save()`` runs once) and sends one UPDATE.
5. A connection terminated while it waits for the row lock: the call fails and writes
   nothing; it is not run again on a new connection behind the caller's back.
"""

from __future__ import annotations

import copy
import queue
import re
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import (
    DatabaseError,
    InterfaceError,
    close_old_connections,
    connection,
    connections,
    models,
    router,
    transaction,
)
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F
from django.db.models.signals import pre_save
from django.db.utils import load_backend
from django.test.utils import CaptureQueriesContext, override_settings
from django_fsm.signals import post_transition

from task_workflow.models import TransitionRecord
from task_workflow.tasks import apply_transition
from tests.testapp.models import Divisor, Server, Volume
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL"),
]

S = Volume.States
#: Bound of every wait for another connection or thread (seconds).
TIMEOUT = 15.0
HISTORY_TABLE = TransitionRecord._meta.db_table


def make_volume(state: str = S.UPDATE_SCHEDULED) -> Volume:
    """A committed volume; the content type cache warmed, so the statements seen are the
    transition's own."""
    ContentType.objects.get_for_model(Volume, for_concrete_model=False)
    return Volume.objects.create(state=state)


def written(entity: Volume | Server) -> tuple[str, int]:
    """(the committed state, how many history rows): read on the ``default`` connection,
    in autocommit, so only what was committed."""
    model = type(entity)
    state = model._default_manager.using("default").values_list("state", flat=True).get(pk=entity.pk)
    history = TransitionRecord.objects.using("default").filter(entity_uuid=entity.uuid).count()
    return state, history


def other_connection(*, autocommit: bool = True) -> psycopg.Connection:
    """A psycopg connection of its own to the test database (not Django's)."""
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg.connect(**params, autocommit=autocommit)


def backend_pid(wrapper: BaseDatabaseWrapper) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def terminate(pid: int) -> None:
    """Terminate a backend, as an operator does, and wait until it is gone."""
    with other_connection() as monitor:
        assert monitor.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        wait_until(
            lambda: not monitor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone(),
            TIMEOUT,
            f"backend {pid} to exit",
        )


#: Connects a post_transition receiver for the test (the ``on_post_transition`` fixture).
Connect = Callable[[Callable[..., None]], None]


@pytest.fixture
def on_post_transition() -> Iterator[Connect]:
    """Connect django-fsm ``post_transition`` receivers for Volume for one test."""
    connected: list[str] = []

    def connect(receiver: Callable[..., None]) -> None:
        uid = f"tests.public_apis.{receiver.__name__}.{len(connected)}"
        post_transition.connect(receiver, sender=Volume, weak=False, dispatch_uid=uid)
        connected.append(uid)

    yield connect
    for uid in connected:
        post_transition.disconnect(sender=Volume, dispatch_uid=uid)


# 1. An error after a statement, the history INSERT included: nothing is written.


class QueryGuardError(Exception):
    """What the query guard raises once a statement has run."""


#: Statements that only steer the transaction (Django's savepoints, a driver's own).
TRANSACTION_CONTROL = re.compile(r"^\s*(BEGIN|START TRANSACTION|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b", re.I)


@contextmanager
def query_guard(raise_after: Callable[[int, str], bool]) -> Iterator[list[str]]:
    """An ``execute_wrapper`` on the default connection, as a query guard or an APM hook
    installs one: each statement runs, then the guard raises ``QueryGuardError`` after
    the first one that ``raise_after(number, sql)`` picks (``number`` counts statements
    other than transaction control from 1). Yields the statements it saw."""
    seen: list[str] = []

    def guard(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if TRANSACTION_CONTROL.match(sql) and ";" not in sql:
            return result
        seen.append(sql)
        if not fired and raise_after(len(seen), sql):
            fired.append(sql)
            raise QueryGuardError(f"query guard: refused after {sql[:60]!r}")
        return result

    fired: list[str] = []
    with connection.execute_wrapper(guard):
        yield seen
    assert fired, f"the guard never raised; statements seen: {seen}"


def test_an_error_after_the_history_insert_writes_nothing_and_runs_no_on_commit(
    on_post_transition: Connect,
) -> None:
    """The guard raises once the INSERT into the history table has run, still inside the
    transition's transaction: ``apply_transition`` raises, and the transaction is rolled
    back with it (nothing committed, the callbacks registered inside it dropped)."""
    volume = make_volume()
    ran: list[str] = []
    on_post_transition(
        lambda sender, instance, **kwargs: transaction.on_commit(lambda: ran.append("callback"))
    )
    history_insert = re.compile(rf'^\s*(BEGIN[^;]*;\s*)?INSERT INTO "{HISTORY_TABLE}"', re.I)
    with pytest.raises(QueryGuardError), query_guard(lambda number, sql: bool(history_insert.match(sql))):
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert written(volume) == (S.UPDATE_SCHEDULED, 0)
    assert ran == []


@pytest.mark.parametrize("raise_after", [1, 2, 3], ids=["after-the-1st", "after-the-2nd", "after-the-3rd"])
def test_an_error_after_any_statement_of_the_transition_writes_nothing(
    raise_after: int, on_post_transition: Connect
) -> None:
    """Whichever statement of the transition (the locked read, the UPDATE, the history
    INSERT) the guard raises after: the call raises, nothing is written, no on_commit
    callback runs, and the connection applies the same transition once afterwards."""
    volume = make_volume()
    ran: list[str] = []
    on_post_transition(
        lambda sender, instance, **kwargs: transaction.on_commit(lambda: ran.append("callback"))
    )
    with pytest.raises(QueryGuardError), query_guard(lambda number, sql: number == raise_after) as seen:
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert len(seen) == raise_after, seen
    assert written(volume) == (S.UPDATE_SCHEDULED, 0), f"written although the guard raised after {seen[-1]!r}"
    assert ran == []
    apply_transition(Volume, volume.uuid, "begin_updating")
    assert written(volume) == (S.UPDATING, 1)
    assert ran == ["callback"]


# 2. A receiver that reads the first rows of an iterator() does not fail the transition.


@pytest.mark.parametrize(
    ("divisors", "chunk_size"),
    [([1, 0], 1), ([1, 2, 0, 3], 2), ([5, 4, 3, 2, 1, 0], 3)],
    ids=["second-row", "third-row-chunks-of-2", "last-row-chunks-of-3"],
)
def test_a_receiver_reading_the_first_rows_of_an_iterator_does_not_fail_the_transition(
    divisors: list[int], chunk_size: int, on_post_transition: Connect
) -> None:
    """The receiver reads one chunk of ``1 / n`` through ``.iterator()`` (a server-side
    cursor) and leaves the rest unread; a row it never reads divides by zero. Rows never
    read are never computed: the transition is applied and committed.

    No ORDER BY: a sort computes every row before it returns the first (PostgreSQL sorts
    a small analysed table instead of reading its index); a scan of the table, emptied
    before each test, returns the rows in the order they were inserted."""
    Divisor.objects.bulk_create(Divisor(n=n) for n in divisors)
    volume = make_volume()
    first: list[int] = []
    iterators: list[Generator[int]] = []

    def read_first_row(sender: type, instance: Volume, **kwargs: Any) -> None:
        rows = Divisor.objects.annotate(x=1 / F("n")).order_by().values_list("x", flat=True)
        iterator = rows.iterator(chunk_size=chunk_size)
        iterators.append(iterator)  # left open, unread, as a lazy reader leaves it
        first.append(next(iterator))

    on_post_transition(read_first_row)
    try:
        entity = apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        for iterator in iterators:
            iterator.close()
    assert first == [1 // divisors[0]]
    assert entity.state == S.UPDATING
    assert written(volume) == (S.UPDATING, 1)
    with other_connection() as other:  # committed: another connection sees it
        assert other.execute("SELECT state FROM testapp_volume WHERE id = %s", [volume.pk]).fetchone() == (
            S.UPDATING,
        )


# 3. A backend with a statement on each new cursor: a dead idle connection is replaced.

TENANT = "tenant"


class TenantRouter:
    """Everything on the tenant database, as a schema-per-tenant project routes."""

    def db_for_read(self, model: type[models.Model], **hints: Any) -> str:
        return TENANT

    def db_for_write(self, model: type[models.Model], **hints: Any) -> str:
        return TENANT


@pytest.fixture
def tenant_database() -> Iterator[BaseDatabaseWrapper]:
    """A database alias ``tenant`` on the test database, through ``tests.tenant_backend``
    (``SET search_path`` on each new cursor), with health checks on and connections
    kept; the router sends every model there. Registered for this test only."""
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    settings_dict.update(ENGINE="tests.tenant_backend", CONN_MAX_AGE=600, CONN_HEALTH_CHECKS=True)
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, TENANT)
    connections[TENANT] = wrapper
    try:
        with override_settings(DATABASE_ROUTERS=[TenantRouter()]):
            yield wrapper
    finally:
        wrapper.close()
        del connections[TENANT]


def test_a_dead_idle_connection_of_a_backend_that_prepares_each_cursor_is_replaced(
    tenant_database: BaseDatabaseWrapper,
) -> None:
    """The server terminated the tenant connection while it sat idle between two tasks
    (the health check due): Django's health check replaces it, the transition is applied."""
    assert router.db_for_write(Volume) == TENANT
    volume = make_volume()  # on the tenant connection: it is open, as a worker's is
    dead = backend_pid(tenant_database)
    tenant_database.close_if_unusable_or_obsolete()  # between two tasks
    assert tenant_database.connection is not None
    assert tenant_database.health_check_enabled
    assert not tenant_database.health_check_done
    terminate(dead)
    entity = apply_transition(Volume, volume.uuid, "begin_updating")
    assert entity.state == S.UPDATING
    assert written(volume) == (S.UPDATING, 1)
    assert backend_pid(tenant_database) != dead


# 4. A JSONField and a field whose pre_save() sets a value: one save, one UPDATE.

#: What a spliced statement would carry around the one it sends.
BEGIN_PREFIX = re.compile(r"^\s*BEGIN[^;]*;\s*", re.I)
COMMIT_SUFFIX = re.compile(r";\s*COMMIT\s*$", re.I)


def statement_kinds(captured: CaptureQueriesContext, table: str) -> list[str]:
    """What each captured statement is, transaction control left out: the locked read of
    ``table``, its UPDATE, the history INSERT, or else the statement itself."""
    kinds = []
    for query in captured.captured_queries:
        sql = COMMIT_SUFFIX.sub("", BEGIN_PREFIX.sub("", query["sql"]))
        if not sql or (TRANSACTION_CONTROL.match(sql) and ";" not in sql):
            continue
        if sql.startswith("SELECT ") and f'FROM "{table}"' in sql and sql.endswith("FOR UPDATE"):
            kinds.append("SELECT FOR UPDATE")
        elif sql.startswith(f'UPDATE "{table}" SET '):
            kinds.append("UPDATE")
        elif sql.startswith(f'INSERT INTO "{HISTORY_TABLE}"'):
            kinds.append("INSERT")
        else:
            kinds.append(sql)
    return kinds


@pytest.mark.parametrize(
    "config",
    [{}, {"region": "eu-1", "tags": ["a", "b"], "limits": {"cpu": 2}}, [1, 2, 3], "plain", 0],
    ids=["empty-dict", "nested-dict", "list", "string", "number"],
)
def test_each_transition_saves_once_with_one_update(config: Any) -> None:
    """Over a cycle of transitions, each one runs the counter field's ``pre_save()``
    once (as one ``save()`` does), sends ``pre_save`` once, and sends exactly the locked
    read, one UPDATE and the history INSERT; the JSON value is kept."""
    server = Server.objects.create(state=S.UPDATE_SCHEDULED, config=config)
    ContentType.objects.get_for_model(Server, for_concrete_model=False)
    saves = Server.objects.get(pk=server.pk).saves
    signals: list[frozenset[str] | None] = []

    def count_pre_save(sender: type, instance: Server, update_fields: Any = None, **kwargs: Any) -> None:
        signals.append(update_fields)

    pre_save.connect(count_pre_save, sender=Server, weak=False, dispatch_uid="tests.public_apis.pre_save")
    try:
        for number, name in enumerate(["begin_updating", "set_ok", "schedule_updating"] * 2, 1):
            signals.clear()
            with CaptureQueriesContext(connection) as captured:
                entity = apply_transition(Server, server.uuid, name)
            assert statement_kinds(captured, Server._meta.db_table) == [
                "SELECT FOR UPDATE",
                "UPDATE",
                "INSERT",
            ]
            assert len(signals) == 1, signals
            bumps = entity.saves - (saves + number - 1)
            assert bumps == 1, f"transition {number} ({name}) ran the counter's pre_save() {bumps} times"
            stored = Server.objects.values("saves", "config", "state").get(pk=server.pk)
            assert stored == {"saves": saves + number, "config": config, "state": entity.state}
    finally:
        pre_save.disconnect(sender=Server, dispatch_uid="tests.public_apis.pre_save")


# 5. A connection terminated while it waits for the row lock: the call fails.


def test_a_connection_terminated_while_waiting_for_the_row_lock_fails_the_call() -> None:
    """Another connection holds the row lock; the caller's connection (reused, its health
    check due, as a worker's between tasks) waits for it and is terminated by an operator.
    The call raises and writes nothing, also once the lock is released: it is not run
    again on a new connection behind the caller's back."""
    volume = make_volume()
    pids: queue.Queue[int] = queue.Queue()
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def caller() -> None:
        try:
            connection.ensure_connection()
            pids.put(backend_pid(connection))
            close_old_connections()  # between two tasks: the health check is due
            try:
                outcome["entity"] = apply_transition(Volume, volume.uuid, "begin_updating")
            except BaseException as exc:  # reported to the test
                outcome["error"] = exc
        finally:
            connection.close()
            done.set()

    with other_connection() as monitor, other_connection(autocommit=False) as holder:
        holder.execute(f'SELECT id FROM "{Volume._meta.db_table}" WHERE id = %s FOR UPDATE', [volume.pk])
        holder_pid = holder.info.backend_pid
        thread = threading.Thread(target=caller, name="apply_transition", daemon=True)
        thread.start()
        try:
            pid = pids.get(timeout=TIMEOUT)

            def lock_waiters() -> list[int]:
                rows = monitor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> %s",
                    [holder_pid],
                ).fetchall()
                return [row[0] for row in rows]

            wait_until(lambda: pid in lock_waiters(), TIMEOUT, f"backend {pid} to wait for the row lock")
            terminate(pid)
            # The call ends, or a new connection waits for the lock again.
            wait_until(lambda: done.is_set() or lock_waiters(), TIMEOUT, "the call to end or to wait again")
        finally:
            holder.rollback()  # the lock released, nothing written by the holder
            done.wait(TIMEOUT)
        thread.join(TIMEOUT)
    assert done.is_set(), "apply_transition did not return"
    assert "entity" not in outcome, (
        "the transition was applied on a new connection after its own was terminated"
    )
    assert isinstance(outcome.get("error"), (DatabaseError, InterfaceError)), outcome
    assert written(volume) == (S.UPDATE_SCHEDULED, 0)
