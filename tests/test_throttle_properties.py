"""Stateful property tests of the throttle backends against the real stores.

Hypothesis drives each backend with random sequences of acquire, release, renew, crash,
wait, give up, force release, zombie and "let leases lapse" steps by a few callers in one
or two slot groups, and checks the protocol's invariants after every step against a model
(``tests/throttle_model.py``, which lists the rules and the invariants):

- ``redis``: :class:`RedisThrottleBackend` on a raw client of the test Redis, under a fresh
  key prefix per example;
- ``database-<vendor>``: :class:`DatabaseCacheThrottleBackend` on a ``DatabaseCache`` of
  the test database (its own table, a fresh key prefix per example), committed as workers
  see it: PostgreSQL in the main run, SQLite in the ``TEST_DATABASE=sqlite`` run.

The budget is modest (``EXAMPLES`` x ``STEPS``), leases are short (0.15-1 s) so that time
can pass within a test; ``tests/campaigns/test_throttle_properties_budget.py`` (``make
campaigns``) runs the same machines with a much larger budget. Failing examples are kept
in ``.hypothesis/`` and replayed first.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command
from hypothesis.stateful import run_state_machine_as_test

from tests.throttle_model import database_subject, machine_for, redis_subject, settings_for

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"
CACHE_TABLE = "tw_test_throttle_properties"
VENDOR = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]  # postgresql, sqlite3

#: Examples per backend and steps per example: well under a minute per backend.
EXAMPLES = 100
STEPS = 40

RedisThrottleMachine = machine_for("redis", lambda: redis_subject(REDIS_URL))
DatabaseThrottleMachine = machine_for(
    f"database-{VENDOR}", lambda: database_subject(CACHE_TABLE, f"database-{VENDOR}")
)

database_marks = [pytest.mark.django_db(transaction=True)]
if VENDOR == "postgresql":
    database_marks.append(pytest.mark.postgres)


@pytest.mark.services
def test_redis_backend_keeps_the_protocol():
    run_state_machine_as_test(RedisThrottleMachine, settings=settings_for(EXAMPLES, STEPS))


@pytest.mark.parametrize("vendor", [pytest.param(VENDOR, marks=database_marks)])
def test_database_cache_backend_keeps_the_protocol(vendor):
    call_command("createcachetable", CACHE_TABLE, verbosity=0)
    run_state_machine_as_test(DatabaseThrottleMachine, settings=settings_for(EXAMPLES, STEPS))
