"""The throttle fault campaign: hosts, services, holders, faults, and the checker.

``Campaign(config)`` is a context manager. Entering it sets up one run (an id of six hex
digits names everything it creates):

- network namespaces (``netns.Topology``): ``twf-svc-<id>`` and three hosts, each with
  its own host name, a Redis link and a database link;
- in the services namespace a ``redis-server`` of the run's own (no persistence),
  reachable by the campaign through a Unix socket;
- a proxy process (``proxy.py``) with one route per host from ``10.77.0.1:1640<i>`` to
  that Redis (its delay is the "high latency host" fault) and one from
  ``10.78.0.1:5432`` to the machine's PostgreSQL on 127.0.0.1:5432, where the run has
  a database of its own, ``tw_faults_<id>``, holding the fenced resource;
- holder processes (``holder.py``), several per host.

``run()`` then injects faults one after the other, chosen by the seed, each followed by
a quiet gap and a wait until holds resume (a liveness figure), stops the holders, and
checks (``checker.check``). Leaving the context removes everything, also on errors and
interrupts; the leftovers of an earlier crashed run are removed when a run starts.

Fault kinds:

- ``sigkill``: SIGKILL a holder that holds a slot, start a replacement on its host;
- ``sigstop``: SIGSTOP a holder of a fenced group right after it checked its lease (so
  its next write is late), SIGCONT it after more than a lease;
- ``sigstop-waiter``: the same for a holder waiting for a slot (it may be handed one
  while stopped);
- ``cut``: take a host's Redis link down for more than a lease, then up again;
- ``restart``: stop the run's Redis (``SHUTDOWN NOSAVE``) and start it again, empty;
- ``cut-restart``: cut off the host of a holder of a fenced group, restart Redis, bring
  the host back after more than a lease: the cut-off holder cannot learn from the new
  server that its lease is gone, so only the restart grace keeps the new server from
  granting its slot while it still believes;
- ``latency``: delay one host's Redis traffic by 50-200 ms per direction for a while.

``failover.py`` runs the same campaign on a primary, two replicas and three Sentinels
(``FailoverCampaign``: the hooks ``start_services``, ``holder_env``, ``fault_handlers``
and ``judge`` are what it overrides).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.checker import Fault, HolderLog, LoggedWrite, Report, check, parse_records
from tests.faults.holder import GroupSpec, Timing
from tests.faults.netns import (
    PARENT_ENV,
    SERVICES_DB_ADDRESS,
    SERVICES_REDIS_ADDRESS,
    Host,
    RunRegistry,
    Topology,
    cleanup_stale_runs,
    new_run_id,
    run_alive,
    run_namespaces,
)
from tests.faults.proxy import ProxyControl, ProxyProcess, RouteSpec
from tests.faults.resource import LOG_COLUMNS
from tests.workers import ARTIFACTS_DIR as ARTIFACTS
from tests.workers import ROOT

#: The machine's PostgreSQL (the campaign's own connections, from the root namespace).
POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER = "127.0.0.1", 5432, "postgres"
DATABASE_PREFIX = "tw_faults_"
DATABASE_PATTERN = re.compile(r"^tw_faults_(?P<id>[0-9a-f]{6})$")

#: Port of the run's Redis inside the services namespace, and of the hosts' routes to it.
REDIS_PORT = 16379
REDIS_ROUTE_PORT = 16400

FAULT_KINDS = ("sigkill", "sigstop", "sigstop-waiter", "cut", "restart", "cut-restart", "latency")


class CampaignError(RuntimeError):
    """The campaign itself could not go on (a server or holder did not come up)."""


@dataclass(frozen=True)
class CampaignConfig:
    """What one run does. Times are seconds."""

    seed: int = 1
    #: Time spent injecting faults (plus set-up and the final stop).
    duration: float = 60.0
    hosts: int = 3
    holders_per_host: int = 3
    groups: tuple[GroupSpec, ...] = (GroupSpec("solo", 1, fenced=True), GroupSpec("pair", 2))
    ttl: float = 1.5
    wait: float = 3.0
    #: Shortest and longest hold, seconds (``Timing.hold``).
    hold: tuple[float, float] = Timing.hold
    #: Redis-restart grace of the holders' throttle; ``None``: the TTL.
    grace: float | None = None
    #: Quiet time after each fault.
    gap: tuple[float, float] = (1.0, 2.0)
    kinds: tuple[str, ...] = FAULT_KINDS
    #: Keep records and logs in test-artifacts/faults-<id> even when the run passed.
    keep_artifacts: bool = False
    #: A directory whose ``task_workflow`` package the holders import instead of this
    #: checkout's (e.g. ``git archive`` of an older commit: the code before a fix).
    code_path: Path | None = None

    @property
    def restart_grace(self) -> float:
        return self.ttl if self.grace is None else self.grace

    @property
    def resume_timeout(self) -> float:
        """Seconds holds may take to resume after a fault ends before the campaign calls it
        a liveness failure: three times the longest legitimate pause, and at least 30 s.

        That pause adds up, one after the other: a lease the store still counts (a holder
        stopped or cut off, a handoff claim to a waiter that was stopped: one TTL), a
        restarted server's grace, the longest BLPOP before a waiter tries again (1 s), a
        waiter that timed out entering the line again (``wait``), and slots held by holds
        that run to their end (``Timing.hold``): 9.5 s with the defaults. Measured: at
        most 4.2 s between two starts on 2 cores at a load average of 7 to 9 (two test
        sessions and benchmarks beside the campaign).
        """
        longest = self.ttl + self.restart_grace + 1.0 + self.wait + self.hold[1]
        return max(30.0, 3 * longest)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; ``CampaignError`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CampaignError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- services -----------------------------------------------------------------------


@dataclass
class RedisServer:
    """The run's ``redis-server`` in the services namespace; managed through its Unix
    socket (the campaign's namespace has no route to the services one)."""

    namespace: str
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    def client(self) -> Any:
        """A client that fails at once when the server is down (redis-py retries with
        backoff by default: a SHUTDOWN would be re-sent to a server that is gone)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            unix_socket_path=str(self.socket_path), socket_timeout=2, socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip

    def start(self, timeout: float = 10.0) -> float:
        """Start the server; return once it answers PING. Returns the spawn time."""
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            "ip", "netns", "exec", self.namespace, "redis-server", "--port", str(REDIS_PORT),
            "--bind", "127.0.0.1", SERVICES_REDIS_ADDRESS, "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.data_dir),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        spawned = time.monotonic()
        # The parent's pid marks the run as in progress for another run's clean-up
        # (netns.campaign_runs_in), also while no holder runs.
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        with (self.data_dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        client = self.client()

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise CampaignError(
                    f"redis-server exited with {self.process.returncode}; see {self.data_dir}"
                )
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_until(answers, timeout, "the run's Redis to answer PING")
        finally:
            client.close()
        return spawned

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``, then wait for the process to exit."""
        import redis

        if self.process is None or self.process.poll() is not None:
            return
        client = self.client()
        try:
            client.shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass  # it closes the connection as it exits
        finally:
            client.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Database:
    """The run's PostgreSQL database and its fenced resource."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def connect(dbname: str, *, autocommit: bool = True) -> Any:
        import psycopg

        return psycopg.connect(
            host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER, dbname=dbname,
            autocommit=autocommit, connect_timeout=5,
        )  # fmt: skip

    def create(self, fenced: list[str], python_path: str, cwd: Path) -> None:
        """Create the database, and in it the fenced resource's table (``resource.py``,
        run by Django with ``python_path`` from ``cwd``: the code the holders run) with a
        row per name in ``fenced``, and the write log."""
        from psycopg import sql

        with self.connect("postgres") as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        env = {
            **os.environ,
            "PYTHONPATH": python_path,
            "DJANGO_SETTINGS_MODULE": "tests.faults.settings",
            "DATABASE_URL": f"postgres://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{self.name}",
        }
        done = subprocess.run(
            [sys.executable, "-m", "tests.faults.resource", *fenced],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise CampaignError(f"creating the fenced resource failed:\n{done.stdout}{done.stderr}")

    def write_log(self) -> list[LoggedWrite]:
        with self.connect(self.name) as conn:
            rows = conn.execute(f"SELECT {LOG_COLUMNS} FROM fenced_write_log ORDER BY id").fetchall()
        return [LoggedWrite(*row) for row in rows]

    def drop(self) -> None:
        drop_database(self.name)


def drop_database(name: str) -> None:
    from psycopg import sql

    with Database.connect("postgres") as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_stale_databases() -> list[str]:
    """Drop the ``tw_faults_<id>`` databases of runs whose owner is gone (only names of
    exactly that form: ``_`` is a wildcard of LIKE, so the query alone is not enough)."""
    with Database.connect("postgres") as admin:
        names = [row[0] for row in admin.execute("SELECT datname FROM pg_database")]
    stale = [name for name in names if (m := DATABASE_PATTERN.match(name)) and not run_alive(m["id"])]
    for name in stale:
        drop_database(name)
    return stale


# -- holders ------------------------------------------------------------------------


@dataclass
class HolderProcess:
    """One holder process and an incremental reader of its records."""

    host: Host
    name: str
    records_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    offset: int = 0
    #: The last event read, with its time, and whether a hold is open.
    last: dict[str, Any] = field(default_factory=dict)
    holding: bool = False
    group: str | None = None
    ready: bool = False
    stopped: bool = False  # SIGSTOPped now
    #: When the holder's latest hold started (monotonic), 0 before the first, and when
    #: the holder means to end it.
    last_start: float = 0.0
    until: float = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def poll(self) -> list[dict[str, Any]]:
        """Read the lines appended since the last call and update the state."""
        try:
            with self.records_path.open("rb") as records:
                records.seek(self.offset)
                chunk = records.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next call
        self.offset += len(complete)
        events = [json.loads(line) for line in complete.splitlines()]
        for ev in events:
            self.last = ev
            if ev["ev"] == "ready":
                self.ready = True
            elif ev["ev"] == "start":
                self.holding, self.group, self.last_start = True, ev["group"], ev["t"]
                self.until = ev.get("until", 0.0)
            elif ev["ev"] == "end":
                self.holding = False
        return events


# -- the campaign -------------------------------------------------------------------


class Campaign:
    """One run: ``with Campaign(config) as campaign: report = campaign.run()``."""

    def __init__(self, config: CampaignConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.run_id = new_run_id()
        self.registry = RunRegistry(self.run_id)
        self.topology = Topology(self.run_id, config.hosts)
        self.dir = ARTIFACTS / f"faults-{self.run_id}"
        self.database = Database(DATABASE_PREFIX + self.run_id)
        self.redis = RedisServer(self.topology.services, self.dir / "redis")
        self.proxy: ProxyProcess | None = None
        self.control: ProxyControl | None = None
        self.holders: list[HolderProcess] = []
        self.retired: list[HolderProcess] = []
        self.faults: list[Fault] = []
        #: Records file name -> when its holder was SIGKILLed.
        self.kills: dict[str, float] = {}
        self.recoveries: list[float] = []
        self.started_at = time.monotonic()
        self._holder_serial = 0
        self._database_created = False
        self._previous_sigterm: Any = None
        self.passed = False

    # Set-up and tear-down --------------------------------------------------------
    def __enter__(self) -> Campaign:
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread():
            # A SIGTERM (a CI timeout, ``kill``) unwinds through the clean-up too.
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.teardown()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def setup(self) -> None:
        self.started_at = time.monotonic()
        cleanup_stale_runs()
        self.registry.claim()
        drop_stale_databases()
        self.dir.mkdir(parents=True)
        (self.dir / "records").mkdir()
        self.topology.create()
        self.database.create(
            [g.key for g in self.config.groups if g.fenced], self.python_path, self.holder_cwd
        )
        self._database_created = True
        self.start_services()
        pending = [
            self._spawn_holder(host)
            for host in self.topology.hosts
            for _ in range(self.config.holders_per_host)
        ]
        for holder in pending:
            self._wait_ready(holder)
        # Every group held at least once before the first fault.
        seen: set[str] = set()

        def every_group_held() -> bool:
            for holder in self.holders:
                holder.poll()
                if holder.group is not None:
                    seen.add(holder.group)
            return seen >= {g.key for g in self.config.groups}

        wait_until(every_group_held, 30, "a first hold of every group")

    def start_services(self) -> None:
        """Start the throttle's store and the proxy in the services namespace."""
        self.redis.start()
        self._start_proxy()

    def stop_services(self) -> None:
        self.redis.stop()

    def services_broken(self) -> list[str]:
        """What of the services exited on its own (no fault ended it)."""
        if self.redis.process is not None and self.redis.process.poll() is None:
            return []
        status = self.redis.process.returncode if self.redis.process else None
        return [f"the run's Redis exited with {status}"]

    def proxy_routes(self) -> list[RouteSpec]:
        """The database route, and one route per host to the run's Redis."""
        routes = [
            RouteSpec(
                "db", (SERVICES_DB_ADDRESS, 5432), (POSTGRES_HOST, POSTGRES_PORT),
                listen_netns=self.topology.services, connect_netns=None,
            )
        ]  # fmt: skip
        for host in self.topology.hosts:
            routes.append(
                RouteSpec(
                    self.redis_route(host), (SERVICES_REDIS_ADDRESS, REDIS_ROUTE_PORT + host.index),
                    ("127.0.0.1", REDIS_PORT),
                    listen_netns=self.topology.services, connect_netns=self.topology.services,
                )
            )  # fmt: skip
        return routes

    def _start_proxy(self) -> None:
        self.proxy = ProxyProcess(self.proxy_routes(), self.dir / "proxy.sock", self.dir / "proxy.log", ROOT)
        self.control = self.proxy.start()
        assert self.proxy.process is not None
        self.registry.add_pid(self.proxy.process.pid)  # lives in the root namespace

    @staticmethod
    def redis_route(host: Host) -> str:
        return f"redis-h{host.index}"

    def _spawn_holder(self, host: Host) -> HolderProcess:
        self._holder_serial += 1
        name = f"h{host.index}-{self._holder_serial:03d}"
        holder = HolderProcess(host, name, self.dir / "records" / f"{name}.jsonl", self.dir / f"{name}.log")
        config = self.config
        env = self.holder_env(host)
        command = host.command(
            sys.executable, "-m", "tests.faults.holder", "--hostname", host.hostname,
            "--records", str(holder.records_path), "--groups", ",".join(str(g) for g in config.groups),
            "--ttl", str(config.ttl), "--wait", str(config.wait), "--hold", *(str(s) for s in config.hold),
            "--seed", str(config.seed * 1000 + self._holder_serial),
        )  # fmt: skip
        with holder.log_path.open("ab") as log:
            holder.process = subprocess.Popen(
                command,
                cwd=self.holder_cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.holders.append(holder)
        return holder

    @property
    def holder_cwd(self) -> Path:
        """Where holders start: ``python -m`` puts it first on ``sys.path``, so it is
        ``config.code_path`` when set (else this checkout's own ``task_workflow`` wins)."""
        return self.config.code_path or ROOT

    @property
    def python_path(self) -> str:
        """The holders' ``PYTHONPATH``: ``config.code_path`` first, then this checkout."""
        code = [str(self.config.code_path)] if self.config.code_path else []
        return os.pathsep.join([*code, str(ROOT)])

    def holder_env(self, host: Host) -> dict[str, str]:
        """The environment of a holder process on ``host``: the run's database and store."""
        return {
            **os.environ,
            "PYTHONPATH": self.python_path,
            "DJANGO_SETTINGS_MODULE": "tests.faults.settings",
            "DATABASE_URL": f"postgres://postgres@{SERVICES_DB_ADDRESS}:5432/{self.database.name}",
            "THROTTLE_REDIS_URL": f"redis://{SERVICES_REDIS_ADDRESS}:{REDIS_ROUTE_PORT + host.index}/0",
            # Celery and the default cache are not used; point them at the run's Redis anyway.
            "REDIS_URL": f"redis://{SERVICES_REDIS_ADDRESS}:{REDIS_ROUTE_PORT + host.index}/1",
            PARENT_ENV: str(os.getpid()),
            "TWF_TTL": str(self.config.ttl),
            "TWF_GRACE": str(self.config.restart_grace),
        }

    def _wait_ready(self, holder: HolderProcess, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not holder.alive():
                raise CampaignError(f"holder {holder.name} exited; see {holder.log_path}")
            holder.poll()
            return holder.ready

        wait_until(ready, timeout, f"holder {holder.name} to be ready", interval=0.05)

    def teardown(self) -> None:
        """Remove everything of the run; never raises: a step that fails is reported on
        stderr and the others still run (the next run removes what is left)."""
        steps: list[Callable[[], None]] = [
            lambda: self._kill_holders(),
            lambda: self.proxy.stop() if self.proxy else None,
            self.stop_services,
            self.topology.destroy,
            lambda: self.database.drop() if self._database_created else None,
            self.registry.remove,
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:
                print(f"fault campaign {self.run_id}: clean-up step failed: {exc!r}", file=sys.stderr)
        if self.passed and not self.config.keep_artifacts:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_holders(self) -> None:
        for holder in self.holders:
            if holder.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(holder.pid, signal.SIGCONT)
                    os.kill(holder.pid, signal.SIGKILL)
                assert holder.process is not None
                holder.process.wait()

    # The run ------------------------------------------------------------------------
    def run(self) -> Report:
        """Inject faults for ``config.duration`` seconds, stop the holders, check."""
        ends_at = time.monotonic() + self.config.duration
        # Every kind once first (in the seed's order), then kinds at random.
        plan = list(self.config.kinds)
        self.rng.shuffle(plan)
        while time.monotonic() < ends_at or plan:
            kind = plan.pop(0) if plan else self.rng.choice(self.config.kinds)
            fault = self.inject(kind)
            self.faults.append(fault)
            quiet = self.rng.uniform(*self.config.gap)
            self._await_progress(fault.end, timeout=self.config.resume_timeout)
            time.sleep(max(0.0, fault.end + quiet - time.monotonic()))  # the gap is timed, by design
        self._stop_holders()
        return self.check()

    def inject(self, kind: str) -> Fault:
        return self.fault_handlers()[kind]()

    def fault_handlers(self) -> dict[str, Callable[[], Fault]]:
        """Fault kind -> the method that injects it (and returns once it is over)."""
        return {
            "sigkill": self.fault_sigkill,
            "sigstop": lambda: self.fault_sigstop(waiting=False),
            "sigstop-waiter": lambda: self.fault_sigstop(waiting=True),
            "cut": self.fault_cut,
            "restart": self.fault_restart,
            "cut-restart": self.fault_cut_restart,
            "latency": self.fault_latency,
        }

    def _live(self) -> list[HolderProcess]:
        for holder in self.holders:
            holder.poll()
        return [h for h in self.holders if h.alive() and h.ready and not h.stopped]

    def _pick(self, accept: Callable[[HolderProcess], bool], timeout: float) -> HolderProcess | None:
        """A live holder that ``accept``s, polled for until ``timeout``; ``None`` if none did."""
        try:
            return wait_until(
                lambda: self.rng.choice(c) if (c := [h for h in self._live() if accept(h)]) else None,
                timeout,
                "a holder to target",
                interval=0.002,
            )
        except CampaignError:
            return None

    def fault_sigkill(self) -> Fault:
        holder = self._pick(lambda h: h.holding, 5.0) or self.rng.choice(self._live())
        killed_at = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.process is not None
        holder.process.wait()
        self.kills[holder.records_path.name] = killed_at
        self._retire(holder)
        replacement = self._spawn_holder(holder.host)
        fault = Fault("sigkill", killed_at, killed_at, holder.host.hostname, holder.pid)
        self._wait_ready(replacement)
        return fault

    def fault_sigstop(self, *, waiting: bool) -> Fault:
        fenced = {g.key for g in self.config.groups if g.fenced}

        def just_checked(h: HolderProcess) -> bool:
            # Right after a check of a fenced hold: the pause falls before its next write.
            last = h.last
            return (
                h.holding and h.group in fenced and last.get("ev") == "check" and bool(last.get("act"))
                and last.get("step", 0) > 0 and time.monotonic() - last["t"] < 0.01
            )  # fmt: skip

        def waits(h: HolderProcess) -> bool:
            # Not holding for a while: blocked in the throttle's wait for a slot.
            last = h.last
            return (
                not h.holding and last.get("ev") in ("end", "timeout") and time.monotonic() - last["t"] > 0.2
            )

        holder = (
            self._pick(waits if waiting else just_checked, 10.0)
            or self._pick(lambda h: waiting != h.holding, 5.0)
            or self.rng.choice(self._live())
        )
        pause = self.rng.uniform(1.3, 2.0) * self.config.ttl
        stopped_at = time.monotonic()
        os.kill(holder.pid, signal.SIGSTOP)
        holder.stopped = True
        time.sleep(pause)  # the fault's duration
        os.kill(holder.pid, signal.SIGCONT)
        holder.stopped = False
        resumed_at = time.monotonic()
        kind = "sigstop-waiter" if waiting else "sigstop"
        detail = {"holding": holder.holding, "last": holder.last.get("ev")}
        return Fault(kind, stopped_at, resumed_at, holder.host.hostname, holder.pid, detail)

    def fault_cut(self) -> Fault:
        host = self.rng.choice(self.topology.hosts)
        cut_at = time.monotonic()
        self.topology.cut_redis(host)
        time.sleep(self.rng.uniform(1.3, 2.0) * self.config.ttl)  # the fault's duration
        self.topology.restore_redis(host)
        return Fault("cut", cut_at, time.monotonic(), host.hostname)

    def fault_restart(self) -> Fault:
        stopped_at = time.monotonic()
        self.redis.stop()
        exited = time.monotonic()
        down = self.rng.uniform(0.2, 1.0)
        time.sleep(down)  # the fault's duration
        spawned = self.redis.start()
        detail = {"down": round(down, 3), "exited": exited, "spawned": spawned}
        return Fault("restart", stopped_at, time.monotonic(), detail=detail)

    def fault_cut_restart(self) -> Fault:
        fenced = {g.key for g in self.config.groups if g.fenced}

        def long_hold(h: HolderProcess) -> bool:
            # Still holding well past its lease: it believes to the end of its lease.
            return h.holding and h.group in fenced and h.until - time.monotonic() > self.config.ttl

        holder = self._pick(long_hold, 10.0) or self._pick(lambda h: h.holding and h.group in fenced, 5.0)
        host = holder.host if holder else self.rng.choice(self.topology.hosts)
        cut_at = time.monotonic()
        self.topology.cut_redis(host)
        self.redis.stop()
        exited = time.monotonic()
        down = self.rng.uniform(0.05, 0.3)
        time.sleep(down)  # the fault's duration
        spawned = self.redis.start()
        # Back after more than a lease, and after the grace: by then the host's holders
        # gave up their leases on their own (valid_until).
        back_at = cut_at + self.rng.uniform(1.3, 2.0) * self.config.ttl
        time.sleep(max(0.0, back_at - time.monotonic()))  # the fault's duration
        self.topology.restore_redis(host)
        detail = {"down": round(down, 3), "exited": exited, "spawned": spawned}
        return Fault("cut-restart", cut_at, time.monotonic(), host.hostname, detail=detail)

    def fault_latency(self) -> Fault:
        assert self.control is not None
        host = self.rng.choice(self.topology.hosts)
        delay = round(self.rng.uniform(0.05, 0.2), 3)
        route = self.redis_route(host)
        started = time.monotonic()
        self.control.set_delay(route, delay, delay)
        time.sleep(self.rng.uniform(2.0, 4.0) * self.config.ttl)  # the fault's duration
        self.control.set_delay(route, 0.0, 0.0)
        return Fault("latency", started, time.monotonic(), host.hostname, detail={"delay": delay})

    def _retire(self, holder: HolderProcess) -> None:
        self.holders.remove(holder)
        self.retired.append(holder)

    def _await_progress(self, since: float, timeout: float) -> None:
        """Wait until some hold starts after ``since`` (recorded as a recovery time).

        Fails at once when the run itself broke (a holder or the run's Redis died without
        a fault of ours): no hold can start then, and the cause is not the throttle's. On
        a timeout the error says what every holder was doing."""

        def started() -> float | None:
            for holder in self.holders:
                holder.poll()
            self._check_intact()
            after = [h.last_start for h in self.holders + self.retired if h.last_start > since]
            return min(after, default=None)

        try:
            first = wait_until(started, timeout, "holds to resume after a fault", interval=0.02)
        except CampaignError as exc:
            raise CampaignError(f"{exc}\n{self.describe_state()}") from None
        self.recoveries.append(first - since)

    def _check_intact(self) -> None:
        """``CampaignError`` if a holder or a service exited on its own (only faults end
        them, and a fault starts a replacement or a new server before it returns)."""
        dead = [h for h in self.holders if not h.alive()]
        services = self.services_broken()
        if dead or services:
            what = [
                f"holder {h.name} (pid {h.pid}) exited with {h.process and h.process.returncode}"
                for h in dead
            ]
            what += services
            raise CampaignError(
                f"{'; '.join(what)}, killed by none of the campaign's faults (another run's clean-up? "
                f"namespaces of this run now: {run_namespaces(self.run_id)})"
            )

    def describe_state(self) -> str:
        """Every holder's state and last event, the faults so far, and the clocks."""
        now = time.monotonic()
        wall = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        lines = [f"at {now:.3f} (monotonic) = {wall} (wall clock, as in the holders' logs); holders:"]
        for h in self.holders:
            status = "alive" if h.alive() else f"exited {h.process and h.process.returncode}"
            status += ", SIGSTOPped" if h.stopped else ""
            last = h.last
            doing = f"holding {h.group}" if h.holding else "not holding"
            event = f"last {last.get('ev')} {now - last['t']:.2f}s ago" if "t" in last else "no event"
            lines.append(
                f"  {h.name} pid {h.pid}: {status}, {doing}, {event} {last.get('detail', '')}".rstrip()
            )
        lines.append("faults:")
        lines.extend(f"  {f.describe()}" for f in self.faults)
        return "\n".join(lines)

    def _stop_holders(self, timeout: float = 15.0) -> None:
        """SIGTERM every holder (it ends its hold and exits); SIGKILL the ones still there."""
        for holder in self.holders:
            if holder.alive():
                os.kill(holder.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for holder in self.holders:
            assert holder.process is not None
            try:
                holder.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kills[holder.records_path.name] = time.monotonic()
                holder.process.kill()
                holder.process.wait()

    # Checking -----------------------------------------------------------------------
    def logs(self) -> Iterator[HolderLog]:
        for path in sorted((self.dir / "records").glob("*.jsonl")):
            yield parse_records(path, self.kills)

    def check(self) -> Report:
        report = check(
            list(self.logs()),
            self.faults,
            self.database.write_log(),
            {g.key: g.limit for g in self.config.groups},
            restart_grace=self.config.restart_grace,
        )
        report.recoveries = list(self.recoveries)
        report.wall_seconds = time.monotonic() - self.started_at
        return report

    def judge(self, report: Report) -> bool:
        """Whether the run passed (its artifacts are removed then)."""
        return passed(report)

    def describe_faults(self) -> str:
        return "\n".join(f.describe() for f in self.faults)


def run_campaign(config: CampaignConfig, kind: type[Campaign] = Campaign) -> tuple[Report, Path]:
    """Run one campaign; return its report and its artifacts directory: records, logs and
    ``report.txt``, kept when the run failed (``passed``), broke (an exception: then the
    report is the error, the faults so far and every holder's state) or with
    ``keep_artifacts``, else removed."""
    with kind(config) as campaign:
        try:
            report = campaign.run()
        except Exception as exc:
            # The faults so far and every holder's state: the records alone do not say.
            (campaign.dir / "report.txt").write_text(
                f"campaign error: {exc!r}\n\nwhen it failed: {campaign.describe_state()}\n"
            )
            exc.add_note(f"records and logs in {campaign.dir}")
            raise
        campaign.passed = campaign.judge(report)
        if not campaign.passed or config.keep_artifacts:
            (campaign.dir / "report.txt").write_text(
                report.table() + "\n\n" + "\n\n".join(v.describe() for v in report.violations) + "\n\n"
                + "\n".join(report.notes) + "\n\nfaults:\n" + campaign.describe_faults() + "\n"
            )  # fmt: skip
        return report, campaign.dir


def passed(report: Report) -> bool:
    """The safety properties: nothing but SIGSTOP/pause explains an excess, no stale write
    got through, fencing tokens never went backwards (nor refused a rightful holder), and
    nothing was granted inside a Redis restart's grace."""
    return (
        report.unexplained == 0
        and report.stale_accepted == 0
        and report.token_regressions == 0
        and report.in_lease_refused == 0
        and report.grants_in_grace == 0
        and all(g.max_believers <= g.limit for g in report.groups.values())
    )
