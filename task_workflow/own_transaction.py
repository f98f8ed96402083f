"""A transition's own transaction in three round trips.

``apply_transition`` outside any transaction opens one of its own: the locked read, the
UPDATE, the history INSERT. Django and psycopg would send that as six messages, each
waited for: a health check (``SELECT 1``, when ``CONN_HEALTH_CHECKS`` is on and the
connection was reused, as a worker's is), ``BEGIN``, the read, the UPDATE, the INSERT,
``COMMIT``. Here they are three, with the same statements in the same transaction:
``BEGIN; SELECT ... FOR UPDATE``, then the UPDATE, then ``INSERT ...; COMMIT``.

- **Statements share a message.** On psycopg 3 with client-side binding (Django's
  default) queries go by the simple query protocol, which takes several statements in
  one message. psycopg is switched to autocommit before the first (:func:`begin_prefix`),
  so that it sends no ``BEGIN`` of its own; the ``COMMIT`` follows the transaction's
  last statement (:func:`commit_suffix`). Django's ``atomic()`` then ends as usual: its
  commit finds the transaction ended (psycopg ends only one the server reports open), an
  error rolls back whatever is open, and on_commit callbacks run after the commit.
- **The read is the health check.** Django's check, when due, is marked done before
  the transaction (:func:`defer_health_check`). If the read fails because the connection
  had died since its last use (what the check would have found: :func:`connection_died`),
  nothing was written, and the caller runs the transition again on a new connection.

Anything else (inside an outer transaction, another database or driver, server-side
binding, ``AUTOCOMMIT`` off) keeps Django's and psycopg's own messages.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper

try:
    import psycopg
except ImportError:  # pragma: no cover - psycopg2 or another database
    psycopg = None  # type: ignore[assignment]


def defer_health_check(connection: Any) -> Any:
    """Mark the due health check of ``connection`` done, to be made by the transaction's
    first statement; return the DB-API connection it was due for, or ``None`` when none
    was due (checks off, made already, no connection yet or one the driver knows is gone,
    or inside an outer transaction, which has used the connection already)."""
    raw = connection.connection
    if (
        raw is None
        or getattr(raw, "closed", False)
        or getattr(raw, "broken", False)
        or not connection.health_check_enabled
        or connection.health_check_done
        or connection.in_atomic_block
    ):
        return None
    connection.health_check_done = True
    return raw


def connection_died(connection: BaseDatabaseWrapper, checked: Any) -> bool:
    """After the first statement on ``checked`` (from :func:`defer_health_check`) failed
    and its transaction ended: whether that connection was dead (Django dropped it when
    the rollback failed too, or it does not answer)."""
    if connection.connection is not checked:
        return True
    return not connection.is_usable()


def _outermost_client_side(cursor: CursorWrapper) -> Any:
    """The psycopg 3 connection behind ``cursor`` when its statements can share messages:
    a client-side binding cursor inside Django's outermost ``atomic()``, no savepoint,
    nothing marked for rollback, ``AUTOCOMMIT`` on; else ``None``."""
    connection = cursor.db
    raw = connection.connection
    if (
        psycopg is None
        or not isinstance(cursor.cursor, psycopg.ClientCursor)
        or not isinstance(raw, psycopg.Connection)
        or len(connection.atomic_blocks) != 1
        or connection.savepoint_ids
        or connection.needs_rollback
        or not connection.settings_dict["AUTOCOMMIT"]
    ):
        return None
    return raw


def begin_prefix(cursor: CursorWrapper) -> str:
    """``"BEGIN; "`` (with the connection's isolation level and access mode, as psycopg
    writes them) to send ahead of the first statement of an outermost ``atomic()``, with
    psycopg switched to autocommit so that it sends no ``BEGIN`` itself; ``""`` where
    that does not apply (see the module docstring). Call it only for a statement sent
    at once through ``cursor``."""
    raw = _outermost_client_side(cursor)
    if raw is None or raw.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return ""
    parts = ["BEGIN"]
    if raw.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + psycopg.IsolationLevel(raw.isolation_level).name.replace("_", " "))
    if raw.read_only is not None:
        parts.append("READ ONLY" if raw.read_only else "READ WRITE")
    raw.autocommit = True
    return " ".join(parts) + "; "


def commit_suffix(cursor: CursorWrapper) -> str:
    """``"; COMMIT"`` to send after the last statement of a transaction that
    :func:`begin_prefix` opened (psycopg in autocommit inside Django's outermost
    ``atomic()``, which only that leaves so; nothing else in it); ``""`` otherwise, and
    Django commits."""
    raw = _outermost_client_side(cursor)
    if raw is None or not raw.autocommit or cursor.db.get_autocommit():
        return ""
    return "; COMMIT"
