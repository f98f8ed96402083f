"""The throttle's fault campaign, long run: holders on three hosts under faults.

How to run (as root: network namespaces; needs iproute2, ``unshare``, ``redis-server``
and PostgreSQL on 127.0.0.1:5432, where it creates and drops a database
``tw_faults_<id>``; it starts a Redis of its own and touches no other)::

    .venv/bin/python benchmarks/throttle_fault_campaign.py [--minutes 3] [--seed 1] [--keep]

The same campaign as ``tests/faults/test_fault_campaign.py`` (see
``tests/faults/campaign.py``), only longer: three hosts (network namespaces, each with
its own host name) run three holder processes each, which loop on
``throttle(key=..., concurrency=N, ttl=1.5)`` over a fenced group of limit 1 and a group
of limit 2 and write to a fenced PostgreSQL row with their lease's fencing token, while
faults follow each other (SIGKILL, SIGSTOP of a holder and of a waiter, a host cut off
from Redis, a Redis restart, a slow link to Redis). The checker then counts, per group,
the most holds that believed at once and the moments over the limit, by cause, and the
fenced resource's accepted and refused writes.

Target: 0 unexplained violations, 0 stale writes accepted, 0 fencing-token regressions,
0 grants inside the restart grace; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="time spent injecting faults")
    parser.add_argument("--seed", type=int, default=1, help="the fault schedule (and holders' choices)")
    parser.add_argument("--keep", action="store_true", help="keep records and logs in test-artifacts/")
    args = parser.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.faults.campaign import CampaignConfig, passed, run_campaign

    config = CampaignConfig(seed=args.seed, duration=args.minutes * 60, keep_artifacts=args.keep)
    print(f"fault campaign: {args.minutes:g} min of faults, seed {args.seed}", flush=True)
    report, artifacts = run_campaign(config)
    print(report.table())
    for violation in report.violations:
        if violation.cause != "sigstop":
            print("\n" + violation.describe())
    for note in report.notes:
        print(note)
    ok = passed(report)
    print(
        f"\ntarget {'met' if ok else 'MISSED'}"
        + ("" if ok and not args.keep else f"; records in {artifacts}")
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
