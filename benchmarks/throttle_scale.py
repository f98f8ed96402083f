"""Throttle acquire+release latency on Redis with many live groups, and with many waiters in line.

How to run (needs ``redis-server`` on the PATH: the script starts its own, on a free port,
without persistence, and shuts it down at the end)::

    .venv/bin/python benchmarks/throttle_scale.py                  # 60 rounds x 100 ops per configuration
    .venv/bin/python benchmarks/throttle_scale.py --rounds 120 --waiters 0,1,10,100,1000,5000

**What is called.** ``RedisThrottleBackend.acquire()`` and ``.release()`` (public methods of
the backend ``get_backend()`` returns; one script call each) with the metadata
``throttle()`` stores. Not the ``throttle()`` context manager: its own Python work (token,
metadata, lease renewer bookkeeping, signals) does not depend on the number of groups or
waiters (``throttle_acquire.py`` measures it). ``restart_grace=0``: the server has just
started, and the restart grace is not what is measured.

**Why a server of its own.** Besides the client's time per call (``perf_counter_ns``), the
script reads the server's own time of every script call: ``SLOWLOG`` with
``slowlog-log-slower-than 0`` logs each command with its duration in microseconds. That is
what the Lua scripts cost, without the client's Python and most of this machine's
scheduling noise, and on a private server it holds this script's calls only. Each
configuration has a database, a key prefix and a client name of its own (the log names the
client of each command), so all of them stay set up side by side and their ops can be
interleaved one by one. Which logged command is an acquire and which a release is learnt
at the start, from one call of each (the script's SHA, or whatever the backend sends).

**Groups** (1, 100, 10,000, 100,000; ``--groups``): G groups of concurrency 2, each holding one live
lease (TTL one hour, longer than the run). One op: acquire the group's second slot
(granted), release it, on the groups in turn (op *k* on group *k* mod G), so with 10,000
groups every op touches a group untouched for 10,000 ops. Also, for per-entity keys: one
op in a group never used before (its counter starts, which reads ``INFO server``).

**Waiters** (0, 1, 10, 100, 1,000; ``--waiters``): one group of concurrency 1, one holder,
and W genuine waiters in its line, registered by the acquire script itself (a refused
acquire joins the line). FIFO means no newcomer takes a slot while anybody waits, so a
group with waiters grants slots by handoff. One op, per slot granted:

- W >= 1: the holder's ``release()`` (hands the slot to the head of the line and pushes its
  wake-up), then a new caller's ``acquire()`` (refused: it joins the back of the line), so
  the line stays W long and the woken waiter is the next holder. Its
  ``wait_for_release()`` runs afterwards, untimed (what the woken waiter does: its
  ``BLPOP`` returns the grant at once), which also checks that the handoff went to the
  waiter FIFO says;
- W = 0: ``release()``, then a new caller's ``acquire()`` (granted): the plain pair.

*Re-attempt*: the last waiter attempts again (refused, W - 1 ahead of it), what each waiter
costs the server about once a second while it waits.

**Rounds.** Before each round, untimed, every holder renews its lease and every waiter
attempts again (refused, it keeps its place), as real waiters do at least once a second: a
waiter silent for 3 s counts as dead. Then ``--ops`` ops of every configuration,
interleaved op by op (the configurations' order rotated every round), so drift and the
machine's other work hit all of them alike. Round 0 warms up and is discarded. Figures:
client median and p99 per op (and median per call), server median per call, over all ops.

**Verdicts.**

- Groups, client: the most groups / 1 group <= 1.20, client median (what a caller waits).
  An O(groups) step would multiply the cost about 100-fold from 100 to 10,000 groups.
- Groups, server: the most groups / a tenth of them (100,000 / 10,000) <= 1.10, server
  median. From 1 to about 10,000 groups the scripts' server time takes one step up (22 ->
  27 us on one machine, 1.22-1.36x on fast machines, 1.13-1.20x on slower ones), then stays
  flat (27 us at 100,000): each op then reads a group whose keys have left the CPU caches.
  That step is a constant of the memory, not growth with the number of groups, so it is
  printed without a goal (10,000 / 1 group, server); growth would go on past 10,000.
- Waiters: at most logarithmic growth, taken as ``cost(W) <= cost(1) * (1 + 0.05 *
  log2(W))``, 5 % of the base cost per doubling of the line: 10 waiters vs 1 (<= 1.17) and
  100 vs 1 (<= 1.33). The reference is one waiter, the shortest line: growth with the line
  is measured on the op that has one (a release that hands over, a refused acquire that
  joins). At W = 0 the op is another one, a plain release and a granted acquire, so 100
  vs 0 compares two paths, not two line lengths (log2(0) has no value either); it is
  printed beside the verdicts, without a goal. A cost linear in the line (e.g. a
  ``ZRANGE`` over it, ~0.1-0.2 us per member) would add 10-20 us at 100 waiters and 100-200
  us at 1,000 to scripts of 10-40 us, past either bound; sorted-set operations in
  O(log W) add well under a microsecond.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import harness

NAME = "throttle_scale"
#: Lease of the groups' resident holders: longer than any run.
LIVE_TTL = 3600.0
#: Lease of the measured acquires.
TTL = 30.0
GROUPS_RATIO_GOAL = 1.20
#: Server time of the most groups over a tenth of them, both far beyond the CPU caches.
GROUPS_STEP_GOAL = 1.10
LOG_C = 0.05
PREFIX = "bench:scale:"

Sample = tuple[int, ...]


def log_bound(waiters: int, ref: int) -> float:
    """``1 + c * log2(waiters / ref)`` (``ref`` 0 counted as 1)."""
    return 1 + LOG_C * math.log2(max(waiters, 1) / max(ref, 1))


# -- the server --------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[int]:
    """A ``redis-server`` of this script's own (no persistence), shut down afterwards; yields
    its port."""
    from tests.workers import RedisServer, free_port

    server = RedisServer(free_port(), name="bench-scale")
    server.start()
    try:
        yield server.port
    finally:
        server.stop()
        server.kill()


def wait_uptime(client: Any, seconds: int = 1) -> None:
    """Until the new server has been up ``seconds`` whole seconds: the scripts count one
    second less than ``uptime_in_seconds`` when they check the restart grace."""
    while int(client.info("server")["uptime_in_seconds"]) < seconds:
        time.sleep(0.05)  # polling a condition of the server; no event to wait for


def slowlog_on(client: Any) -> None:
    """Log every command with its duration (the private server only)."""
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 1_000_000)


def signature(entry: dict[str, Any]) -> tuple[bytes, bytes]:
    """A logged command's name and first argument (a script's SHA, a function's name)."""
    parts = bytes(entry["command"]).split(b" ", 2)
    return parts[0].upper(), parts[1] if len(parts) > 1 else b""


def client_name(entry: dict[str, Any]) -> str:
    name = entry.get("client_name") or b""
    return name.decode() if isinstance(name, bytes) else str(name)


def script_durations(
    client: Any, scripts: dict[tuple[bytes, bytes], str]
) -> dict[tuple[str, str], list[int]]:
    """Server microseconds of every acquire and release logged since the last reset, by
    (client name, ``"acquire"`` / ``"release"``); ``scripts``: command signature -> which
    (:func:`calibrate`). The log is reset."""
    found: dict[tuple[str, str], list[int]] = {}
    for entry in reversed(client.slowlog_get(-1)):  # newest first: put in call order
        script = scripts.get(signature(entry))
        if script is not None:
            found.setdefault((client_name(entry), script), []).append(int(entry["duration"]))
    client.slowlog_reset()
    return found


def calibrate(admin: Any, backend: Any, name: str) -> dict[tuple[bytes, bytes], str]:
    """The command one ``acquire()`` and one ``release()`` of ``backend`` (whose client is
    named ``name``) send, as the server logs them: signature -> ``"acquire"``/``"release"``."""
    from task_workflow.throttle import SlotGroup

    group = SlotGroup("bench.scale.calibrate", "c")
    token = secrets.token_hex(16)
    backend.acquire(group, secrets.token_hex(16), 1, TTL, metadata(group, 1))  # connections up
    backend.release(group, secrets.token_hex(16))
    found: dict[tuple[bytes, bytes], str] = {}
    for script, call in (
        ("acquire", lambda: backend.acquire(group, token, 2, TTL, metadata(group, 2))),
        ("release", lambda: backend.release(group, token)),
    ):
        admin.slowlog_reset()
        call()
        logged = [signature(e) for e in admin.slowlog_get(-1) if client_name(e) == name]
        if len(logged) != 1 or logged[0] in found:
            raise RuntimeError(f"one {script}() should log one command of its own, logged: {logged}")
        found[logged[0]] = script
    admin.slowlog_reset()
    return found


# -- configurations ---------------------------------------------------------------------


@dataclass
class Config:
    """One measured configuration and its samples over all rounds."""

    name: str
    kind: str  # "groups", "fresh", "waiters", "re-attempt"
    size: int
    #: Its client's name (how the server's log tells configurations apart).
    prefix: str
    #: The scripts one op calls, in order (a sample holds their client times in this order).
    calls: tuple[str, ...]
    #: Untimed, before each round: ``prepare(ops)``.
    prepare: Callable[[int], None]
    #: One timed op.
    step: Callable[[], Sample]
    samples: list[Sample] = field(default_factory=list)
    #: Server microseconds per call, by script.
    server: dict[str, list[int]] = field(default_factory=dict)

    @property
    def median_us(self) -> float:
        return statistics.median(sum(sample) for sample in self.samples) / 1000

    @property
    def p99_us(self) -> float:
        return harness.percentile([sum(sample) for sample in self.samples], 0.99) / 1000

    def client_us(self, script: str) -> float:
        position = self.calls.index(script)
        return statistics.median(sample[position] for sample in self.samples) / 1000

    def server_us(self, script: str | None = None) -> float:
        """Median server microseconds of one call of ``script``; of the op (the sum of its
        calls' medians) when ``None``."""
        if script is not None:
            values = self.server.get(script)
            return float(statistics.median(values)) if values else math.nan
        return sum(self.server_us(name) for name in self.calls)


def metadata(group: Any, concurrency: int) -> dict[str, Any]:
    """What ``throttle()`` stores with each lease."""
    return {
        "task_name": group.task_name,
        "key": group.key,
        "concurrency": concurrency,
        "task_id": "00000000-0000-0000-0000-000000000000",
        "hostname": "bench-host",
        "pid": os.getpid(),
        "ttl": TTL,
        "acquired_at": time.time(),
    }


clock = time.perf_counter_ns


def timed_acquire_release(backend: Any, group: Any, token: str, concurrency: int, meta: Any) -> Sample:
    """One acquire that must succeed, then its release: (acquire, release) seconds."""
    start = clock()
    result = backend.acquire(group, token, concurrency, TTL, meta)
    middle = clock()
    backend.release(group, token)
    sample = (middle - start, clock() - middle)
    assert result.acquired
    return sample


def groups_config(backend: Any, prefix: str, count: int) -> Config:
    """``count`` groups of concurrency 2, each holding one live lease; ops on them in turn."""
    from task_workflow.throttle import SlotGroup

    groups = [SlotGroup("bench.scale.groups", f"g{j}") for j in range(count)]
    meta = metadata(groups[0], 2)
    for group in groups:
        assert backend.acquire(group, secrets.token_hex(16), 2, LIVE_TTL, meta).acquired
    tokens: list[str] = []
    cursor = [0]

    def prepare(ops: int) -> None:
        tokens[:] = [secrets.token_hex(16) for _ in range(ops)]

    def step() -> Sample:
        group, token = groups[cursor[0] % count], tokens.pop()
        cursor[0] += 1
        return timed_acquire_release(backend, group, token, 2, meta)

    return Config(f"{count:,} groups", "groups", count, prefix, ("acquire", "release"), prepare, step)


def fresh_config(backend: Any, prefix: str) -> Config:
    """Every op in a group never used before (per-entity keys): the group's counter starts,
    which reads the server's uptime (``INFO server``) for the restart grace."""
    from task_workflow.throttle import SlotGroup

    meta = metadata(SlotGroup("bench.scale.fresh", "f"), 1)
    pending: list[tuple[Any, str]] = []
    used = [0]

    def prepare(ops: int) -> None:
        groups = [SlotGroup("bench.scale.fresh", f"f{used[0] + i}") for i in range(ops)]
        used[0] += ops
        for group in groups:
            assert group.digest  # computed once per SlotGroup, which throttle() keeps
        pending[:] = [(group, secrets.token_hex(16)) for group in groups]

    def step() -> Sample:
        group, token = pending.pop()
        return timed_acquire_release(backend, group, token, 1, meta)

    return Config("new group per op", "fresh", 0, prefix, ("acquire", "release"), prepare, step)


class StaleLine(Exception):
    """A line's state is not what the benchmark expects (its waiters fell silent for 3 s,
    under load): the round is discarded and the line set up again."""


class Line:
    """One group of concurrency 1, its holder and ``waiters`` waiters in line."""

    def __init__(self, backend: Any, client: Any, waiters: int) -> None:
        self.backend, self.client, self.waiters = backend, client, waiters
        self.rebuilds = 0
        self.tokens: list[str] = []
        self.setup()

    def setup(self) -> None:
        """A fresh group: its holder, then its waiters (the acquire script itself lines them
        up: each is refused and joins the back)."""
        from task_workflow.throttle import SlotGroup

        backend = self.backend
        self.group = SlotGroup("bench.scale.line", f"w{self.waiters}-{self.rebuilds}")
        self.meta = metadata(self.group, 1)
        self.holder = secrets.token_hex(16)
        assert backend.acquire(self.group, self.holder, 1, TTL, self.meta).acquired
        self.line: deque[str] = deque()
        for _ in range(self.waiters):
            token = secrets.token_hex(16)
            assert not backend.acquire(self.group, token, 1, TTL, self.meta).acquired
            self.line.append(token)

    def keep_alive(self) -> bool:
        """The holder renews; every waiter attempts again (refused, it keeps its place);
        ``False`` if the line is not as expected."""
        if not self.backend.renew(self.group, self.holder, "", TTL):
            return False
        for token in self.line:
            if self.backend.acquire(self.group, token, 1, TTL, self.meta).acquired:
                return False
        return self.backend.waiting(self.group) == list(self.line)

    def prepare(self, ops: int) -> None:
        """Before a round: keep the line alive, or set it up again when its waiters fell
        silent since the last round; the newcomers' tokens."""
        if not self.keep_alive():
            self.rebuilds += 1
            self.setup()
            if not self.keep_alive():
                raise RuntimeError(
                    f"{self.waiters} waiters: the line is not as expected right after its setup"
                )
        self.tokens[:] = [secrets.token_hex(16) for _ in range(ops)]

    def handoff(self) -> Sample:
        backend, group, token = self.backend, self.group, self.tokens.pop()
        start = clock()
        released = backend.release(group, self.holder)
        middle = clock()
        result = backend.acquire(group, token, 1, TTL, self.meta)
        sample = (middle - start, clock() - middle)
        if not released:
            raise StaleLine(f"{self.waiters} waiters: the holder's lease was gone")
        if not self.waiters:
            assert result.acquired
            self.holder = token
            return sample
        if result.acquired:
            raise StaleLine(f"{self.waiters} waiters: a newcomer took a slot while others waited")
        self.holder = self.line.popleft()
        self.line.append(token)
        # What the woken waiter does (its BLPOP returns at once): the handoff went to the
        # head of the line.
        woken = backend.wait_for_release(group, self.holder, 0.5)
        if woken is None or not woken.acquired:
            raise StaleLine(f"{self.waiters} waiters: the slot was not handed to the head of the line")
        return sample

    def reattempt(self) -> Sample:
        start = clock()
        result = self.backend.acquire(self.group, self.line[-1], 1, TTL, self.meta)
        sample = (clock() - start,)
        if result.acquired:
            raise StaleLine(f"{self.waiters} waiters: a waiter was granted out of turn")
        return sample


def line_configs(backend: Any, client: Any, prefix: str, waiters: int) -> tuple[Line, list[Config]]:
    """The handoff configuration of a line and (with waiters) the re-attempt one, on the
    same line (whose prepare runs in the handoff configuration's)."""
    line = Line(backend, client, waiters)
    name = f"{waiters:,} waiters"
    configs = [Config(name, "waiters", waiters, prefix, ("release", "acquire"), line.prepare, line.handoff)]
    if waiters:
        configs.append(Config(name, "re-attempt", waiters, prefix, ("acquire",), _nothing, line.reattempt))
    return line, configs


def _nothing(ops: int) -> None:
    """The re-attempt configuration's prepare: its line's is the handoff configuration's."""


# -- the run -----------------------------------------------------------------------------


def run_round(
    configs: list[Config], client: Any, scripts: dict[tuple[bytes, bytes], str], ops: int, record: bool
) -> bool:
    """``ops`` ops of every configuration (prepared), interleaved op by op in the order of
    ``configs``; the server's log is read afterwards. ``False``: the round was discarded
    (a line went stale under it)."""
    client.slowlog_reset()
    samples: dict[int, list[Sample]] = {id(config): [] for config in configs}
    try:
        for _ in range(ops):
            for config in configs:
                samples[id(config)].append(config.step())
    except StaleLine:
        client.slowlog_reset()
        return False
    durations = script_durations(client, scripts)
    if not record:
        return True
    # Configurations that share a prefix (a line's handoff and re-attempt) share its log
    # entries: split them by what each op called.
    by_prefix: dict[str, list[Config]] = {}
    for config in configs:
        by_prefix.setdefault(config.prefix, []).append(config)
        config.samples.extend(samples[id(config)])
    for prefix, sharing in by_prefix.items():
        for script in {name for config in sharing for name in config.calls}:
            logged = durations.get((prefix, script), [])
            expected = sum(ops * config.calls.count(script) for config in sharing)
            if len(logged) != expected:
                raise RuntimeError(
                    f"{prefix}: {len(logged)} {script} calls in the server's log, not {expected}"
                )
            if len(sharing) == 1:
                sharing[0].server.setdefault(script, []).extend(logged)
            else:  # one op of each in turn: the log alternates in the configurations' order
                users = [config for config in sharing if script in config.calls]
                for position, config in enumerate(users):
                    config.server.setdefault(script, []).extend(logged[position :: len(users)])
    return True


def measure(
    rounds: int = 60,
    ops: int = 100,
    *,
    groups: Sequence[int] = (1, 100, 10_000, 100_000),
    waiters: Sequence[int] = (0, 1, 10, 100, 1000),
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Run the benchmark; print its table and verdicts (``verbose``); return summary rows
    ``{"name", "value", "goal", "met"}``."""
    import redis

    from task_workflow.throttle import RedisThrottleBackend

    say = print if verbose else (lambda *a, **k: None)
    with private_redis() as port:
        clients: list[Any] = []

        def backend_for(label: str) -> tuple[Any, Any, str]:
            name = f"bench-scale-{label}"
            client = redis.Redis(host="127.0.0.1", port=port, db=len(clients), client_name=name)
            clients.append(client)
            return RedisThrottleBackend(client, f"{PREFIX}{label}:", restart_grace=0.0), client, name

        admin = redis.Redis(host="127.0.0.1", port=port, client_name="bench-scale-admin")
        wait_uptime(admin)
        slowlog_on(admin)
        calibration, _, calibration_name = backend_for("calibrate")
        scripts = calibrate(admin, calibration, calibration_name)
        configs: list[Config] = []
        for count in groups:
            backend, _, prefix = backend_for(f"g{count}")
            configs.append(groups_config(backend, prefix, count))
        backend, _, prefix = backend_for("fresh")
        configs.append(fresh_config(backend, prefix))
        lines: list[Line] = []
        for count in waiters:
            backend, client, prefix = backend_for(f"w{count}")
            line, line_cfgs = line_configs(backend, client, prefix, count)
            lines.append(line)
            configs.extend(line_cfgs)
        say(
            f"throttle scale: RedisThrottleBackend acquire/release on a private redis-server (port {port}), "
            f"{rounds} rounds (+1 warm-up) x {ops} ops per configuration, interleaved op by op; "
            f"{os.cpu_count()} CPUs"
        )
        discarded = 0
        for round_no in range(rounds + 1):
            for config in configs:
                config.prepare(ops)
            shift = round_no % len(configs)
            if not run_round(configs[shift:] + configs[:shift], admin, scripts, ops, record=round_no > 0):
                discarded += 1
                if discarded > max(rounds // 4, 2):
                    raise RuntimeError(f"{discarded} rounds discarded: this machine is too busy for this run")
        rebuilt = sum(line.rebuilds for line in lines)
        if discarded or rebuilt:
            say(
                f"under load some waiters fell silent for 3 s: {discarded} round(s) discarded (not counted), "
                f"lines set up again {rebuilt} time(s) (the rounds before were clean: every handoff checked)"
            )
        for client in [*clients, admin]:
            client.close()
    return report(configs, groups, waiters, say)


def find(configs: list[Config], kind: str, size: int) -> Config | None:
    return next((c for c in configs if c.kind == kind and c.size == size), None)


def report(
    configs: list[Config], groups: Sequence[int], waiters: Sequence[int], say: Callable[..., None]
) -> list[dict[str, Any]]:
    titles = {
        "groups": "live groups, no waiters: acquire (granted) + release",
        "fresh": "a group never used before, each op (its counter starts: INFO server); x ref: 1 group",
        "waiters": "waiters in line, 1 group: release (hands over) + acquire (refused, joins the line)",
        "re-attempt": "waiters in line, 1 group: the last waiter attempts again (refused)",
    }
    say(
        "\nclient: us per op (median, p99) and per call (median); server: us per script call (SLOWLOG median)"
    )
    header = f"  {'configuration':<17}{'median':>8}{'p99':>8}{'acquire':>9}{'release':>9}"
    header += f"{'srv acq':>9}{'srv rel':>9}{'srv op':>8}{'x ref':>7}{'x ref srv':>10}"
    for kind in ("groups", "fresh", "waiters", "re-attempt"):
        rows = [c for c in configs if c.kind == kind]
        if not rows:
            continue
        say(titles[kind])
        say(header)
        ref = rows[0] if kind != "fresh" else (find(configs, "groups", min(groups)) or rows[0])
        for config in rows:
            blank = f"{'':>9}"
            release = f"{config.client_us('release'):>9.1f}" if "release" in config.calls else blank
            srv_rel = f"{config.server_us('release'):>9.1f}" if "release" in config.calls else blank
            say(
                f"  {config.name:<17}{config.median_us:>8.1f}{config.p99_us:>8.1f}"
                f"{config.client_us('acquire'):>9.1f}{release}{config.server_us('acquire'):>9.1f}{srv_rel}"
                f"{config.server_us():>8.1f}{config.median_us / ref.median_us:>7.2f}"
                f"{config.server_us() / ref.server_us():>10.2f}"
            )

    results: list[dict[str, Any]] = []

    def verdict(name: str, value: float, bound: float) -> None:
        met = value <= bound
        harness.verdict(NAME, name, value, round(bound, 2))
        results.append(
            {"name": f"throttle_scale: {name}", "value": value, "goal": f"<= {bound:.2f}", "met": met}
        )

    say("\nverdicts")
    low, high = find(configs, "groups", min(groups)), find(configs, "groups", max(groups))
    if low and high and low is not high:
        verdict(
            f"{high.size:,} groups / {low.size:,} group, client median",
            high.median_us / low.median_us,
            GROUPS_RATIO_GOAL,
        )
        tenth = find(configs, "groups", high.size // 10)
        if tenth:
            verdict(
                f"{high.size:,} groups / {tenth.size:,} groups, server",
                high.server_us() / tenth.server_us(),
                GROUPS_STEP_GOAL,
            )
        else:
            say(f"  (no server verdict on groups: it needs {high.size // 10:,} groups measured too)")
        say(
            f"  (server / {low.size:,} group: the groups table's 'x ref srv', no goal: the step from keys "
            f"in the CPU caches to keys out of them)"
        )
    w0, w1 = find(configs, "waiters", 0), find(configs, "waiters", 1)
    for size in (10, 100):
        line = find(configs, "waiters", size)
        if w1 and line:
            for side, value in (
                ("client median", line.median_us / w1.median_us),
                ("server", line.server_us() / w1.server_us()),
            ):
                verdict(f"{size} waiters / 1 waiter, {side}", value, log_bound(size, 1))
    if w0 and w1:
        w100 = find(configs, "waiters", 100)
        also = (
            f"; 100 waiters / 0: client {w100.median_us / w0.median_us:.2f}x, "
            f"server {w100.server_us() / w0.server_us():.2f}x"
            if w100
            else ""
        )
        say(
            f"  (from 0 to 1 waiter the op changes: a release that hands over and a refused acquire "
            f"that joins the line; client {w1.median_us / w0.median_us:.2f}x, "
            f"server {w1.server_us() / w0.server_us():.2f}x{also}; no goal: two paths, not two lines)"
        )
    for config in configs:
        one = find(configs, config.kind, 1)
        if config.kind in ("waiters", "re-attempt") and config.size > 100 and one:
            say(
                f"  (shape) {config.kind} {config.size:,} / 1 waiter: client "
                f"{config.median_us / one.median_us:.2f}, server {config.server_us() / one.server_us():.2f} "
                f"(log bound {log_bound(config.size, 1):.2f})"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="measured rounds (plus one warm-up)")
    parser.add_argument("--ops", type=int, default=100, help="ops per configuration and round")
    parser.add_argument("--groups", default="1,100,10000,100000", help="live groups per configuration")
    parser.add_argument("--waiters", default="0,1,10,100,1000", help="waiters in line per configuration")
    args = parser.parse_args()
    harness.setup_django("tests.settings", database_url=None, redis_url=harness.REDIS_URL)
    measure(
        args.rounds,
        args.ops,
        groups=[int(n) for n in args.groups.split(",")],
        waiters=[int(n) for n in args.waiters.split(",")],
    )


if __name__ == "__main__":
    main()
