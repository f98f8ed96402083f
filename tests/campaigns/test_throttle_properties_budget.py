"""The throttle backends' stateful property tests with a large example budget.

The same state machines as ``tests/test_throttle_properties.py`` (rules and invariants:
``tests/throttle_model.py``; its budget is ``EXAMPLES`` x ``STEPS``, 100 x 40), run with
``CAMPAIGN_PROPERTY_EXAMPLES`` sequences (default 2000) of up to
``CAMPAIGN_PROPERTY_STEPS`` steps (50) per backend: the Redis backend on the test Redis,
and the DatabaseCache backend on the test database (PostgreSQL; SQLite in the
``TEST_DATABASE=sqlite`` run). Failing examples are kept in ``.hypothesis/`` under the
short test's machines, so ``make test`` replays them. Leases are 0.15-1 s and the "let
leases lapse" rule sleeps: 0.1-0.3 s per example.
"""

from __future__ import annotations

import os

import pytest
from django.core.management import call_command
from hypothesis.stateful import run_state_machine_as_test

from tests.test_throttle_properties import (
    CACHE_TABLE,
    VENDOR,
    DatabaseThrottleMachine,
    RedisThrottleMachine,
    database_marks,
)
from tests.throttle_model import settings_for

pytestmark = pytest.mark.campaign

EXAMPLES = int(os.environ.get("CAMPAIGN_PROPERTY_EXAMPLES", "2000"))
STEPS = int(os.environ.get("CAMPAIGN_PROPERTY_STEPS", "50"))


@pytest.mark.services
def test_redis_backend_keeps_the_protocol_over_a_large_budget():
    run_state_machine_as_test(RedisThrottleMachine, settings=settings_for(EXAMPLES, STEPS))


@pytest.mark.parametrize("vendor", [pytest.param(VENDOR, marks=database_marks)])
def test_database_cache_backend_keeps_the_protocol_over_a_large_budget(vendor):
    call_command("createcachetable", CACHE_TABLE, verbosity=0)
    run_state_machine_as_test(DatabaseThrottleMachine, settings=settings_for(EXAMPLES, STEPS))
