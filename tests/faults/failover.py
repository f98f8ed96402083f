"""The failover campaign: the fault campaign (``campaign.py``) on a Redis with high
availability, a primary, two replicas and three Sentinels, in the services namespace.

Every node listens on the services namespace's address on the hosts' bridge
(``10.77.0.1``, ports of its own) and announces it, so what Sentinel hands out works from
the three hosts; the campaign manages the nodes through their Unix sockets
(``tests.redis_topology.SentinelTopology``). The holders configure the lock cache exactly
as django-redis documents Sentinel (``SentinelTopology.django_cache()``), with
``TASK_WORKFLOW["THROTTLE_REPLICAS"]`` = the run's mode (``FailoverConfig.replicas``): 0,
a grant counts once the primary has it; 1, once a replica has it too (Redis ``WAIT``).

Fault kinds, besides the holders' ``sigkill``, ``sigstop`` and ``cut`` of ``campaign.py``:

- ``primary-kill``: SIGKILL the primary while holders and waiters run; Sentinel promotes
  a replica; the killed node is started again, as a replica of the new primary;
- ``orderly-failover``: ``SENTINEL FAILOVER``: a replica is promoted while the old primary
  still runs and still answers the connections it has until Sentinel demotes it (seconds
  later): a split brain the throttle must survive;
- ``lagging-failover``: SIGSTOP both replicas and close their replication links on the
  primary (``CLIENT KILL TYPE replica``: writes from then on reach no replica, not even
  a paused one's socket buffer, as when a replica's link times out), wait until a holder
  is granted a fenced slot by the primary (a ``start`` after the links were closed; with mode 1
  no grant can complete, the campaign then goes on after ``lagging_grant_wait``),
  SIGKILL the primary, SIGCONT the replicas: the replica Sentinel promotes missed that
  grant (``detail["missed_bytes"]``: the primary's replication stream written after the
  links were closed);
- ``one-lagging-failover``: the same with one replica paused (chosen by the seed): the
  other one reconnects and gets (with mode 1: acknowledges) the grant, and Sentinel must
  promote it, the replica with the most data, not the one that missed the grant.

Each failover's ``Fault`` runs from the kill (or the failover command, or the pause) to
the new primary's promotion (``end``; an orderly failover: to the old primary's
demotion), with ``detail["killed"]`` and ``detail["failover"]`` (seconds from the kill or
command to the promotion). ``failover_failures`` lists what a run did wrong for its mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.faults.campaign import Campaign, CampaignConfig, CampaignError, wait_until
from tests.faults.checker import Fault, Report
from tests.faults.netns import SERVICES_REDIS_ADDRESS, Host
from tests.faults.proxy import RouteSpec
from tests.redis_topology import RedisNode, SentinelTopology

#: The failovers this campaign adds.
FAILOVER_KINDS = ("primary-kill", "orderly-failover", "lagging-failover", "one-lagging-failover")
#: Faults of holders, from the fault campaign, that a failover run adds to them.
HOLDER_KINDS = ("sigkill", "sigstop", "cut")

#: Seconds grants may take to resume after a failover's promotion before the run counts
#: as not recovered: the holders' calls that failed on the old primary are retried after
#: 0.05-0.2 s, reconnect (asking Sentinel) and find the new primary; a slot whose release
#: failed in the outage is released again by its holder's renewer (at most a renewal
#: period, TTL/3, later); in mode 1 a handoff the old primary could not get acknowledged
#: sends its waiter back to the line. Measured: at most 2.3 s (mode 1, orderly failover,
#: on a loaded machine). Below the lease (5 s): a slot kept for a whole lease after a
#: promotion is caught.
RECOVERY_SLACK = 4.0


@dataclass(frozen=True)
class FailoverConfig(CampaignConfig):
    """A failover run: the fault campaign's settings plus the mode and the topology's.

    The lease (``ttl``) is longer than a failover (about 2-3 s from a kill to the new
    primary's first grant), so that a holder granted a slot just before a kill still
    believes when the new primary could grant it again: what mode 0 does not promise.
    The holders' faults last longer than a lease: the short run has only ``sigkill`` of
    them, the long one ``HOLDER_KINDS``."""

    #: ``THROTTLE_REPLICAS``: replicas that must acknowledge a grant (the mode).
    replicas: int = 0
    #: ``THROTTLE_REPLICAS_TIMEOUT``, seconds.
    replicas_timeout: float = 0.3
    ttl: float = 5.0
    #: Holds up to longer than a failover: a holder granted before a kill still holds when
    #: the new primary could grant its slot again.
    hold: tuple[float, float] = (0.2, 6.0)
    kinds: tuple[str, ...] = (*FAILOVER_KINDS, "sigkill")
    #: Sentinel's ``down-after-milliseconds`` and ``failover-timeout``. At 1 s, on a
    #: loaded 2-core machine, Sentinel took a primary it had promoted a second earlier for
    #: down and failed over again unasked.
    down_after_ms: int = 1500
    failover_timeout_ms: int = 3000
    #: Seconds the lagging failover waits, replicas paused, for a grant of the primary.
    lagging_grant_wait: float = 3.0


class FailoverCampaign(Campaign):
    """One failover run: ``run_campaign(FailoverConfig(...), FailoverCampaign)``."""

    config: FailoverConfig

    def __init__(self, config: FailoverConfig) -> None:
        super().__init__(config)
        self.sentinel = SentinelTopology(
            self.dir / "redis",
            host=SERVICES_REDIS_ADDRESS,
            command_prefix=("ip", "netns", "exec", self.topology.services),
            down_after_ms=config.down_after_ms,
            failover_timeout_ms=config.failover_timeout_ms,
        )

    # Services ------------------------------------------------------------------------
    def start_services(self) -> None:
        self.sentinel.start()
        self._start_proxy()

    def stop_services(self) -> None:
        self.sentinel.stop()

    def services_broken(self) -> list[str]:
        # A fault that kills a node starts it again before it returns.
        return [
            f"{node.name} ({node.kind}, port {node.port}) exited with "
            f"{node.process.returncode if node.process else None}"
            for node in self.sentinel
            if not node.alive()
        ]

    def proxy_routes(self) -> list[RouteSpec]:
        # The hosts reach the nodes directly (no latency fault): only the database route.
        return [route for route in super().proxy_routes() if route.name == "db"]

    def holder_env(self, host: Host) -> dict[str, str]:
        env = super().holder_env(host)
        del env["THROTTLE_REDIS_URL"]
        primary = self.sentinel.primary
        env.update(
            {
                "TWF_LOCK_CACHE": json.dumps(self.sentinel.django_cache(db=0)),
                "TWF_REPLICAS": str(self.config.replicas),
                "TWF_REPLICAS_TIMEOUT": str(self.config.replicas_timeout),
                # Celery and the default cache are not used; an address that exists anyway.
                "REDIS_URL": f"redis://{primary.host}:{primary.port}/1",
            }
        )
        return env

    def describe_state(self) -> str:
        return super().describe_state() + "\ntopology:\n" + self.sentinel.describe()

    # Faults --------------------------------------------------------------------------
    def fault_handlers(self) -> dict[str, Callable[[], Fault]]:
        return {
            **super().fault_handlers(),
            "primary-kill": self.fault_primary_kill,
            "orderly-failover": self.fault_orderly_failover,
            "lagging-failover": lambda: self.fault_lagging_failover(paused_replicas=2),
            "one-lagging-failover": lambda: self.fault_lagging_failover(paused_replicas=1),
        }

    def _await_fenced_hold(self) -> None:
        """Wait (up to 5 s) until a fenced group is held: a failover then falls inside a
        hold whose holder writes to the fenced resource."""
        fenced = {g.key for g in self.config.groups if g.fenced}
        self._pick(lambda h: h.holding and h.group in fenced, 5.0)

    def fault_primary_kill(self) -> Fault:
        self._await_fenced_hold()
        old = self.sentinel.current_primary()
        killed = time.monotonic()
        old.kill()
        new = self.sentinel.wait_for_failover(old)
        promoted = time.monotonic()
        self.sentinel.restart(old)
        detail = self._detail(killed, promoted, old, new)
        return Fault("primary-kill", killed, promoted, detail=detail)

    def fault_orderly_failover(self) -> Fault:
        self._await_fenced_hold()
        old = self.sentinel.current_primary()
        asked = time.monotonic()
        self.sentinel.orderly_failover()
        new = self.sentinel.wait_for_failover(old)
        promoted = time.monotonic()
        # Over when Sentinel has demoted the old primary (it answers its connections until
        # then) and it replicates from the new one.
        self.sentinel.wait_until_synced()
        self.sentinel.wait_until_sentinels_agree()
        demoted = time.monotonic()
        detail = self._detail(asked, promoted, old, new) | {"demoted": round(demoted - asked, 3)}
        del detail["killed"]  # nothing was killed: recovery counts from the command
        return Fault("orderly-failover", asked, demoted, detail=detail)

    def fault_lagging_failover(self, paused_replicas: int) -> Fault:
        """``lagging-failover`` (both replicas paused) or ``one-lagging-failover`` (one)."""
        fenced = {g.key for g in self.config.groups if g.fenced}
        # Pause when a fenced hold is about to end: its slot goes to a waiter (or a
        # newcomer) while the replicas miss it.
        self._pick(lambda h: h.holding and h.group in fenced and h.until - time.monotonic() < 0.3, 10.0)
        old = self.sentinel.current_primary()
        replicas = [node for node in self.sentinel.nodes if node is not old]
        lagging = self.rng.sample(replicas, paused_replicas)
        paused = time.monotonic()
        for replica in lagging:
            replica.pause()
        try:
            with old.client() as client:
                # A replica still running reconnects at once (a partial resync).
                client.client_kill_filter(_type="replica")
                cut_offset = int(client.info("replication")["master_repl_offset"])
            links_cut = time.monotonic()

            def granted_since_cut() -> float | None:
                # A grant of a fenced group: its holder writes through the failover.
                starts = [
                    h.last_start for h in self._live() if h.last_start > links_cut and h.group in fenced
                ]
                return min(starts, default=None)

            try:
                granted = wait_until(granted_since_cut, self.config.lagging_grant_wait, "a grant", 0.005)
            except CampaignError:
                granted = None  # none in time (every replica paused in mode 1: none can complete)
            with old.client() as client:
                kill_offset = int(client.info("replication")["master_repl_offset"])
            killed = time.monotonic()
            old.kill()
        finally:
            for replica in lagging:
                replica.resume()
        new = self.sentinel.wait_for_failover(old)
        promoted = time.monotonic()
        self.sentinel.restart(old)
        detail = self._detail(killed, promoted, old, new) | {
            "granted": None if granted is None else round(granted - links_cut, 3),
            "missed_bytes": kill_offset - cut_offset,
            "lagging": [node.name for node in lagging],
        }
        kind = "lagging-failover" if paused_replicas == len(replicas) else "one-lagging-failover"
        return Fault(kind, paused, promoted, detail=detail)

    @staticmethod
    def _detail(killed: float, promoted: float, old: RedisNode, new: RedisNode) -> dict[str, Any]:
        return {
            "killed": killed,
            "failover": round(promoted - killed, 3),
            "old": old.name,
            "new": new.name,
        }

    # Checking ------------------------------------------------------------------------
    def judge(self, report: Report) -> bool:
        return not failover_failures(report, self.config)


def failover_recoveries(report: Report) -> list[tuple[Fault, float]]:
    """Each failover with the seconds from its kill (or command) to the first grant after."""
    found: list[tuple[Fault, float]] = []
    for kind in FAILOVER_KINDS:
        ofkind = sorted((f for f in report.injected if f.kind == kind), key=lambda f: f.start)
        figures = report.by_kind.get(kind)
        if figures is not None:
            found += zip(ofkind, figures.first_grants, strict=False)
    return found


def recovery_bound(fault: Fault, config: FailoverConfig) -> float:
    """Seconds from a failover's kill (or command) by which grants must have resumed: its
    failover time plus ``RECOVERY_SLACK``. An orderly failover in mode 0 may take a lease
    more: a release the old primary took during the split brain (acknowledged: its holder
    does not retry it) is lost with the old primary's writes, and the new primary keeps
    that slot until the lease runs out (measured: 4.04 s after a 0.64 s failover, lease
    5 s). With mode 1 the old primary soon has no replica left to acknowledge it (Sentinel
    moves the other replica to the new primary right after the promotion): the release
    fails, and its holder retries it until the new primary takes it."""
    bound = fault.detail["failover"] + RECOVERY_SLACK
    if fault.kind == "orderly-failover" and config.replicas == 0:
        bound += config.ttl
    return bound


def failover_failures(report: Report, config: FailoverConfig) -> list[str]:
    """What the run did wrong for its mode; empty when it passed.

    Both modes promise fencing tokens that never repeat nor go backwards, and the fenced
    resource accepts no stale write. Mode 1 promises at most the limit of believers, also
    across failovers. Mode 0 promises the limit only outside failovers (a failover to a
    replica that missed a grant may grant a held slot again: its documented weakness), so
    its believers are checked in the stretches of the holders' faults only. Grants resume
    after each failover within ``recovery_bound``."""
    failures = []
    if report.repeated_tokens:
        failures.append(f"{report.repeated_tokens} fencing tokens granted to two owners")
    if report.backward_tokens:
        failures.append(f"{report.backward_tokens} fencing tokens below an earlier grant's")
    if report.stale_accepted:
        failures.append(f"{report.stale_accepted} stale writes accepted by the fenced resource")
    for kind, figures in report.by_kind.items():
        if config.replicas == 0 and kind in FAILOVER_KINDS:
            continue
        for key, most in figures.max_believers.items():
            if most > figures.limits[key]:
                failures.append(f"{most} believers of {key} (limit {figures.limits[key]}) during {kind}")
    for fault, first_grant in failover_recoveries(report):
        if first_grant > recovery_bound(fault, config):
            failures.append(f"grants resumed {first_grant:.2f} s after {fault.describe()}")
    return failures
