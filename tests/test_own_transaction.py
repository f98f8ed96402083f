"""A transition's own transaction in three round trips (``task_workflow.own_transaction``).

On a connection reused from an earlier task (``CONN_HEALTH_CHECKS`` on, the check due),
Django and psycopg would send ``SELECT 1``, ``BEGIN``, the locked read, the UPDATE, the
history INSERT and ``COMMIT``, each waited for. ``apply_transition`` sends ``BEGIN;
SELECT ... FOR UPDATE``, the UPDATE, and ``INSERT ...; COMMIT``; the read is the health
check: a connection that died while idle is replaced and the transition run again, a
failure on a live connection is not repeated. What goes on the wire is read from libpq's
protocol trace of the connection. PostgreSQL (psycopg 3) only.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, OperationalError, close_old_connections, connection, transaction
from django.db.backends.utils import CursorWrapper
from django_fsm.signals import post_transition

from task_workflow import own_transaction
from task_workflow.models import TransitionRecord
from task_workflow.tasks import apply_transition
from tests.testapp.models import Volume

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL"),
]

S = Volume.States
TIMEOUT = 10.0


def make_volume(state: str = S.UPDATE_SCHEDULED) -> Volume:
    """A volume; the content type cache warmed, so the statements seen are the transition's."""
    ContentType.objects.get_for_model(Volume, for_concrete_model=False)
    return Volume.objects.create(state=state)


@contextmanager
def wire_queries() -> Iterator[list[str]]:
    """The text of every query message this connection sends meanwhile (libpq trace)."""
    sent: list[str] = []
    pgconn = connection.connection.pgconn
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield sent
        finally:
            pgconn.untrace()
            trace.seek(0)
            for line in trace.read().splitlines():
                direction, _length, kind, *rest = line.split("\t")
                if direction == "F" and kind in ("Query", "Parse"):
                    sent.append(" ".join(rest).strip().strip('"'))


def reused_connection() -> None:
    """The state a worker's connection is in at the start of a task: open, health check
    due (``close_old_connections()``, as the example project runs around each task)."""
    connection.ensure_connection()
    close_old_connections()
    assert connection.connection is not None
    assert connection.health_check_enabled
    assert not connection.health_check_done


def other_connection() -> psycopg.Connection:
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg.connect(**params, autocommit=True)


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def test_a_transition_on_a_reused_connection_is_three_round_trips():
    volume = make_volume()
    reused_connection()
    with wire_queries() as sent:
        apply_transition(Volume, volume.uuid, "begin_updating")
    assert len(sent) == 3, "\n".join(sent)
    begin_and_read, update, insert_and_commit = sent
    assert begin_and_read.startswith("BEGIN; SELECT "), begin_and_read
    assert begin_and_read.endswith("FOR UPDATE"), begin_and_read
    assert update.startswith('UPDATE "testapp_volume"'), update
    assert insert_and_commit.startswith('INSERT INTO "task_workflow_transitionrecord"'), insert_and_commit
    assert insert_and_commit.endswith("; COMMIT"), insert_and_commit
    volume.refresh_from_db()
    assert volume.state == S.UPDATING
    assert TransitionRecord.objects.for_entity(volume).get().target_state == S.UPDATING
    # Back in autocommit on both sides, as Django leaves a connection after atomic().
    assert connection.get_autocommit()
    assert connection.connection.autocommit
    assert connection.connection.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_on_commit_callbacks_run_once_the_transition_is_committed():
    """Registered inside the transition (a post_transition receiver): they run after
    the COMMIT that went with the INSERT, and another connection sees the row then."""
    volume = make_volume()
    seen: list[str] = []

    def on_commit() -> None:
        with other_connection() as other:
            row = other.execute("SELECT state FROM testapp_volume WHERE id = %s", [volume.pk]).fetchone()
        seen.append(row[0])

    def receiver(sender: type, instance: Volume, **kwargs: object) -> None:
        transaction.on_commit(on_commit)

    post_transition.connect(receiver, sender=Volume)
    try:
        apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        post_transition.disconnect(receiver, sender=Volume)
    assert seen == [S.UPDATING]


@contextmanager
def failing_commit() -> Iterator[None]:
    """A deferred constraint trigger on the history table that fails every COMMIT after
    an INSERT into it."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION tw_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; END $$"
        )
        cursor.execute(
            "CREATE CONSTRAINT TRIGGER tw_test_refuse AFTER INSERT ON task_workflow_transitionrecord "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tw_test_refuse()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER tw_test_refuse ON task_workflow_transitionrecord")
            cursor.execute("DROP FUNCTION tw_test_refuse()")


def test_a_commit_that_fails_leaves_nothing_written():
    """A deferred constraint fails at the COMMIT sent with the INSERT: the transaction is
    rolled back, the error raised, and the connection fit for the next transition."""
    volume = make_volume()
    with failing_commit():
        reused_connection()
        with wire_queries() as sent, pytest.raises(IntegrityError, match="refused at commit"):
            apply_transition(Volume, volume.uuid, "begin_updating")
    assert sent[-1].endswith("; COMMIT"), sent
    volume.refresh_from_db()
    assert volume.state == S.UPDATE_SCHEDULED
    assert not TransitionRecord.objects.exists()
    assert connection.get_autocommit()
    assert connection.connection.autocommit
    apply_transition(Volume, volume.uuid, "begin_updating")
    volume.refresh_from_db()
    assert volume.state == S.UPDATING


def test_inside_a_transaction_the_read_sends_no_begin():
    volume = make_volume()
    reused_connection()
    with wire_queries() as sent, transaction.atomic():
        Volume.objects.filter(pk=volume.pk).exists()
        apply_transition(Volume, volume.uuid, "begin_updating")
    kinds = [query.split(" ", 1)[0] for query in sent]
    expected = ["SELECT", "BEGIN", "SELECT", "SAVEPOINT", "SELECT", "UPDATE", "INSERT", "RELEASE", "COMMIT"]
    assert kinds == expected, sent
    assert sent[0] == "SELECT 1"  # the health check: the outer block's first use
    assert not any(query.startswith("BEGIN;") for query in sent)


def test_the_begin_carries_the_connection_s_isolation_level():
    volume = make_volume()
    reused_connection()
    raw = connection.connection
    configured = raw.isolation_level
    raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with wire_queries() as sent:
            apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        raw.isolation_level = configured
    assert sent[0].startswith("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT "), sent


def test_a_connection_that_died_while_idle_is_replaced_and_the_transition_applied(caplog):
    volume = make_volume()
    reused_connection()
    dead_pid = backend_pid()
    close_old_connections()
    with other_connection() as other:
        other.execute("SELECT pg_terminate_backend(%s)", [dead_pid])
        deadline = time.monotonic() + TIMEOUT
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [dead_pid]).fetchone():
            assert time.monotonic() < deadline, "the backend did not end"
            time.sleep(0.01)
    with caplog.at_level(logging.INFO, logger="task_workflow.transitions"):
        apply_transition(Volume, volume.uuid, "begin_updating")
    volume.refresh_from_db()
    assert volume.state == S.UPDATING
    assert "had died since its last use" in caplog.text
    assert backend_pid() != dead_pid


def test_a_first_statement_that_fails_on_a_live_connection_is_not_sent_again():
    """A lock timeout is no dead connection: the error is the caller's, once."""
    volume = make_volume()
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '100ms'")  # this session's: reset below
    try:
        reused_connection()
        raw = connection.connection
        with other_connection() as holder, holder.transaction():
            holder.execute("SELECT 1 FROM testapp_volume WHERE id = %s FOR UPDATE", [volume.pk])
            with wire_queries() as sent, pytest.raises(OperationalError, match="lock timeout"):
                apply_transition(Volume, volume.uuid, "begin_updating")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert [query for query in sent if "FOR UPDATE" in query] == [sent[0]], sent
    assert connection.connection is raw
    assert connection.get_autocommit()
    assert raw.autocommit
    apply_transition(Volume, volume.uuid, "begin_updating")
    volume.refresh_from_db()
    assert volume.state == S.UPDATING


def test_the_check_is_deferred_only_when_it_is_due():
    reused_connection()
    raw = connection.connection
    assert own_transaction.defer_health_check(connection) is raw
    assert connection.health_check_done
    assert own_transaction.defer_health_check(connection) is None  # made (deferred) already
    close_old_connections()
    with transaction.atomic():
        assert own_transaction.defer_health_check(connection) is None  # in use already
    close_old_connections()
    connection.health_check_enabled = False
    try:
        assert own_transaction.defer_health_check(connection) is None
    finally:
        connection.health_check_enabled = True


def test_a_cursor_that_binds_on_the_server_gets_no_begin():
    """The extended protocol takes one statement per message: psycopg sends the BEGIN."""
    connection.ensure_connection()
    raw = connection.connection
    with transaction.atomic():
        cursor = CursorWrapper(psycopg.Cursor(raw), connection)
        assert not isinstance(cursor.cursor, psycopg.ClientCursor)
        assert own_transaction.begin_prefix(cursor) == ""
        assert not raw.autocommit
        assert own_transaction.commit_suffix(cursor) == ""
        with connection.cursor() as client_side:
            assert own_transaction.commit_suffix(client_side) == ""  # Django's BEGIN, Django's COMMIT
            begin = own_transaction.begin_prefix(client_side)
            assert begin == "BEGIN; "
            assert raw.autocommit  # psycopg leaves the BEGIN to the statement
            client_side.execute(begin + "SELECT 1")
            assert own_transaction.commit_suffix(client_side) == "; COMMIT"
            with transaction.atomic():  # a savepoint: the outer block commits
                assert own_transaction.commit_suffix(client_side) == ""
