"""``DatabaseWrapper`` of ``tests.tenant_backend``: Django's PostgreSQL backend, plus a
``SET search_path`` on each new cursor (a named, server-side cursor gets it through a
plain cursor of the same connection, as it cannot run it itself)."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base

SEARCH_PATH = "public"


class DatabaseWrapper(base.DatabaseWrapper):
    def create_cursor(self, name: str | None = None) -> Any:
        cursor = super().create_cursor(name)
        setter = self.connection.cursor() if name else cursor
        setter.execute(f"SET search_path TO {SEARCH_PATH}")
        if name:
            setter.close()
        return cursor
