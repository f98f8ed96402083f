"""The fault campaign's checker: from the holders' records, the faults and the fenced
resource's write log, how many believed they held a slot at once, and why.

Each hold has two intervals on the ``time.monotonic()`` clock:

- *believed*: from the acquire's return to the end of belief (release, the first check
  that found the lease lost or past ``valid_until``, or ``valid_until`` itself, whichever
  is earliest; for a SIGKILLed holder that was still holding, the kill);
- *acting*: the believed interval stretched to the end of the hold's last write. A write
  answered after the end of belief is *late*: the holder checked the lease, was paused
  (a SIGSTOP, or the OS), and wrote after its lease had run out.

A *violation* is a maximal stretch of time in which more than the group's limit of holds
were acting. Its cause:

- ``sigstop``: within the limit of believers; every late actor was SIGSTOPped between its
  last check and its late write. Allowed: the fenced resource must refuse the stale
  writes (``stale_accepted`` must be 0);
- ``pause``: as ``sigstop``, but some late actor was not SIGSTOPped (descheduled by the
  OS): the same physics, reported apart since no fault caused it;
- ``unexplained``: more than the limit *believed* at once: the throttle gave a slot away
  while its holder could still rightly believe in it. Must never happen.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Causes of violations, worst last.
CAUSES = ("sigstop", "pause", "unexplained")


#: Refusals of ``task_workflow.fencing`` that sent nothing: the holder's own lease said
#: no (a renewal had found it lost) before the row was asked.
LOCAL_REFUSALS = ("lease lost", "lease released")


@dataclass
class Write:
    seq: int
    fence: int
    accepted: bool
    sent: float
    done: float
    #: Why it was refused ("" when accepted, or in records without it).
    refused: str = ""


@dataclass
class Hold:
    """One grant, as its holder saw it."""

    holder: str  # the records file's name
    hostname: str
    pid: int
    group: str
    limit: int
    fence: int
    t_req: float
    start: float
    end: float
    reason: str
    checks: list[float] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    owner: str = ""  # the lease's owner token

    @property
    def acting_end(self) -> float:
        return max([self.end, *(w.done for w in self.writes)])

    @property
    def late_writes(self) -> list[Write]:
        return [w for w in self.writes if w.done > self.end]

    def describe(self) -> str:
        return (
            f"{self.hostname} pid {self.pid} owner {self.owner[:8]} fence {self.fence}:"
            f" {self.start:.3f}..{self.end:.3f}"
            f" (acting to {self.acting_end:.3f}, {self.reason}, {len(self.writes)} writes)"
        )


@dataclass(frozen=True)
class Fault:
    """A fault the campaign injected, ``start``..``end`` on the monotonic clock."""

    kind: str
    start: float
    end: float
    hostname: str | None = None
    pid: int | None = None
    detail: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def describe(self) -> str:
        where = " ".join(filter(None, [self.hostname, f"pid {self.pid}" if self.pid else None]))
        return f"{self.kind} {where} {self.start:.3f}..{self.end:.3f} {self.detail or ''}".rstrip()


@dataclass(frozen=True)
class LoggedWrite:
    """A row of the fenced resource's write log, in the order the resource saw them."""

    id: int
    name: str
    token: int
    accepted: bool
    hostname: str
    pid: int
    seq: int
    #: The writer's lease owner token ("" in logs without it).
    owner: str = ""
    #: Why the fenced write was refused ("" when accepted): ``FencedWriteRefused.reason``.
    refused: str = ""


@dataclass
class HolderLog:
    """What one records file says."""

    holder: str
    hostname: str | None = None
    pid: int | None = None
    holds: list[Hold] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)


def parse_records(path: Path, kills: dict[str, float]) -> HolderLog:
    """Read a holder's records; a hold left open ends at the holder's kill (``kills``:
    records file name -> SIGKILL time; pids may be reused), else at its last recorded
    moment."""
    log = HolderLog(holder=path.name)
    current: Hold | None = None
    last_t = 0.0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # only a line cut by a full disk could be partial; skip it
        ev = rec["ev"]
        log.events[ev] += 1
        last_t = max(last_t, rec.get("done", rec.get("t", last_t)))
        if ev == "ready":
            log.hostname, log.pid = rec["hostname"], rec["pid"]
        elif ev == "start":
            current = Hold(
                holder=log.holder, hostname=log.hostname or "?", pid=log.pid or 0, group=rec["group"],
                limit=rec["limit"], fence=rec["fence"], t_req=rec["t_req"], start=rec["t"], end=rec["t"],
                reason="open", owner=rec.get("owner", ""),
            )  # fmt: skip
        elif current is not None and ev == "check":
            current.checks.append(rec["t"])
        elif current is not None and ev == "write":
            current.writes.append(
                Write(
                    rec["seq"], rec["fence"], rec["accepted"], rec["t"], rec["done"], rec.get("refused", "")
                )
            )
        elif current is not None and ev == "end":
            current.end, current.reason = rec["t"], rec["reason"]
            log.holds.append(current)
            current = None
    if current is not None:  # SIGKILLed (or crashed) while holding
        killed = kills.get(path.name)
        current.end = killed if killed is not None else last_t
        current.reason = "killed" if killed is not None else "vanished"
        log.holds.append(current)
    return log


@dataclass
class Violation:
    group: str
    limit: int
    start: float
    end: float
    peak: int
    cause: str
    holds: list[Hold]
    faults: list[Fault]

    def describe(self) -> str:
        lines = [
            f"{self.cause} violation of {self.group} (limit {self.limit}): {self.peak} acting"
            f" in {self.start:.3f}..{self.end:.3f}"
        ]
        lines += [f"  hold  {h.describe()}" for h in sorted(self.holds, key=lambda h: h.start)]
        lines += [f"  fault {f.describe()}" for f in self.faults]
        return "\n".join(lines)


@dataclass
class GroupFigures:
    key: str
    limit: int
    holds: int = 0
    max_acting: int = 0
    max_believers: int = 0
    #: Believers plus late actors that no SIGSTOP explains.
    max_outside_sigstop: int = 0
    violations: Counter[str] = field(default_factory=Counter)


@dataclass
class Report:
    """The campaign's figures (``table()``) and the evidence behind failures."""

    wall_seconds: float = 0.0
    holds: int = 0
    hostnames: dict[str, int] = field(default_factory=dict)  # hostname -> holds
    faults: Counter[str] = field(default_factory=Counter)
    #: The faults themselves, in the order they were injected.
    injected: list[Fault] = field(default_factory=list)
    groups: dict[str, GroupFigures] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    writes_accepted: int = 0
    stale_refused: int = 0
    stale_accepted: int = 0
    late_writes: int = 0
    late_accepted: int = 0
    #: Refused by the row although the writer still rightly believed it held the slot (a
    #: refusal of the holder's own lost lease, ``LOCAL_REFUSALS``, is none: belief ended).
    in_lease_refused: int = 0
    #: A grant whose fencing token is not above that of a grant known to come first.
    token_regressions: int = 0
    #: Pairs of grants of one group with the same fencing token and different owners.
    repeated_tokens: int = 0
    #: Grants whose fencing token is below that of a grant known to come first.
    backward_tokens: int = 0
    #: The figures of the stretch each kind of fault influenced (``kind_figures``), and
    #: "none" for the time before the first fault.
    by_kind: dict[str, KindFigures] = field(default_factory=dict)
    #: Grants that started within the restart grace after a Redis restart.
    grants_in_grace: int = 0
    #: Per Redis restart: seconds from spawning the new server to the first grant.
    first_grant_after_restart: list[float] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    #: Seconds from each fault's end until the next hold started (liveness).
    recoveries: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def violations_by_cause(self) -> Counter[str]:
        return Counter(v.cause for v in self.violations)

    @property
    def unexplained(self) -> int:
        return self.violations_by_cause["unexplained"]

    def table(self) -> str:
        """The figures as an aligned two-column table."""
        causes = self.violations_by_cause
        rows: list[tuple[str, str]] = [
            ("wall time", f"{self.wall_seconds:.1f} s"),
            ("holds", str(self.holds)),
            ("holds by host", ", ".join(f"{h} {n}" for h, n in sorted(self.hostnames.items()))),
            ("faults", ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items())) or "none"),
        ]
        for g in self.groups.values():
            rows.append(
                (
                    f"group {g.key} (limit {g.limit})",
                    f"{g.holds} holds; max acting {g.max_acting}, max believers {g.max_believers},"
                    f" max outside SIGSTOP {g.max_outside_sigstop}",
                )
            )
        rows += [
            ("violations", ", ".join(f"{c} {causes[c]}" for c in CAUSES)),
            ("writes accepted", str(self.writes_accepted)),
            ("stale writes refused", str(self.stale_refused)),
            ("stale writes accepted", str(self.stale_accepted)),
            ("late writes (accepted)", f"{self.late_writes} ({self.late_accepted})"),
            ("in-lease writes refused", str(self.in_lease_refused)),
            ("fencing token regressions", str(self.token_regressions)),
            ("repeated / backward tokens", f"{self.repeated_tokens} / {self.backward_tokens}"),
            ("grants inside restart grace", str(self.grants_in_grace)),
            ("first grant after a restart", self._first_grants()),
            ("timeouts / unavailable / errors", "{} / {} / {}".format(*self._event_counts())),
            ("recovery after a fault", self._recovery()),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def _event_counts(self) -> tuple[int, int, int]:
        return self.events["timeout"], self.events["unavailable"], self.events["error"]

    def _first_grants(self) -> str:
        if not self.first_grant_after_restart:
            return "-"
        return ", ".join(f"{s:.2f}" for s in self.first_grant_after_restart) + " s after the spawn"

    def _recovery(self) -> str:
        if not self.recoveries:
            return "-"
        ordered = sorted(self.recoveries)
        return f"median {ordered[len(ordered) // 2]:.2f} s, max {ordered[-1]:.2f} s"

    def as_dict(self) -> dict[str, Any]:
        return {
            "holds": self.holds,
            "faults": dict(self.faults),
            "violations": dict(self.violations_by_cause),
            "groups": {k: vars(g) | {"violations": dict(g.violations)} for k, g in self.groups.items()},
            "writes_accepted": self.writes_accepted,
            "stale_refused": self.stale_refused,
            "stale_accepted": self.stale_accepted,
            "late_writes": self.late_writes,
            "in_lease_refused": self.in_lease_refused,
            "token_regressions": self.token_regressions,
            "repeated_tokens": self.repeated_tokens,
            "backward_tokens": self.backward_tokens,
            "grants_in_grace": self.grants_in_grace,
            "by_kind": {kind: vars(k) for kind, k in self.by_kind.items()},
        }

    def kind_table(self) -> str:
        """The figures per kind of fault, one line each (``kind_figures``)."""
        lines = []
        for kind, k in sorted(self.by_kind.items()):
            believers = ", ".join(f"{g} {n}/{k.limits[g]}" for g, n in sorted(k.max_believers.items()))
            recovery = "-"
            if k.first_grants:
                ordered = sorted(k.first_grants)
                recovery = f"median {ordered[len(ordered) // 2]:.2f} s, max {ordered[-1]:.2f} s"
            lines.append(
                f"{kind:<17} faults {k.faults}, holds {k.holds}; max believers/limit {believers};"
                f" repeated tokens {k.repeated_tokens}, backward {k.backward_tokens};"
                f" stale writes accepted {k.stale_accepted}, refused {k.stale_refused};"
                f" fault -> first grant {recovery}"
            )
        return "\n".join(lines)


@dataclass
class KindFigures:
    """What happened while one kind of fault was in effect: from each fault of the kind
    to the next fault (or the end of the run), where its consequences (a failover, the
    recovery after it) play out."""

    kind: str
    limits: dict[str, int]
    faults: int = 0
    holds: int = 0
    #: Group -> the most holds believing at once.
    max_believers: dict[str, int] = field(default_factory=dict)
    repeated_tokens: int = 0
    backward_tokens: int = 0
    stale_accepted: int = 0
    stale_refused: int = 0
    #: Per fault: seconds from its start (the failover command), or its kill (``detail
    #: ["killed"]``) if it had one, to the first grant after that.
    first_grants: list[float] = field(default_factory=list)


# -- the analysis -------------------------------------------------------------------


def late_cause(hold: Hold, sigstops: Sequence[Fault]) -> str | None:
    """``None`` if ``hold`` never acted late; else ``sigstop`` when a SIGSTOP of its process
    overlaps the stretch from its last check before its first late write to that write's
    answer, ``pause`` otherwise."""
    late = hold.late_writes
    if not late:
        return None
    first = late[0]
    checked = max((c for c in hold.checks if c <= first.sent), default=hold.start)
    for fault in sigstops:
        if fault.pid == hold.pid and fault.start < first.done and fault.end > checked:
            return "sigstop"
    return "pause"


def sweep_group(
    holds: Sequence[Hold], limit: int, faults: Sequence[Fault]
) -> tuple[GroupFigures, list[Violation]]:
    """Acting and believing holds at every moment of one group; the violations."""
    figures = GroupFigures(key=holds[0].group if holds else "?", limit=limit, holds=len(holds))
    sigstops = [f for f in faults if f.kind.startswith("sigstop")]
    causes = {id(h): late_cause(h, sigstops) for h in holds}
    # (time, order, kind, hold): at one instant ends (order 0) come before starts (1): a
    # hold that ends when another starts does not overlap it.
    events: list[tuple[float, int, str, int]] = []
    for i, h in enumerate(holds):
        if h.acting_end > h.start:
            events += [(h.start, 1, "act", i), (h.acting_end, 0, "act", i)]
        if h.end > h.start:
            events += [(h.start, 1, "believe", i), (h.end, 0, "believe", i)]
    events.sort()
    acting: set[int] = set()
    believing: set[int] = set()
    violations: list[Violation] = []
    current: Violation | None = None
    for n, (t, order, kind, i) in enumerate(events):
        target = acting if kind == "act" else believing
        if order == 1:
            target.add(i)
        else:
            target.discard(i)
        if n + 1 < len(events) and events[n + 1][0] == t:
            continue  # finish every event of this instant first
        next_t = events[n + 1][0] if n + 1 < len(events) else t
        figures.max_acting = max(figures.max_acting, len(acting))
        figures.max_believers = max(figures.max_believers, len(believing))
        late = acting - believing
        unpaused = [j for j in late if causes[id(holds[j])] != "sigstop"]
        figures.max_outside_sigstop = max(figures.max_outside_sigstop, len(believing) + len(unpaused))
        if len(acting) <= limit or next_t <= t:
            current = None
            continue
        if len(believing) > limit:
            cause = "unexplained"
        elif unpaused:
            cause = "pause"
        else:
            cause = "sigstop"
        if current is None or current.end != t:
            current = Violation(figures.key, limit, t, next_t, len(acting), cause, [], [])
            violations.append(current)
        current.end = next_t
        current.peak = max(current.peak, len(acting))
        if CAUSES.index(cause) > CAUSES.index(current.cause):
            current.cause = cause
        for j in acting:
            if holds[j] not in current.holds:
                current.holds.append(holds[j])
    for v in violations:
        figures.violations[v.cause] += 1
        v.faults = [f for f in faults if f.start < v.end + 1.0 and f.end > v.start - 5.0]
    return figures, violations


def token_regressions(holds: Sequence[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs (earlier, later) of one group where ``later`` asked for its slot only after
    ``earlier``'s acquire had returned, yet did not get a larger fencing token."""
    by_start = sorted(holds, key=lambda h: h.start)
    found: list[tuple[Hold, Hold]] = []
    best: Hold | None = None
    i = 0
    for later in sorted(holds, key=lambda h: h.t_req):
        while i < len(by_start) and by_start[i].start < later.t_req:
            if best is None or by_start[i].fence > best.fence:
                best = by_start[i]
            i += 1
        if best is not None and best.fence >= later.fence:
            found.append((best, later))
    return found


def backward_tokens(holds: Sequence[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs (earlier, later) of one group where ``later`` asked for its slot only after
    ``earlier``'s acquire had returned (so the store granted ``earlier`` first, on the
    one clock every holder reads), yet got a smaller fencing token: a token that went
    backwards. (Two grants whose calls overlap have no known order: not compared.)"""
    return [(earlier, later) for earlier, later in token_regressions(holds) if earlier.fence > later.fence]


def repeated_tokens(holds: Sequence[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs of holds of one group with the same fencing token and different owners (the
    first granted, then each other one): one token granted twice, whatever the order."""
    by_fence: dict[int, list[Hold]] = defaultdict(list)
    for hold in holds:
        by_fence[hold.fence].append(hold)
    found: list[tuple[Hold, Hold]] = []
    for same in by_fence.values():
        first, *others = sorted(same, key=lambda h: h.start)
        found += [
            (first, other) for other in others if (other.owner, other.holder) != (first.owner, first.holder)
        ]
    return found


def max_believers(holds: Sequence[Hold], since: float, until: float) -> int:
    """The most ``holds`` believing at once at some moment of ``since``..``until``."""
    events: list[tuple[float, int]] = []
    for h in holds:
        start, end = max(h.start, since), min(h.end, until)
        if end > start:
            events += [(start, 1), (end, -1)]
    events.sort()  # at one instant an end (-1) comes before a start: no overlap
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def kind_figures(
    holds_by_group: dict[str, list[Hold]],
    faults: Sequence[Fault],
    write_times: dict[tuple[str, int, int], float],
    write_log: Sequence[LoggedWrite],
    limits: dict[str, int],
) -> dict[str, KindFigures]:
    """The figures of each kind of fault over the stretches it influenced: from each
    fault's start to the next fault's (the last one's to the end of the run); "none" is
    the time before the first fault. A repeated or backward token counts where its later
    grant started; a stale write where it was answered (``write_times``: (hostname, pid,
    seq) of a write -> when its answer came)."""
    ordered = sorted(faults, key=lambda f: f.start)
    starts = [f.start for f in ordered]
    first = starts[0] if starts else float("inf")
    windows: list[tuple[str, float, float, Fault | None]] = [("none", float("-inf"), first, None)]
    for i, injected in enumerate(ordered):
        until = starts[i + 1] if i + 1 < len(starts) else float("inf")
        windows.append((injected.kind, injected.start, until, injected))
    figures: dict[str, KindFigures] = {}

    def kind_at(t: float) -> KindFigures:
        return figures[next(kind for kind, since, until, _ in windows if since <= t < until)]

    all_holds = sorted((h for group in holds_by_group.values() for h in group), key=lambda h: h.start)
    for kind, since, until, fault in windows:
        k = figures.setdefault(kind, KindFigures(kind, dict(limits)))
        k.faults += kind != "none"
        for key in limits:
            n = max_believers(holds_by_group.get(key, []), since, until)
            k.max_believers[key] = max(k.max_believers.get(key, 0), n)
        if fault is not None:
            # From the kill when the fault had one (a lagging failover pauses first).
            origin = fault.detail.get("killed", since)
            after = [h.start for h in all_holds if h.start > origin + ANSWER_SLACK]
            if after:
                k.first_grants.append(after[0] - origin)
    for hold in all_holds:
        kind_at(hold.start).holds += 1
    for holds in holds_by_group.values():
        for _, later in repeated_tokens(holds):
            kind_at(later.start).repeated_tokens += 1
        for _, later in backward_tokens(holds):
            kind_at(later.start).backward_tokens += 1
    for row, stale in _judge_writes(write_log):
        done = write_times.get((row.hostname, row.pid, row.seq))
        if done is None or not stale:
            continue
        k = kind_at(done)
        if row.accepted:
            k.stale_accepted += 1
        else:
            k.stale_refused += 1
    return figures


def _judge_writes(write_log: Sequence[LoggedWrite]) -> Iterator[tuple[LoggedWrite, bool]]:
    """Each row of the write log with whether it was stale when the resource saw it: its
    token below the newest accepted one, or equal to it from another owner (a token that
    two owners hold fences neither off from the other)."""
    newest: dict[str, LoggedWrite] = {}
    for row in sorted(write_log, key=lambda r: r.id):
        top = newest.get(row.name)
        stale = top is not None and (
            row.token < top.token or (row.token == top.token and row.owner != top.owner)
        )
        yield row, stale
        if row.accepted and (top is None or row.token >= top.token):
            newest[row.name] = row


def check(
    logs: Iterable[HolderLog],
    faults: Sequence[Fault],
    write_log: Sequence[LoggedWrite],
    limits: dict[str, int],
    *,
    restart_grace: float = 0.0,
) -> Report:
    """Every figure of the report, from everything the campaign collected."""
    report = Report()
    holds_by_group: dict[str, list[Hold]] = defaultdict(list)
    hostnames: Counter[str] = Counter()
    for log in logs:
        report.events.update(log.events)
        for hold in log.holds:
            holds_by_group[hold.group].append(hold)
            hostnames[hold.hostname] += 1
    report.hostnames = dict(hostnames)
    report.holds = sum(len(h) for h in holds_by_group.values())
    report.faults = Counter(f.kind for f in faults)
    report.injected = list(faults)
    for key, limit in limits.items():
        figures, violations = sweep_group(holds_by_group.get(key, []), limit, faults)
        figures.key = key
        report.groups[key] = figures
        report.violations += violations
        for earlier, later in token_regressions(holds_by_group.get(key, [])):
            report.token_regressions += 1
            if report.token_regressions <= 5:
                report.notes.append(
                    f"token regression in {key}: {earlier.describe()} then {later.describe()}"
                )
        for first, other in repeated_tokens(holds_by_group.get(key, [])):
            report.repeated_tokens += 1
            if report.repeated_tokens <= 5:
                report.notes.append(
                    f"token granted twice in {key}: {first.describe()} and {other.describe()}"
                )
        report.backward_tokens += len(backward_tokens(holds_by_group.get(key, [])))
    _check_writes(report, holds_by_group, write_log)
    write_times = {
        (h.hostname, h.pid, w.seq): w.done
        for group in holds_by_group.values()
        for h in group
        for w in h.writes
    }
    report.by_kind = kind_figures(holds_by_group, faults, write_times, write_log, limits)
    _check_restarts(report, [h for group in holds_by_group.values() for h in group], faults, restart_grace)
    return report


#: Seconds a grant's answer may take to reach its holder over a healthy link.
ANSWER_SLACK = 0.05


def _check_restarts(report: Report, holds: Sequence[Hold], faults: Sequence[Fault], grace: float) -> None:
    """Grants of each restarted Redis before it had been up for ``grace`` seconds.

    A hold is a grant of the new server if it started after the old one had exited
    (``detail["exited"]``, plus the time an answer takes), unless its holder sat on the
    cut-off host and asked before that exit (an answer of the old server may have waited
    in the cut link). The new server was spawned at ``detail["spawned"]`` and came up
    after that: a grant before ``spawned + grace`` is inside the grace for sure.
    """
    for fault in (f for f in faults if f.kind in ("restart", "cut-restart")):
        exited = fault.detail.get("exited", fault.start)
        spawned = fault.detail.get("spawned", fault.end)
        new = [
            h
            for h in holds
            if h.start > exited + ANSWER_SLACK and (h.hostname != fault.hostname or h.t_req > exited)
        ]
        for hold in new:
            if hold.start < spawned + grace:
                report.grants_in_grace += 1
                if report.grants_in_grace <= 5:
                    report.notes.append(
                        f"granted {hold.start - spawned:.3f} s after Redis was spawned (grace {grace} s):"
                        f" {hold.group} {hold.describe()}"
                    )
        if new:
            report.first_grant_after_restart.append(min(h.start for h in new) - spawned)


def _check_writes(
    report: Report, holds_by_group: dict[str, list[Hold]], write_log: Sequence[LoggedWrite]
) -> None:
    for row, stale in _judge_writes(write_log):
        if row.accepted:
            report.writes_accepted += 1
            if stale:
                report.stale_accepted += 1
                if report.stale_accepted <= 5:
                    report.notes.append(f"stale write accepted: {row}")
        else:
            report.stale_refused += 1
    for holds in holds_by_group.values():
        for hold in holds:
            for write in hold.writes:
                if write.done > hold.end:
                    report.late_writes += 1
                    report.late_accepted += write.accepted
                elif not write.accepted and write.refused not in LOCAL_REFUSALS:
                    report.in_lease_refused += 1
                    if report.in_lease_refused <= 5:
                        report.notes.append(
                            f"write refused inside its lease: seq {write.seq} of {hold.describe()}"
                        )
