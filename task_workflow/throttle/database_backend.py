"""DatabaseCache backend: the generic backend with each slot operation one conditional
statement on the cache table (PostgreSQL and SQLite).

Django's ``DatabaseCache.add`` over an *expired* row reads, then updates, so contenders for
a lapsed slot can all win; and it stores expiry in whole seconds. Here a slot is taken
with ``INSERT … ON CONFLICT DO UPDATE … WHERE expires < now`` (one winner: the row count
says who), renewal and release compare-and-set on the stored value (the owner's own lease),
and expiry keeps microseconds. Values use DatabaseCache's own encoding, so ``cache.get``
reads them as usual. Operators' listing scans the table for the throttle's rows, so no
registry of groups is kept (the generic backend's registry is a read-modify-write that
grows with the number of groups).
"""

from __future__ import annotations

import base64
import pickle
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.cache.backends.db import DatabaseCache
from django.db import connections, router

from .base import AcquireResult, HeldSlot, SlotGroup
from .cache_backend import SLOT_KEY_PREFIX, CacheThrottleBackend
from .redis_backend import held_slot_from_metadata

#: Database vendors whose SQL supports ``INSERT … ON CONFLICT … DO UPDATE … WHERE``.
UPSERT_VENDORS = ("postgresql", "sqlite")


class DatabaseCacheThrottleBackend(CacheThrottleBackend):
    """Slots as rows of a DatabaseCache table, taken and given back atomically."""

    cache: DatabaseCache

    def __init__(self, cache: DatabaseCache, poll_interval: float = 0.05) -> None:
        super().__init__(cache, poll_interval)
        self._db = router.db_for_write(cache.cache_model_class)
        # The stored form of every slot key starts with this, unless a custom KEY_FUNCTION
        # does not keep keys as a prefix + the key: then the generic registry is used.
        prefix = cache.make_key(SLOT_KEY_PREFIX)
        scannable = cache.make_key(SLOT_KEY_PREFIX + "x") == prefix + "x"
        self._stored_prefix: str | None = prefix if scannable else None

    @classmethod
    def supports(cls, cache: Any) -> bool:
        """Whether ``cache`` is a DatabaseCache on a database with the needed upsert."""
        if not isinstance(cache, DatabaseCache):
            return False
        return connections[router.db_for_write(cache.cache_model_class)].vendor in UPSERT_VENDORS

    def _sql(self, statement: str) -> str:
        quote = connections[self._db].ops.quote_name
        return statement.format(
            table=quote(self.cache._table),  # type: ignore[attr-defined]  # set by BaseDatabaseCache
            key=quote("cache_key"),
            value=quote("value"),
            expires=quote("expires"),
        )

    def _register(self, group: SlotGroup, metadata: dict[str, Any]) -> None:
        if self._stored_prefix is None:
            super()._register(group, metadata)

    def held_slots(self) -> list[HeldSlot]:
        """Every live throttle row of the cache table, in one ``SELECT``."""
        if self._stored_prefix is None:
            return super().held_slots()
        escaped = self._stored_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with connections[self._db].cursor() as cursor:
            cursor.execute(
                self._sql(
                    "SELECT {key}, {value} FROM {table} WHERE {key} LIKE %s ESCAPE '\\' AND {expires} > %s"
                ),
                [escaped + "%", self._when(0)],
            )
            rows = cursor.fetchall()
        now = time.time()
        slots = []
        for row_key, raw in rows:
            lease = self._decode(raw)
            if isinstance(lease, dict) and "token" in lease:  # not the generic registry
                slot = row_key.rsplit(":", 1)[-1]
                slots.append(held_slot_from_metadata(lease["token"], slot, lease, lease["deadline"], now))
        return slots

    def _row_key(self, group: SlotGroup, slot: int | str) -> str:
        return self.cache.make_and_validate_key(self._slot_key(group, slot))

    def _encode(self, value: Any) -> str:
        return base64.b64encode(pickle.dumps(value, self.cache.pickle_protocol)).decode("latin1")

    @staticmethod
    def _decode(raw: str) -> Any:
        return pickle.loads(base64.b64decode(raw.encode("latin1")))

    def _when(self, seconds_from_now: float) -> Any:
        moment = datetime.now(tz=UTC) + timedelta(seconds=seconds_from_now)
        if not settings.USE_TZ:
            moment = moment.astimezone().replace(tzinfo=None)
        return connections[self._db].ops.adapt_datetimefield_value(moment)

    def _execute(self, statement: str, params: list[Any]) -> int:
        with connections[self._db].cursor() as cursor:
            cursor.execute(self._sql(statement), params)
            return int(cursor.rowcount)

    def _stored(self, row_key: str) -> tuple[str, dict[str, Any]] | None:
        """The raw stored value of a live row and its decoded lease, or ``None``."""
        with connections[self._db].cursor() as cursor:
            cursor.execute(
                self._sql("SELECT {value} FROM {table} WHERE {key} = %s AND {expires} > %s"),
                [row_key, self._when(0)],
            )
            row = cursor.fetchone()
        if row is None:
            return None
        raw = row[0]
        lease = self._decode(raw)
        return (raw, lease) if isinstance(lease, dict) else None

    def acquire(
        self, group: SlotGroup, token: str, concurrency: int, ttl: float, metadata: dict[str, Any]
    ) -> AcquireResult:
        lease = {"token": token, "deadline": time.time() + ttl, **metadata}
        encoded, expires, now = self._encode(lease), self._when(ttl), self._when(0)
        for slot in range(concurrency):
            taken = self._execute(
                "INSERT INTO {table} ({key}, {value}, {expires}) VALUES (%s, %s, %s) "
                "ON CONFLICT ({key}) DO UPDATE "
                "SET {value} = EXCLUDED.{value}, {expires} = EXCLUDED.{expires} "
                "WHERE {table}.{expires} < %s",
                [self._row_key(group, slot), encoded, expires, now],
            )
            if taken == 1:
                self._register(group, metadata)
                return AcquireResult(True, slot=str(slot))
        return self._refused(group, concurrency)

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        row_key = self._row_key(group, slot)
        stored = self._stored(row_key)
        if stored is None or stored[1].get("token") != token:
            return False
        raw, lease = stored
        renewed = self._execute(
            "UPDATE {table} SET {value} = %s, {expires} = %s WHERE {key} = %s AND {value} = %s",
            [self._encode({**lease, "deadline": time.time() + ttl}), self._when(ttl), row_key, raw],
        )
        if renewed == 1:
            self._register(group, lease)
        return renewed == 1

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        row_key = self._row_key(group, slot)
        stored = self._stored(row_key)
        if stored is None or stored[1].get("token") != token:
            return False
        return (
            self._execute("DELETE FROM {table} WHERE {key} = %s AND {value} = %s", [row_key, stored[0]]) == 1
        )
