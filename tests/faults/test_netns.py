"""The fault campaign's run registry and its clean-up of crashed runs (``netns.py``).

Two campaigns may run at once (the nox matrix runs sessions side by side, and nox gives
every session a ``TMPDIR`` of its own): a run starting must tell the namespaces of a run
in progress from the leftovers of a crashed one, whatever its environment. Needs root and
iproute2 (skipped otherwise); the namespaces created here are of the campaign's naming
scheme with ids of their own, and are removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.netns import PARENT_ENV, RunRegistry, ip, new_run_id, run_namespaces

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def stale_ids_seen_with(tmpdir: Path, *run_ids: str) -> set[str]:
    """Which of ``run_ids`` a process with ``TMPDIR=tmpdir`` takes for a crashed run
    (read-only: it only looks)."""
    script = (
        "import json, sys\n"
        "from tests.faults.netns import stale_run_ids\n"
        "print(json.dumps(sorted(stale_run_ids() & set(sys.argv[1:]))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *run_ids],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(done.stdout))


@pytest.fixture
def namespace() -> Iterator[tuple[str, str]]:
    """``(run id, name)`` of a services namespace of a run of its own, removed after."""
    run_id = new_run_id()
    name = f"twf-svc-{run_id}"
    ip("netns", "add", name)
    try:
        yield run_id, name
    finally:
        for pid in ip("netns", "pids", name, check=False).split():
            subprocess.run(["kill", "-9", pid], check=False)
        ip("netns", "delete", name, check=False)
        RunRegistry(run_id).remove()


def test_a_registered_run_is_alive_for_a_run_with_another_tmpdir(
    namespace: tuple[str, str], tmp_path: Path
) -> None:
    """The failure of the matrix run: each session's campaign registered under its own
    TMPDIR, so the later one took the earlier one's namespaces for leftovers and removed
    them (its Redis and holders SIGKILLed mid-run; it then timed out waiting for holds)."""
    run_id, _ = namespace
    registry = RunRegistry(run_id)
    registry.claim()
    assert registry.owner_alive()
    assert stale_ids_seen_with(tmp_path, run_id) == set()
    assert stale_ids_seen_with(Path("/tmp"), run_id) == set()


def test_a_namespace_whose_campaign_still_runs_its_processes_is_not_stale(
    namespace: tuple[str, str], tmp_path: Path
) -> None:
    """Without a registration that this run can read (a campaign of an older checkout
    registers elsewhere), processes in the namespaces that are children of the campaign
    named in their ``TWF_PARENT_PID`` show that it runs; once they are gone (or orphaned:
    the campaign died) the namespaces are a crashed run's leftovers."""
    run_id, name = namespace
    child = subprocess.Popen(
        ["ip", "netns", "exec", name, "sleep", "60"], env={**os.environ, PARENT_ENV: str(os.getpid())}
    )
    try:
        deadline = time.monotonic() + 10
        while str(child.pid) not in ip("netns", "pids", name).split():
            assert time.monotonic() < deadline, "the child did not enter the namespace"
            time.sleep(0.01)
        assert stale_ids_seen_with(tmp_path, run_id) == set()
    finally:
        child.kill()
        child.wait()
    assert stale_ids_seen_with(tmp_path, run_id) == {run_id}
    assert run_namespaces(run_id) == [name]  # looking removed nothing


def test_the_campaign_fails_at_once_when_its_holders_die_without_a_fault(tmp_path: Path) -> None:
    """Holders killed from outside (by another run's clean-up, before the registry was
    machine-wide) can start no hold: the wait for holds to resume says so at once, with
    every holder's state, instead of timing out after 30 s as if the throttle had hung."""
    from tests.faults.campaign import Campaign, CampaignConfig, CampaignError, HolderProcess

    campaign = Campaign(CampaignConfig())
    campaign.redis.process = subprocess.Popen(["sleep", "60"])
    host = campaign.topology.hosts[0]
    holder = HolderProcess(host, "h0-001", tmp_path / "h0-001.jsonl", tmp_path / "h0-001.log")
    holder.process = subprocess.Popen(["sleep", "60"])
    campaign.holders.append(holder)
    try:
        holder.process.kill()
        holder.process.wait()
        started = time.monotonic()
        with pytest.raises(CampaignError, match=r"holder h0-001 \(pid \d+\) exited with -9, killed by none"):
            campaign._await_progress(time.monotonic(), timeout=campaign.config.resume_timeout)
        assert time.monotonic() - started < 5
    finally:
        campaign.redis.process.kill()
        campaign.redis.process.wait()
