"""The fault campaign's checker on hand-made records (no services needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checker import (
    Fault,
    Hold,
    HolderLog,
    LoggedWrite,
    Report,
    Write,
    backward_tokens,
    check,
    max_believers,
    parse_records,
    repeated_tokens,
    token_regressions,
)
from tests.faults.failover import FailoverConfig, failover_failures


def hold(pid: int, fence: int, start: float, end: float, *, group: str = "solo", **kw: Any) -> Hold:
    return Hold(
        holder=f"h{pid}", hostname=f"host-{pid}", pid=pid, group=group, limit=1, fence=fence,
        t_req=kw.pop("t_req", start - 0.01), start=start, end=end, reason="done", **kw,
    )  # fmt: skip


def run(
    holds: list[Hold], faults: Sequence[Fault] = (), write_log: Sequence[LoggedWrite] = (), limit: int = 1
) -> Report:
    return check([HolderLog("all", holds=holds)], faults, write_log, {"solo": limit})


def test_holds_one_after_the_other_are_no_violation() -> None:
    report = run([hold(1, 1, 0.0, 1.0), hold(2, 2, 1.0, 2.0), hold(3, 3, 2.5, 3.0)])
    assert report.violations == []
    assert report.groups["solo"].max_acting == 1
    assert report.token_regressions == 0


def test_two_believers_over_the_limit_are_unexplained() -> None:
    report = run([hold(1, 1, 0.0, 1.0), hold(2, 2, 0.9, 2.0)])
    assert [(v.cause, v.start, v.end) for v in report.violations] == [("unexplained", 0.9, 1.0)]
    assert report.groups["solo"].max_believers == 2


def test_the_limit_counts_per_group_limit() -> None:
    report = run([hold(1, 1, 0.0, 1.0), hold(2, 2, 0.5, 2.0)], limit=2)
    assert report.violations == []


def test_a_late_write_after_a_sigstop_is_a_sigstop_violation() -> None:
    # pid 1 checked at 0.5, was stopped 0.55..3.0, wrote at 3.0 (refused): its belief
    # ended at 1.4 (valid_until); pid 2 took over at 2.0.
    paused = hold(1, 1, 0.0, 1.4, checks=[0.0, 0.5], writes=[Write(1, 1, True, 0.0, 0.01)])
    paused.writes.append(Write(2, 1, False, 3.0, 3.01))
    successor = hold(2, 2, 2.0, 4.0, writes=[Write(1, 2, True, 2.0, 2.01)])
    stop = Fault("sigstop", 0.55, 3.0, "host-1", 1)
    report = run([paused, successor], [stop])
    assert [(v.cause, v.start, v.end) for v in report.violations] == [("sigstop", 2.0, 3.01)]
    assert report.groups["solo"].max_outside_sigstop == 1
    assert report.late_writes == 1
    assert report.late_accepted == 0
    # Without the SIGSTOP the same records are a pause of the holder, and count.
    report = run([paused, successor])
    assert [v.cause for v in report.violations] == ["pause"]
    assert report.groups["solo"].max_outside_sigstop == 2
    # A SIGSTOP of another process explains nothing.
    report = run([paused, successor], [Fault("sigstop", 0.55, 3.0, "host-9", 9)])
    assert [v.cause for v in report.violations] == ["pause"]


def test_a_stale_write_accepted_after_a_newer_one_is_counted() -> None:
    log = [
        LoggedWrite(1, "solo", 5, True, "a", 1, 1),
        LoggedWrite(2, "solo", 7, True, "b", 2, 1),
        LoggedWrite(3, "solo", 6, False, "a", 1, 2),
        LoggedWrite(4, "solo", 6, True, "a", 1, 3),  # what a broken resource would do
    ]
    report = run([], write_log=log)
    assert (report.writes_accepted, report.stale_refused, report.stale_accepted) == (3, 1, 1)


def test_a_refused_write_inside_its_lease_is_counted() -> None:
    report = run([hold(1, 3, 0.0, 1.0, writes=[Write(1, 3, False, 0.5, 0.51)])])
    assert report.in_lease_refused == 1


def test_a_write_its_own_lost_lease_refused_is_not_refused_inside_its_lease() -> None:
    lost = Write(1, 3, False, 0.5, 0.51, refused="lease lost")
    assert run([hold(1, 3, 0.0, 1.0, writes=[lost])]).in_lease_refused == 0
    older = Write(1, 3, False, 0.5, 0.51, refused="older token")
    assert run([hold(1, 3, 0.0, 1.0, writes=[older])]).in_lease_refused == 1


def test_a_token_not_above_an_earlier_grant_is_a_regression() -> None:
    first, second = hold(1, 10, 0.0, 1.0), hold(2, 4, 2.0, 3.0, t_req=1.5)
    assert token_regressions([first, second]) == [(first, second)]
    # Asked before the other's acquire returned: the order of the grants is unknown.
    overlapping_request = hold(2, 4, 2.0, 3.0, t_req=-0.5)
    assert token_regressions([first, overlapping_request]) == []


def test_grants_inside_the_restart_grace_are_counted() -> None:
    restart = Fault("restart", 10.0, 11.0, detail={"exited": 10.1, "spawned": 10.8})
    holds = [hold(1, 1, 9.0, 9.5), hold(2, 2, 11.5, 12.0), hold(3, 3, 12.5, 13.0)]
    report = check([HolderLog("all", holds=holds)], [restart], [], {"solo": 1}, restart_grace=1.5)
    assert report.grants_in_grace == 1  # 11.5 < 10.8 + 1.5


def test_records_of_a_killed_holder_end_at_the_kill(tmp_path: Path) -> None:
    lines = [
        {"ev": "ready", "hostname": "faults-host-0", "pid": 42, "t": 0.0},
        {"ev": "start", "group": "solo", "limit": 1, "fence": 7, "t_req": 0.1, "t": 0.2, "vu": 1.6},
        {"ev": "check", "t": 0.2, "vu": 1.6, "step": 0.0},
        {"ev": "write", "seq": 1, "fence": 7, "accepted": True, "t": 0.2, "done": 0.21},
        {"ev": "end", "t": 0.9, "reason": "done", "vu": 1.6, "group": "solo"},
        {"ev": "start", "group": "solo", "limit": 1, "fence": 9, "t_req": 1.0, "t": 1.1, "vu": 2.5},
    ]
    path = tmp_path / "h0-001.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"ev": "che')  # cut by the kill
    log = parse_records(path, kills={"h0-001.jsonl": 1.7})
    assert [(h.fence, h.start, h.end, h.reason) for h in log.holds] == [
        (7, 0.2, 0.9, "done"),
        (9, 1.1, 1.7, "killed"),
    ]
    assert log.holds[0].writes == [Write(1, 7, True, 0.2, 0.21)]
    assert log.hostname == "faults-host-0"


def test_one_token_granted_to_two_owners_is_a_repeated_token_whatever_the_order() -> None:
    a = hold(1, 7, 0.0, 1.0, owner="a" * 32)
    b = hold(2, 7, 0.5, 2.0, owner="b" * 32, t_req=-1.0)  # asked before a's grant: order unknown
    c = hold(3, 8, 2.5, 3.0, owner="c" * 32)
    assert repeated_tokens([b, c, a]) == [(a, b)]
    report = run([a, b, c])
    assert (report.repeated_tokens, report.backward_tokens) == (1, 0)
    # The pair is also a regression for the old figure only when the order is known.
    assert report.token_regressions == 0


def test_a_smaller_token_after_a_known_earlier_grant_is_backward_an_equal_one_is_not() -> None:
    first = hold(1, 10, 0.0, 1.0, owner="a")
    smaller = hold(2, 9, 2.0, 3.0, t_req=1.5, owner="b")
    equal = hold(3, 10, 3.5, 4.0, t_req=3.2, owner="c")
    assert backward_tokens([first, smaller, equal]) == [(first, smaller)]
    report = run([first, smaller, equal])
    assert (report.backward_tokens, report.repeated_tokens, report.token_regressions) == (1, 1, 2)
    # A smaller token whose call overlapped the larger grant's: the order is unknown.
    assert backward_tokens([first, hold(2, 9, 2.0, 3.0, t_req=-0.5, owner="b")]) == []


def test_an_equal_token_accepted_from_another_owner_is_a_stale_write() -> None:
    log = [
        LoggedWrite(1, "solo", 5, True, "a", 1, 1, owner="A"),
        LoggedWrite(2, "solo", 5, True, "a", 1, 2, owner="A"),  # the holder's own second write
        LoggedWrite(3, "solo", 5, True, "b", 2, 1, owner="B"),  # same token, another owner
        LoggedWrite(4, "solo", 5, False, "a", 1, 3, owner="A"),
        LoggedWrite(5, "solo", 6, True, "a", 1, 4, owner="C"),
    ]
    report = run([], write_log=log)
    assert (report.writes_accepted, report.stale_accepted, report.stale_refused) == (4, 1, 1)


def test_max_believers_counts_within_the_window_only() -> None:
    holds = [hold(1, 1, 0.0, 2.0), hold(2, 2, 1.0, 3.0), hold(3, 3, 2.5, 4.0)]
    assert max_believers(holds, float("-inf"), float("inf")) == 2
    assert max_believers(holds, 2.0, 2.4) == 1  # 1 ended at 2.0 exactly: no overlap
    assert max_believers(holds, 2.6, 10.0) == 2


def test_figures_per_kind_of_fault_cover_the_stretch_to_the_next_fault() -> None:
    kill = Fault("primary-kill", 10.0, 12.0, detail={"promoted": 12.0})
    failover = Fault("orderly-failover", 20.0, 20.5)
    a = hold(1, 100, 5.0, 10.5, owner="a", writes=[Write(1, 100, True, 5.0, 5.01)])
    b = hold(2, 100, 12.5, 14.0, owner="b", t_req=11.0, writes=[Write(1, 100, True, 12.5, 12.51)])
    c = hold(3, 99, 20.2, 21.0, owner="c", t_req=14.5, writes=[Write(1, 99, False, 20.2, 20.21)])
    d = hold(4, 200, 20.1, 22.0, owner="d", t_req=19.0)
    log = [
        LoggedWrite(1, "solo", 100, True, "host-1", 1, 1, owner="a"),
        LoggedWrite(2, "solo", 100, True, "host-2", 2, 1, owner="b"),  # stale: same token
        LoggedWrite(3, "solo", 99, False, "host-3", 3, 1, owner="c"),  # stale, refused
    ]
    report = check([HolderLog("all", holds=[a, b, c, d])], [kill, failover], log, {"solo": 1})
    none, killed, switched = (report.by_kind[k] for k in ("none", "primary-kill", "orderly-failover"))
    assert (none.faults, none.holds, none.max_believers) == (0, 1, {"solo": 1})
    assert (killed.faults, killed.holds, killed.max_believers) == (1, 1, {"solo": 1})
    assert (killed.repeated_tokens, killed.backward_tokens, killed.stale_accepted) == (1, 0, 1)
    assert killed.first_grants == [2.5]  # kill at 10.0 -> b granted at 12.5
    # c asked at 14.5, after b's grant (100, at 12.5), and got 99: backward. c and d
    # overlap (two believers of a limit-1 group after the failover).
    assert (switched.holds, switched.max_believers, switched.backward_tokens) == (2, {"solo": 2}, 1)
    assert (switched.stale_refused, switched.stale_accepted) == (1, 0)
    assert switched.first_grants == [pytest.approx(0.1)]
    assert "primary-kill" in report.kind_table()


def test_each_mode_is_judged_by_what_it_promises() -> None:
    # Two believers of a limit-1 group right after a primary kill, none elsewhere.
    kill = Fault("primary-kill", 10.0, 12.0, detail={"killed": 10.0, "failover": 2.0})
    stop = Fault("sigkill", 20.0, 20.0)
    holds = [
        hold(1, 100, 9.0, 13.0, owner="a"),
        hold(2, 101, 12.5, 14.0, owner="b", t_req=11.0),
        hold(3, 102, 21.0, 22.0, owner="c", t_req=20.5),
    ]
    report = check([HolderLog("all", holds=holds)], [kill, stop], [], {"solo": 1})
    assert failover_failures(report, FailoverConfig(replicas=0)) == []
    assert failover_failures(report, FailoverConfig(replicas=1)) == [
        "2 believers of solo (limit 1) during primary-kill"
    ]
    # Outside a failover the limit holds in mode 0 too; tokens and recovery in both.
    late = [*holds, hold(4, 103, 21.5, 22.5, owner="d", t_req=21.2)]
    report = check([HolderLog("all", holds=late)], [kill, stop], [], {"solo": 1})
    assert failover_failures(report, FailoverConfig(replicas=0)) == [
        "2 believers of solo (limit 1) during sigkill"
    ]
    repeated = [*holds, hold(4, 101, 30.0, 31.0, owner="d", t_req=29.0)]
    report = check([HolderLog("all", holds=repeated)], [kill, stop], [], {"solo": 1})
    assert failover_failures(report, FailoverConfig(replicas=0)) == [
        "1 fencing tokens granted to two owners",
        "1 fencing tokens below an earlier grant's",
    ]
    slow = [hold(1, 100, 9.0, 9.5, owner="a"), hold(2, 101, 16.5, 17.0, owner="b", t_req=11.0)]
    report = check([HolderLog("all", holds=slow)], [kill], [], {"solo": 1})
    assert [f.split(" after ")[0] for f in failover_failures(report, FailoverConfig())] == [
        "grants resumed 6.50 s"
    ]
