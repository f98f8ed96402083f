"""The embedded broker of ``make demo``: kombu's SQLAlchemy transport on a SQLite file."""

from __future__ import annotations

from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport


class SQLiteBrokerTransport(SQLAlchemyTransport):
    """kombu's SQLAlchemy transport, polling an empty queue every 50 ms instead of every
    second. ``polling_interval`` cannot go in the transport options: this transport passes
    them all to ``create_engine()``, which refuses it."""

    polling_interval = 0.05
