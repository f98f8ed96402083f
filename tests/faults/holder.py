"""One holder process of the fault campaign.

The campaign starts it in a host's namespace, in a UTS namespace of its own::

    ip netns exec twf-h0-<id> unshare --uts -- python -m tests.faults.holder \\
        --hostname faults-host-0 --records h0-0.jsonl --groups solo:1:fenced,pair:2 ...

It loops: pick a group, ``with throttle(key=group, concurrency=N, name="faults", ...) as
lease:`` hold it a random time, checking the lease every few tens of milliseconds
(``lease.lost``, ``lease.valid_until``) and believing it holds the slot until a check
fails (or the hold is over). In a ``fenced`` group each check is followed, after a short
pause, by a write to the fenced resource: a PostgreSQL row written with the public
``fenced_update(lease, ...)`` (``resource.py``), which accepts a write only if its token
is newer than the last accepted one, or the same token of the same owner. The holder
writes only while enough of its lease is left for the pause and the write (``Timing.reserve``),
so without a fault no write is late; it goes on believing, without writing, to the end
of its lease, so the throttle must not give the slot away before ``valid_until``. The
first write follows the acquire at once: a new holder fences off its predecessors before
a paused predecessor can wake up and write.

Every event is one JSON line appended to ``--records`` with a single ``os.write`` on an
``O_APPEND`` descriptor: no buffer to lose, so a SIGKILLed holder leaves whole lines and
an open interval (a ``start`` without ``end``) whose end the campaign knows (the kill).
Times are ``time.monotonic()``, one clock for every process of the machine. Lines
(``ev``):

- ``ready``: ``hostname``, ``pid`` (Django set up, about to acquire);
- ``start``: ``owner`` (the lease's owner token), ``group``, ``limit``, ``fence`` (its
  fencing token), ``t_req`` (acquire called), ``t`` (acquire returned), ``vu``
  (``valid_until``), ``until`` (when the holder means to release);
- ``check``: ``t``, ``vu``: the lease was valid at ``t``; the next check follows after
  ``step`` seconds, and with ``act`` a write before it (the campaign aims its SIGSTOP
  right after such a line);
- ``write``: ``seq``, ``fence``, ``accepted``, ``refused`` (the refusal's reason),
  ``t`` (sent), ``done`` (answered);
- ``end``: ``t`` the end of belief (``min(now, valid_until)``, not before the start),
  ``reason`` (done, lost, expired, stop, error), ``vu``;
- ``timeout``, ``unavailable``, ``error``: ``t``, ``detail``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tests.faults.netns import die_with_parent
from tests.faults.resource import fenced_write

#: The slot groups' name (``throttle(name=...)``); the key is the group's own name.
THROTTLE_NAME = "faults"


@dataclass(frozen=True)
class GroupSpec:
    """A slot group of the campaign: its key, its limit, and whether holders write to
    the fenced resource (only with limit 1: one stored token cannot fence N holders,
    whose legitimate writes interleave)."""

    key: str
    limit: int
    fenced: bool = False

    def __str__(self) -> str:
        return f"{self.key}:{self.limit}" + (":fenced" if self.fenced else "")

    @classmethod
    def parse(cls, text: str) -> GroupSpec:
        key, limit, *flags = text.split(":")
        spec = cls(key, int(limit), fenced="fenced" in flags)
        if spec.fenced and spec.limit != 1:
            raise ValueError(f"group {text}: only a group of limit 1 can be fenced by one token")
        return spec


@dataclass(frozen=True)
class Timing:
    """The holder's pace, in seconds."""

    ttl: float = 1.5
    wait: float = 3.0
    hold: tuple[float, float] = (0.2, 2.5)
    step: tuple[float, float] = (0.03, 0.12)
    #: Lease time that must be left beyond the next pause for the holder to write: the
    #: write after the pause must happen well inside the lease, or it would be a late
    #: (fenced) write without any fault.
    reserve: float = 0.5
    between: tuple[float, float] = (0.0, 0.05)


class Records:
    """Append-only JSON lines, one ``os.write`` each."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self, ev: str, **fields: Any) -> None:
        os.write(self.fd, (json.dumps({"ev": ev, **fields}, separators=(",", ":")) + "\n").encode())


class Holder:
    """The acquire / hold / write loop (Django must be set up)."""

    def __init__(self, records: Records, groups: Sequence[GroupSpec], timing: Timing, seed: int) -> None:
        from django.db import connection

        self.records = records
        self.groups = list(groups)
        self.timing = timing
        self.rng = random.Random(seed)
        self.connection = connection
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.stopping = False
        self.seq = 0

    def run(self) -> None:
        from task_workflow.throttle import ThrottleTimeout, ThrottleUnavailable

        self.records.log("ready", hostname=self.hostname, pid=self.pid, t=time.monotonic())
        while not self.stopping:
            group = self.rng.choice(self.groups)
            gate = throttle_for(group, self.timing)
            t_req = time.monotonic()
            try:
                with gate as lease:
                    self.hold(lease, group, t_req)
            except ThrottleTimeout as exc:
                self.records.log("timeout", t=time.monotonic(), group=group.key, detail=str(exc))
            except ThrottleUnavailable as exc:
                self.records.log("unavailable", t=time.monotonic(), group=group.key, detail=str(exc))
                time.sleep(self.rng.uniform(0.05, 0.2))  # the store is down: do not spin
            except Exception as exc:
                self.records.log("error", t=time.monotonic(), group=group.key, detail=repr(exc))
                self.connection.close()  # a broken database connection is not reused
                time.sleep(0.1)
            time.sleep(self.rng.uniform(*self.timing.between))

    def hold(self, lease: Any, group: GroupSpec, t_req: float) -> None:
        start = time.monotonic()
        fence = lease.fencing_token
        until = start + self.rng.uniform(*self.timing.hold)
        self.records.log(
            "start",
            owner=lease.token,
            group=group.key,
            limit=group.limit,
            fence=fence,
            t_req=t_req,
            t=start,
            vu=lease.valid_until,
            until=until,
        )
        reason = "error"
        step = 0.0  # the first write at once: fence off the predecessors
        try:
            while True:
                now = time.monotonic()
                valid_until = lease.valid_until
                if lease.lost:
                    reason = "lost"
                    break
                if now >= valid_until:
                    reason = "expired"
                    break
                if self.stopping or now >= until:
                    reason = "stop" if self.stopping else "done"
                    break
                act = group.fenced and valid_until - now >= step + self.timing.reserve
                self.records.log("check", t=now, vu=valid_until, step=round(step, 4), act=act)
                # A pause here (SIGSTOP, or the process descheduled) makes the next write
                # late: the fenced resource must refuse it if a newer holder has written.
                time.sleep(step)
                if act:
                    self.write(group, lease)
                step = self.rng.uniform(*self.timing.step)
        finally:
            end = max(start, min(time.monotonic(), lease.valid_until))
            self.records.log("end", t=end, reason=reason, vu=lease.valid_until, group=group.key)

    def write(self, group: GroupSpec, lease: Any) -> None:
        self.seq += 1
        sent = time.monotonic()
        refused = fenced_write(lease, group.key, hostname=self.hostname, pid=self.pid, seq=self.seq)
        done = time.monotonic()
        self.records.log(
            "write", seq=self.seq, fence=lease.fencing_token, accepted=not refused, refused=refused, t=sent,
            done=done,
        )  # fmt: skip


def throttle_for(group: GroupSpec, timing: Timing) -> Any:
    from task_workflow.throttle import throttle

    return throttle(
        key=group.key, concurrency=group.limit, name=THROTTLE_NAME, ttl=timing.ttl, wait=timing.wait
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A holder process of the throttle fault campaign.")
    parser.add_argument("--hostname", required=True, help="host name to set (in a UTS namespace of its own)")
    parser.add_argument("--records", required=True, help="JSON-lines file to append events to")
    parser.add_argument("--groups", required=True, help="comma-separated key:limit[:fenced]")
    parser.add_argument("--ttl", type=float, default=Timing.ttl)
    parser.add_argument("--wait", type=float, default=Timing.wait)
    parser.add_argument("--hold", type=float, nargs=2, default=Timing.hold, help="shortest and longest hold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()

    # Before Django and the throttle are imported: the throttle reads the host name once.
    if socket.gethostname() != args.hostname:
        socket.sethostname(args.hostname)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.faults.settings")
    import django

    django.setup()

    holder = Holder(
        Records(args.records),
        [GroupSpec.parse(text) for text in args.groups.split(",")],
        Timing(ttl=args.ttl, wait=args.wait, hold=tuple(args.hold)),
        args.seed,
    )

    def stop(signum: int, frame: Any) -> None:
        holder.stopping = True  # finish (end) the current hold, then exit

    signal.signal(signal.SIGTERM, stop)
    holder.run()


if __name__ == "__main__":
    main()
