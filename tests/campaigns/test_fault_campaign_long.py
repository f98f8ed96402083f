"""The throttle's fault campaign, long run: the short test's campaign
(``tests/faults/test_fault_campaign.py``, ``tests/faults/campaign.py``) for minutes.

Three hosts (network namespaces, each with its own host name) run three holder processes
each, which loop on ``throttle(key=..., concurrency=N, ttl=1.5)`` over a fenced group of
limit 1 and a group of limit 2 and write to a fenced PostgreSQL row with their lease's
fencing token, while faults follow each other (SIGKILL, SIGSTOP of a holder and of a
waiter, a host cut off from Redis, a Redis restart, a slow link to Redis). The checks are
the short test's: no more believers than the limit but during a SIGSTOP longer than the
lease, no stale write accepted, no fencing-token regression, no grant inside the restart
grace.

Needs root, iproute2, ``unshare``, ``redis-server`` and PostgreSQL on 127.0.0.1:5432
(database ``tw_faults_<id>``, dropped afterwards); it starts a Redis of its own and touches
no other. ``CAMPAIGN_FAULT_MINUTES`` (default 3) sets the time spent injecting faults,
``CAMPAIGN_FAULT_SEED`` (default 1) the schedule; ``TWF_KEEP=1`` keeps records and logs.
Everything the run created (namespaces, servers, processes, the database) is removed when
it ends, also when it fails (``Campaign.__exit__``).
"""

from __future__ import annotations

import os

import pytest

from tests.faults.campaign import CampaignConfig, run_campaign
from tests.faults.test_fault_campaign import assert_campaign_passed, missing_requirements

pytestmark = [pytest.mark.campaign, pytest.mark.services]

MINUTES = float(os.environ.get("CAMPAIGN_FAULT_MINUTES", "3"))
SEED = int(os.environ.get("CAMPAIGN_FAULT_SEED", "1"))


def test_throttle_keeps_its_limit_and_fencing_refuses_stale_writes_for_minutes_of_faults() -> None:
    if missing := missing_requirements():
        pytest.skip(f"needs {', '.join(missing)}")
    config = CampaignConfig(
        seed=SEED, duration=MINUTES * 60, keep_artifacts=os.environ.get("TWF_KEEP") == "1"
    )
    print(f"fault campaign: {MINUTES:g} min of faults, seed {SEED}")
    report, artifacts = run_campaign(config)
    # About 2.5 holds a second in the short run's 70 s; ask for a third of that rate.
    assert_campaign_passed(report, config, artifacts, min_holds=max(50, int(MINUTES * 50)))
