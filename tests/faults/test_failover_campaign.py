"""The short failover campaign (``tests/faults/failover.py``): holders on three test hosts
throttle on a primary + 2 replicas + 3 Sentinels (django-redis's documented Sentinel
settings) while the primary is SIGKILLed, failed over in order (``SENTINEL FAILOVER``)
and failed over after a grant the replicas missed, besides SIGKILLs and SIGSTOPs of
holders; once in each mode (``THROTTLE_REPLICAS`` 0 and 1), about a minute each.

Both modes: fencing tokens never repeat nor go backwards, the fenced resource accepts no
stale write, grants resume within each failover's time plus a few seconds. Mode 1: never
more believers than the limit, failovers included. Mode 0 promises tokens, not the limit
across a failover that loses a grant: its believers are asserted outside failovers and
printed for the failovers (docs/reliability.md, "Failover campaign").

Needs what the fault campaign needs (root, iproute2, ``unshare``, ``redis-server``,
PostgreSQL on 127.0.0.1:5432). ``TWF_SEED`` picks another schedule; ``TWF_KEEP=1`` keeps
records and logs in ``test-artifacts/faults-<id>`` (kept anyway when a run fails);
``TWF_CODE=<dir>`` makes the holders import ``task_workflow`` from ``<dir>`` (e.g. ``git
archive`` of the code before issue #21, as the report's "before" figures were taken). The
long run is ``tests/campaigns/test_failover_campaign_long.py`` (``make campaigns``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.campaign import run_campaign
from tests.faults.checker import Report
from tests.faults.failover import (
    FailoverCampaign,
    FailoverConfig,
    failover_failures,
    failover_recoveries,
)
from tests.faults.test_fault_campaign import missing_requirements

pytestmark = [pytest.mark.services, pytest.mark.failover_campaign]

#: Seconds of faults after every kind was injected once (each kind is, however short).
DURATION = float(os.environ.get("TWF_DURATION", "30"))


@pytest.mark.parametrize("replicas", [0, 1], ids=["mode-0", "mode-1"])
def test_failovers_keep_tokens_increasing_and_mode_1_keeps_the_limit(replicas: int) -> None:
    if missing := missing_requirements():
        pytest.skip(f"needs {', '.join(missing)}")
    config = FailoverConfig(
        seed=int(os.environ.get("TWF_SEED", "20261207")),
        duration=DURATION,
        replicas=replicas,
        keep_artifacts=os.environ.get("TWF_KEEP") == "1",
        code_path=Path(os.environ["TWF_CODE"]) if os.environ.get("TWF_CODE") else None,
    )
    report, artifacts = run_campaign(config, FailoverCampaign)
    assert_failover_campaign_passed(report, config, artifacts, min_holds=25)


def assert_failover_campaign_passed(
    report: Report, config: FailoverConfig, artifacts: Path, min_holds: int
) -> None:
    """The mode's promises (``failover_failures``), and that the run did what it says."""
    print(f"mode {config.replicas} (THROTTLE_REPLICAS={config.replicas}), seed {config.seed}")
    print(report.table())
    print(report.kind_table())
    print(f"faults: {report.faults}")
    for fault, first_grant in failover_recoveries(report):
        print(f"  {fault.kind}: failover {fault.detail['failover']:.2f} s, first grant {first_grant:.2f} s")
    where = f"(seed {config.seed}; records in {artifacts} when the run failed)"
    evidence = "\n\n".join([v.describe() for v in report.violations if v.cause != "sigstop"] + report.notes)
    failures = failover_failures(report, config)
    assert not failures, f"{'; '.join(failures)} {where}:\n{evidence}"
    # The run did what it says.
    assert report.holds >= min_holds, report.table()
    assert set(report.faults) >= set(config.kinds), report.faults
    assert len(report.hostnames) == 3, report.hostnames
