"""DatabaseCache backend: one locked row per slot group (PostgreSQL and SQLite).

Each group is one row of the cache table (key ``tw:throttle:<digest>`` through the
cache's own ``make_and_validate_key``), its value DatabaseCache's own encoding of a
:class:`GroupRecord`: the holders with their lease deadlines and fencing tokens, the
waiters in order of first arrival with until when each counts as waiting, and the group's
fencing counter. Every operation is one short transaction that locks the row, applies the
rule in Python and writes the row back:

- PostgreSQL: ``INSERT … ON CONFLICT DO UPDATE … RETURNING`` creates or locks the row
  and returns its value and the server's ``clock_timestamp()`` in one statement;
- SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock, the clock is this host's.

So every invariant of :mod:`.base` holds: the limit, FIFO among waiters, fencing tokens
(``max(counter + 1, now in µs)``: above every earlier one even after the row was lost),
and no operation touches another holder's deadline. The row's ``expires`` is the latest
live deadline or waiter liveness plus :attr:`DatabaseCacheThrottleBackend.RECORD_MARGIN`,
so DatabaseCache's own culling of expired rows never drops a live record (give the cache
a large ``MAX_ENTRIES``: culling past it deletes live rows too).

The backend works on a private database connection per thread (created with
``connections.create_connection``, in autocommit, with its own transactions), never in the
caller's: a slot taken inside an outer ``transaction.atomic()`` is committed at once, so
contenders are refused instead of blocking on an uncommitted row, and the lease renewer
(another thread) sees it. One exception, SQLite: it has one writer per database file, so
while the calling thread's own connection is inside a transaction (which holds or will
take that lock), a second connection could only wait for it; there the backend works in
the caller's transaction (a savepoint), and other connections wait for it to end.

Each thread that uses the backend keeps its connection open (in a worker: the task's
thread and the lease renewer's); a connection found dead is replaced, and the operation
retried once if nothing had been sent for commit. :func:`close_private_connections`
closes them all (a test database cannot be dropped while they are open). A connection
lost during ``COMMIT`` leaves it unknown whether that change was applied: the caller sees
an error (``throttle`` fails closed), and a slot granted that way expires with its lease.

Waiters poll (every ``poll_interval`` seconds); a release frees the slot and the first
live waiter in line takes it on its next attempt. Operators' listing is one ``SELECT`` of
the table's throttle rows (with a custom ``KEY_FUNCTION`` that does not keep keys as
prefix + key: of the whole table).
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from django.conf import settings
from django.core.cache.backends.db import DatabaseCache
from django.db import DatabaseError, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper

from .base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend, WaitingCall
from .redis_backend import held_slot_from_metadata, waiting_call_from_metadata

T = TypeVar("T")

#: Every group's row key starts with this (then the group digest).
GROUP_KEY_PREFIX = "tw:throttle:"

#: Marks a stored value as a group record (the table holds other cache entries too).
RECORD_FORMAT = "tw-throttle-group/1"

#: Database vendors with the locking this backend needs.
SUPPORTED_VENDORS = ("postgresql", "sqlite")


@dataclass
class GroupRecord:
    """One slot group as stored: the rule of every operation, without I/O.

    ``holders`` maps owner tokens to their lease (``deadline``, ``fencing_token``,
    ``slot``) and the metadata of their acquire; ``line`` maps waiting tokens to until
    when they count as waiting, in order of first arrival; ``waiters`` maps the same
    tokens to when they first asked (``waiting_since``) and the metadata of that attempt,
    for operators. Times are seconds of the database's clock. Each operation returns
    whether it changed the record (else nothing is written).
    """

    task_name: str
    key: str | None
    counter: int = 0
    holders: dict[str, dict[str, Any]] = field(default_factory=dict)
    line: dict[str, float] = field(default_factory=dict)
    waiters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, value: Any, group: SlotGroup) -> GroupRecord:
        """The record stored as ``value`` (a fresh one if it is not a group record)."""
        if isinstance(value, dict) and value.get("format") == RECORD_FORMAT:
            return cls(
                task_name=value.get("task_name", group.task_name),
                key=value.get("key", group.key),
                counter=int(value.get("counter", 0)),
                holders=dict(value.get("holders", {})),
                line=dict(value.get("line", {})),
                # Absent from records written before it was kept.
                waiters=dict(value.get("waiters", {})),
            )
        return cls(group.task_name, group.key)

    def dump(self) -> dict[str, Any]:
        """The stored form: plain types only, so any version can read it back."""
        return {
            "format": RECORD_FORMAT,
            "task_name": self.task_name,
            "key": self.key,
            "counter": self.counter,
            "holders": self.holders,
            "line": self.line,
            "waiters": self.waiters,
        }

    @property
    def group(self) -> SlotGroup:
        return SlotGroup(self.task_name, self.key)

    def sweep(self, now: float) -> bool:
        """Forget expired leases and waiters that stopped attempting; no live one changes."""
        expired = [token for token, lease in self.holders.items() if lease["deadline"] <= now]
        gone = [token for token, alive_until in self.line.items() if alive_until <= now]
        for token in expired:
            del self.holders[token]
        for token in gone:
            self._leave(token)
        return bool(expired or gone)

    def _leave(self, token: str) -> bool:
        """Take ``token`` out of line with its waiter record; whether it was in line."""
        self.waiters.pop(token, None)
        return self.line.pop(token, None) is not None

    def acquire(
        self,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
        now: float,
        waiter_seconds: float,
    ) -> tuple[AcquireResult, bool]:
        """Grant a slot if live holders + live waiters ahead < ``concurrency``, else
        queue the caller (at the back on its first refusal) or refresh its liveness."""
        self.sweep(now)
        own = self.holders.get(token)
        if own is not None:  # already holds one (a repeated attempt): keep it, extend it
            own["deadline"] = now + ttl
            self._leave(token)
            return AcquireResult(True, slot=str(own["slot"]), fencing_token=own["fencing_token"]), True
        # Live waiters ahead of this caller (all of them, for a newcomer) are served first.
        order = list(self.line)
        ahead = order.index(token) if token in self.line else len(order)
        if len(self.holders) + ahead < concurrency:
            fence = max(self.counter + 1, int(now * 1_000_000))
            self.counter = fence
            used = {lease["slot"] for lease in self.holders.values()}
            slot = next(number for number in range(len(used) + 1) if number not in used)
            self.holders[token] = {
                **metadata,
                "deadline": now + ttl,
                "fencing_token": fence,
                "slot": slot,
            }
            self._leave(token)
            return AcquireResult(True, slot=str(slot), fencing_token=fence), True
        # Refused: the first refusal is the arrival (the back of the line); later ones only
        # refresh liveness (assigning to a present key keeps its place in a dict).
        if token not in self.line:
            self.waiters[token] = {**metadata, "waiting_since": now}
        self.line[token] = now + waiter_seconds
        deadlines = [lease["deadline"] for lease in self.holders.values()]
        # All slots held: until the earliest lease ends. Else the caller waits its turn in
        # line: no useful hint (a zero would make it spin).
        retry_after = max(min(deadlines) - now, 0.0) if len(deadlines) >= concurrency else None
        return AcquireResult(False, retry_after=retry_after), True

    def release(self, token: str, now: float) -> tuple[bool, bool]:
        """Remove ``token``'s lease (``True`` if it was live) and its place in line."""
        lease = self.holders.pop(token, None)
        left_line = self._leave(token)
        removed = lease is not None and lease["deadline"] > now
        return removed, lease is not None or left_line or self.sweep(now)

    def renew(self, token: str, ttl: float, now: float) -> tuple[bool, bool]:
        """Push a live lease's deadline to ``now + ttl``; ``False`` if it is gone or over."""
        lease = self.holders.get(token)
        if lease is None or lease["deadline"] <= now:
            # Gone, or expired: another caller may take that slot any moment now.
            return False, self.sweep(now)
        lease["deadline"] = now + ttl
        return True, True

    def leave_line(self, token: str) -> bool:
        """Take ``token`` out of line (a waiter giving up)."""
        return self._leave(token)

    def live_waiters(self, now: float) -> list[str]:
        """Tokens of the live waiters, first in line first."""
        return [token for token, alive_until in self.line.items() if alive_until > now]

    def waiting_calls(self, now: float) -> list[WaitingCall]:
        """The live waiters as operators see them, first in line first."""
        group = self.group
        calls = []
        for place, token in enumerate(self.live_waiters(now), start=1):
            meta = {**self.waiters.get(token, {}), "task_name": group.task_name, "key": group.key}
            calls.append(waiting_call_from_metadata(token, place, meta, now))
        return calls

    def keep_until(self, now: float) -> float:
        """The latest moment anything recorded still matters (before the margin)."""
        return max([now, *(lease["deadline"] for lease in self.holders.values()), *self.line.values()])


class _PrivateConnection:
    """A database connection of this backend's own, used by one thread only.

    Closed when dropped, except in a forked child: the socket belongs to the parent's
    connection then, so the object is kept (never closed) instead of telling the server
    goodbye in the parent's name.
    """

    #: Connections inherited through ``fork``: kept so that no finalizer touches them.
    inherited: list[BaseDatabaseWrapper] = []

    def __init__(self, wrapper: BaseDatabaseWrapper) -> None:
        self.wrapper = wrapper
        self.pid = os.getpid()

    def close(self) -> None:
        """Close it, from any thread (it reopens on its next use)."""
        if self.pid != os.getpid():
            if not any(kept is self.wrapper for kept in self.inherited):
                self.inherited.append(self.wrapper)
            return
        self.wrapper.inc_thread_sharing()
        try:
            self.wrapper.close()
        except Exception:
            pass  # a broken connection is being thrown away anyway
        finally:
            self.wrapper.dec_thread_sharing()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, modules may be gone already
            self.close()


#: Every private connection of every backend in this process (see :func:`close_private_connections`).
_ALL_PRIVATE: weakref.WeakSet[_PrivateConnection] = weakref.WeakSet()
_ALL_PRIVATE_LOCK = threading.Lock()


def close_private_connections() -> None:
    """Close every private connection of every DatabaseCache throttle backend in this
    process, of every thread; later operations open new ones.

    For shutdown and test sessions: a test database cannot be dropped while these are
    connected to it. Call it while no throttle operation is running.
    """
    with _ALL_PRIVATE_LOCK:
        opened = list(_ALL_PRIVATE)
    for private in opened:
        private.close()


class DatabaseCacheThrottleBackend(ThrottleBackend):
    """Slot groups as rows of a DatabaseCache table, each changed under a row lock."""

    wakes_waiters = False

    #: Milliseconds a refused caller counts as waiting after its latest attempt (as on
    #: Redis); ``throttle`` attempts again at least once a second.
    WAITER_MS = 3000

    #: Seconds a group's row outlives its last lease or waiter (and clock differences
    #: between the workers, whose clocks DatabaseCache's culling uses, and the database).
    RECORD_MARGIN = 60.0

    def __init__(
        self, cache: DatabaseCache, poll_interval: float = 0.05, *, alias: str | None = None
    ) -> None:
        # The cache object only names the table and keys (no I/O through it), so ``alias``
        # is accepted for a uniform constructor and not needed.
        self.cache = cache
        self.alias = alias
        self.poll_interval = poll_interval
        self._db = router.db_for_write(cache.cache_model_class)
        connection = connections[self._db]
        self._vendor = connection.vendor
        # SQLite: take the write lock at once, so that the read and the write of a change
        # cannot be split by another writer. PostgreSQL: the row lock serialises changes,
        # whatever isolation level the settings ask for.
        self._begin = (
            "BEGIN IMMEDIATE" if self._vendor == "sqlite" else "BEGIN ISOLATION LEVEL READ COMMITTED"
        )
        quote = connection.ops.quote_name
        self._names = {
            "table": quote(cache._table),  # type: ignore[attr-defined]  # set by BaseDatabaseCache
            "key": quote("cache_key"),
            "value": quote("value"),
            "expires": quote("expires"),
        }
        # The stored form of every group key starts with this, unless a custom
        # KEY_FUNCTION does not keep keys as a prefix + the key: then listing reads the
        # whole table.
        prefix = cache.make_key(GROUP_KEY_PREFIX)
        scannable = cache.make_key(GROUP_KEY_PREFIX + "x") == prefix + "x"
        self._stored_prefix: str | None = prefix if scannable else None
        self._local = threading.local()
        self._opened: weakref.WeakSet[_PrivateConnection] = weakref.WeakSet()
        self._opened_lock = threading.Lock()

    @classmethod
    def supports(cls, cache: Any) -> bool:
        """Whether ``cache`` is a DatabaseCache on a database this backend can lock."""
        if not isinstance(cache, DatabaseCache):
            return False
        return connections[router.db_for_write(cache.cache_model_class)].vendor in SUPPORTED_VENDORS

    # Operations ------------------------------------------------------------------------
    def acquire(
        self, group: SlotGroup, token: str, concurrency: int, ttl: float, metadata: dict[str, Any]
    ) -> AcquireResult:
        return self._change(
            group,
            lambda record, now: record.acquire(token, concurrency, ttl, metadata, now, self.WAITER_MS / 1000),
        )

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        # Frees the slot; no handoff: the first waiter in line takes it on its next attempt.
        return self._change(group, lambda record, now: record.release(token, now))

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        return self._change(group, lambda record, now: record.renew(token, ttl, now))

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> AcquireResult | None:
        # No wake-up channel in a table: poll.
        time.sleep(max(0.0, min(timeout, self.poll_interval)))
        return None

    def cancel_wait(self, group: SlotGroup, token: str) -> AcquireResult | None:
        # Nothing is ever handed over here, so leaving the line is all there is to it.
        self._change(group, lambda record, now: (None, record.leave_line(token)))
        return None

    def waiting(self, group: SlotGroup) -> list[str]:
        def read(cursor: CursorWrapper) -> list[str]:
            cursor.execute(
                self._sql("SELECT {value}, {now} FROM {table} WHERE {key} = %s"), [self._row_key(group)]
            )
            row = cursor.fetchone()
            if row is None:
                return []
            return GroupRecord.load(self._decode(row[0]), group).live_waiters(self._now(row[1]))

        return self._run(read, write=False)

    def held_slots(self) -> list[HeldSlot]:
        """Every holder recorded in the table's throttle rows, in one ``SELECT``."""
        slots = []
        for record, now in self._records():
            for token, lease in record.holders.items():
                meta = {**lease, "task_name": record.task_name, "key": record.key}
                slots.append(
                    held_slot_from_metadata(
                        token,
                        str(lease["slot"]),
                        meta,
                        lease["deadline"],
                        now,
                        fencing_token=lease["fencing_token"],
                    )
                )
        return slots

    def waiting_calls(self) -> list[WaitingCall]:
        """Every live waiter recorded in the table's throttle rows, in one ``SELECT``;
        "since" is the database's clock at its first refused attempt."""
        return [call for record, now in self._records() for call in record.waiting_calls(now)]

    def _records(self) -> list[tuple[GroupRecord, float]]:
        """Every group record of the table with the database's clock, in one ``SELECT``."""
        statement = "SELECT {key}, {value}, {now} FROM {table} WHERE {expires} > %s"
        params: list[Any] = [self._expires(time.time())]
        if self._stored_prefix is not None:
            escaped = self._stored_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            statement += " AND {key} LIKE %s ESCAPE '\\'"
            params.append(escaped + "%")

        def read(cursor: CursorWrapper) -> list[tuple[str, str, Any]]:
            cursor.execute(self._sql(statement), params)
            return list(cursor.fetchall())

        records = []
        for row_key, raw, db_now in self._run(read, write=False):
            value = self._decode(raw)
            if not (isinstance(value, dict) and value.get("format") == RECORD_FORMAT):
                continue  # another cache entry
            record = GroupRecord.load(value, SlotGroup(""))
            if self._stored_prefix is None and row_key != self._row_key(record.group):
                continue  # a custom KEY_FUNCTION: a record of another key prefix or version
            records.append((record, self._now(db_now)))
        return records

    def close(self) -> None:
        """Close this backend's private connections, of every thread (tests, shutdown).

        Call it while no operation is running; a later operation opens a new connection.
        """
        with self._opened_lock:
            opened = list(self._opened)
        for private in opened:
            private.close()

    # One locked read-change-write ------------------------------------------------------
    def _change(self, group: SlotGroup, rule: Callable[[GroupRecord, float], tuple[T, bool]]) -> T:
        row_key = self._row_key(group)

        def work(cursor: CursorWrapper) -> tuple[T, bool]:
            raw, now = self._lock_row(cursor, row_key)
            record = GroupRecord.load(self._decode(raw), group)
            result, changed = rule(record, now)
            if changed:
                cursor.execute(
                    self._sql(
                        "INSERT INTO {table} ({key}, {value}, {expires}) VALUES (%s, %s, %s) "
                        "ON CONFLICT ({key}) DO UPDATE "
                        "SET {value} = EXCLUDED.{value}, {expires} = EXCLUDED.{expires}"
                    ),
                    [
                        row_key,
                        self._encode(record.dump()),
                        self._expires(record.keep_until(now) + self.RECORD_MARGIN),
                    ],
                )
            return result, changed

        return self._run(work, write=True)

    def _lock_row(self, cursor: CursorWrapper, row_key: str) -> tuple[str, float]:
        """Lock the group's row (created if missing); its stored value and the time."""
        if self._vendor == "postgresql":
            # Creates the row or locks the existing one; RETURNING runs after the lock is
            # held, so the clock is read after any wait for it. A placeholder row that
            # turns out not to be needed is rolled back.
            cursor.execute(
                self._sql(
                    "INSERT INTO {table} ({key}, {value}, {expires}) VALUES (%s, '', %s) "
                    "ON CONFLICT ({key}) DO UPDATE SET {expires} = {table}.{expires} "
                    "RETURNING {value}, {now}"
                ),
                [row_key, self._expires(time.time() + self.RECORD_MARGIN)],
            )
            raw, db_now = cursor.fetchone()
            return raw, self._now(db_now)
        # SQLite: the transaction already holds the database's write lock.
        cursor.execute(self._sql("SELECT {value} FROM {table} WHERE {key} = %s"), [row_key])
        row = cursor.fetchone()
        return (row[0] if row else ""), time.time()

    def _run(self, work: Callable[[CursorWrapper], Any], *, write: bool) -> Any:
        """Run ``work`` in a transaction of its own (``write``) or as a plain read.

        ``work`` of a write returns ``(result, changed)``: committed if changed, else
        rolled back. Retried once on a fresh connection when the connection turns out to
        be dead before anything was sent for commit (a server restart, an idle timeout).
        """
        if self._vendor == "sqlite" and connections[self._db].in_atomic_block:
            with transaction.atomic(using=self._db), connections[self._db].cursor() as cursor:
                outcome = work(cursor)
            return outcome[0] if write else outcome
        for attempt in (1, 2):
            private = self._private()
            committing = False
            try:
                with private.wrapper.cursor() as cursor:
                    if not write:
                        return work(cursor)
                    cursor.execute(self._begin)
                    result, changed = work(cursor)
                    committing = True
                    cursor.execute("COMMIT" if changed else "ROLLBACK")
                    return result
            except BaseException as exc:
                # Whatever interrupted it (an interrupt too): never leave a transaction
                # open, which would keep the group's row locked for everybody else.
                dead = self._recover(private)
                # A COMMIT that failed may still have been applied: never repeat it. Only a
                # database error says the connection was dead: an interrupt (a soft time
                # limit) that broke it mid-query is raised, not swallowed by a retry.
                if committing or not dead or attempt == 2 or not isinstance(exc, DatabaseError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _private(self) -> _PrivateConnection:
        """This thread's private connection (a new one in a forked child)."""
        private: _PrivateConnection | None = getattr(self._local, "connection", None)
        if private is None or private.pid != os.getpid():
            private = _PrivateConnection(connections.create_connection(self._db))
            self._local.connection = private
            with self._opened_lock:
                self._opened.add(private)
            with _ALL_PRIVATE_LOCK:
                _ALL_PRIVATE.add(private)
        return private

    def _recover(self, private: _PrivateConnection) -> bool:
        """After an error: roll back, or drop a dead connection. Returns whether it was dead."""
        wrapper = private.wrapper
        if wrapper.connection is not None:
            try:
                with wrapper.cursor() as cursor:
                    cursor.execute("ROLLBACK")
                if wrapper.is_usable():
                    return False
            except Exception:
                pass  # the connection is dead: replaced below
        self._local.connection = None
        private.close()
        return True

    # Encoding, keys, clocks ------------------------------------------------------------
    def _sql(self, statement: str) -> str:
        now = "EXTRACT(EPOCH FROM clock_timestamp())::float8" if self._vendor == "postgresql" else "NULL"
        return statement.format(now=now, **self._names)

    def _row_key(self, group: SlotGroup) -> str:
        return self.cache.make_and_validate_key(f"{GROUP_KEY_PREFIX}{group.digest}")

    def _encode(self, value: Any) -> str:
        return base64.b64encode(pickle.dumps(value, self.cache.pickle_protocol)).decode("latin1")

    @staticmethod
    def _decode(raw: str) -> Any:
        if not raw:
            return None
        try:
            return pickle.loads(base64.b64decode(raw.encode("latin1")))  # DatabaseCache's own format
        except Exception:  # another entry's class may not import here, or anything else
            return None  # not a group record: listing skips it, a change writes it afresh

    @staticmethod
    def _now(db_now: float | None) -> float:
        """The database's clock where it has one in SQL (PostgreSQL), else this host's."""
        return float(db_now) if db_now is not None else time.time()

    def _expires(self, moment: float) -> Any:
        """``moment`` (epoch seconds) as the ``expires`` column stores it (microseconds)."""
        value = datetime.fromtimestamp(moment, tz=UTC)
        if not settings.USE_TZ:
            value = value.astimezone().replace(tzinfo=None)
        return connections[self._db].ops.adapt_datetimefield_value(value)
