"""The failover campaign, long run: the short test's campaign
(``tests/faults/test_failover_campaign.py``, ``tests/faults/failover.py``) for minutes in
each mode, with every kind of fault: SIGKILL of the primary, ``SENTINEL FAILOVER``, a
failover to replicas that missed a grant, and SIGKILL, SIGSTOP and a cut-off Redis link
of holders on the three test hosts. The checks are the short test's
(``assert_failover_campaign_passed``): tokens never repeat nor go backwards and no stale
write is accepted in either mode, never more believers than the limit with
``THROTTLE_REPLICAS=1`` (outside failovers with 0), grants resume within each failover's
time plus a few seconds.

Needs root, iproute2, ``unshare``, ``redis-server`` and PostgreSQL on 127.0.0.1:5432
(database ``tw_faults_<id>``, dropped afterwards); it starts its own primary, replicas and
Sentinels and touches no other Redis. ``CAMPAIGN_FAILOVER_MINUTES`` (default 3, per mode)
sets the time spent injecting faults, ``CAMPAIGN_FAILOVER_SEED`` (default 1) the
schedule; ``TWF_KEEP=1`` keeps records and logs.
"""

from __future__ import annotations

import os

import pytest

from tests.faults.campaign import run_campaign
from tests.faults.failover import FAILOVER_KINDS, HOLDER_KINDS, FailoverCampaign, FailoverConfig
from tests.faults.test_failover_campaign import assert_failover_campaign_passed
from tests.faults.test_fault_campaign import missing_requirements

pytestmark = [pytest.mark.campaign, pytest.mark.services]

MINUTES = float(os.environ.get("CAMPAIGN_FAILOVER_MINUTES", "3"))
SEED = int(os.environ.get("CAMPAIGN_FAILOVER_SEED", "1"))


@pytest.mark.parametrize("replicas", [0, 1], ids=["mode-0", "mode-1"])
def test_failovers_for_minutes_keep_tokens_increasing_and_mode_1_keeps_the_limit(replicas: int) -> None:
    if missing := missing_requirements():
        pytest.skip(f"needs {', '.join(missing)}")
    config = FailoverConfig(
        seed=SEED,
        duration=MINUTES * 60,
        replicas=replicas,
        kinds=(*FAILOVER_KINDS, *HOLDER_KINDS),
        keep_artifacts=os.environ.get("TWF_KEEP") == "1",
    )
    print(f"failover campaign: mode {replicas}, {MINUTES:g} min of faults, seed {SEED}")
    report, artifacts = run_campaign(config, FailoverCampaign)
    # The short runs make about one hold a second; ask for a third of that rate.
    assert_failover_campaign_passed(report, config, artifacts, min_holds=max(30, int(MINUTES * 20)))
