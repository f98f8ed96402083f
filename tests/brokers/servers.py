"""Brokers of the test's own, which a test crashes and starts again on the same data.

- ``BrokerRedis``: a ``redis-server`` on its own port and data directory, with the
  persistence asked for (AOF with ``appendfsync always``/``everysec``, RDB snapshots, or
  none). Each scenario profile uses a database of its own (``broker_url(db)``).
- ``RabbitMQNode``: a RabbitMQ node of its own (node name, AMQP and distribution ports,
  Erlang cookie, config, Mnesia and log directories, all under one temporary directory),
  never the machine's shared node. It runs in the foreground in a process group of its
  own, so a crash is one ``killpg`` and nothing outlives ``close()``.

Both have ``start()``, ``crash()`` (SIGKILL: nothing flushed on the way out), ``restart()``
(crash, or with ``graceful=True`` a clean stop, stay down for ``downtime`` seconds, start
again; returns the seconds from the kill until clients can connect again) and ``close()``
(kill, remove the data directory). Their output goes to ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.workers import ARTIFACTS_DIR, RedisServer, WorkerError, free_port, log_tail

#: Seconds between readiness probes of a starting server (there is no event to wait for).
PROBE_INTERVAL = 0.05


class Restartable:
    """``restart`` for a broker server: stopped cleanly (``graceful``) or killed, down for
    ``downtime`` seconds, started again on the same data; returns the seconds it took."""

    def restart(self, downtime: float = 0.0, graceful: bool = False) -> float:
        started = time.monotonic()
        if graceful:
            self.stop_cleanly()  # type: ignore[attr-defined]
        else:
            self.crash()  # type: ignore[attr-defined]
        time.sleep(downtime)  # the outage itself (the scenario's parameter), not a wait for something
        self.start()  # type: ignore[attr-defined]
        return time.monotonic() - started


@dataclass
class BrokerRedis(Restartable, RedisServer):
    """A ``redis-server`` used as a Celery broker, with persistence in ``data_dir``.

    ``appendfsync=None`` turns the append-only file off; ``save`` is the RDB snapshot
    schedule (``""``: none; ``"3600 1 300 100 60 10000"`` is Redis's own default).
    """

    name: str = "broker"
    appendfsync: str | None = "always"
    save: str = ""
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tw-broker-redis-")))
    kind: str = field(init=False, default="redis")

    def broker_url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def description(self) -> str:
        aof = f"appendonly yes, appendfsync {self.appendfsync}" if self.appendfsync else "appendonly no"
        return f"redis ({aof}, save {self.save!r})"

    @property
    def arguments(self) -> list[str]:
        aof = (
            ["--appendonly", "yes", "--appendfsync", self.appendfsync]
            if self.appendfsync
            else ["--appendonly", "no"]
        )
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", self.save, *aof,
        ]  # fmt: skip

    def start(self) -> BrokerRedis:
        """Start the server on ``data_dir`` (what a previous run left there is loaded) and
        return once it answers ``PING`` (which it does only after loading its data)."""
        import redis

        if self.alive():
            raise WorkerError(f"redis-server on port {self.port} is already running")
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.arguments, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise WorkerError(
                        f"redis-server on port {self.port} exited with {self.process.returncode}:\n"
                        f"{log_tail(self.log_path)}"
                    )
                with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    if client.ping():
                        return self
                if time.monotonic() > deadline:
                    self.kill()
                    raise WorkerError(f"redis-server on port {self.port} did not answer within the deadline")
                time.sleep(PROBE_INTERVAL)
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: the server writes nothing more (what is in the AOF file stays)."""
        self.kill()

    def stop_cleanly(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """A clean ``SHUTDOWN``: the AOF is flushed and fsynced, an RDB snapshot written
        if ``save`` is set."""
        import redis

        if not self.alive():
            return
        client = self.client()
        try:
            client.shutdown()
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        assert self.process is not None
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def parked(self, db: int) -> int:
        """Messages a consumer received and never acknowledged, in database ``db`` (kombu's
        ``unacked`` hash): they are given out again one visibility timeout after delivery."""
        import redis

        client = redis.Redis(
            host="127.0.0.1", port=self.port, db=db, socket_connect_timeout=1, socket_timeout=2
        )
        try:
            return int(client.hlen("unacked"))
        finally:
            client.close()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _rabbitmq_server() -> str:
    """The real server script: Debian's ``/usr/sbin`` wrapper would switch to the
    ``rabbitmq`` user (and its cookie and home), which the node must not share."""
    for candidate in (os.environ.get("RABBITMQ_SERVER_SCRIPT"), "/usr/lib/rabbitmq/bin/rabbitmq-server"):
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("rabbitmq-server") or "rabbitmq-server"


def rabbitmq_available() -> bool:
    return Path(_rabbitmq_server()).exists() or shutil.which("rabbitmq-server") is not None


@dataclass
class RabbitMQNode(Restartable):
    """A RabbitMQ node of the test's own, on ``127.0.0.1:port`` (user ``guest``)."""

    name: str = field(default_factory=lambda: f"twtest-{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    base_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tw-rabbitmq-")))
    start_timeout: float = 60.0
    stop_timeout: float = 30.0
    kind: str = field(init=False, default="rabbitmq")
    description: str = field(init=False, default="rabbitmq (durable queues, persistent messages)")
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = ARTIFACTS_DIR / f"rabbitmq-{self.name}.log"
        self.base_dir.chmod(0o700)
        # Its own cookie, config and environment file: nothing read from /etc/rabbitmq
        # (whose listener is the shared node's port 5672) or from the shared node's home.
        cookie = self.base_dir / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (self.base_dir / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        (self.base_dir / "enabled_plugins").write_text("[].\n")

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    def broker_url(self, db: int = 0) -> str:
        """The AMQP URL (``db`` is ignored: profiles share the default vhost, with queues of their own)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        base = self.base_dir
        return {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie of this node and its rabbitmqctl
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> ...`` with this node's cookie."""
        rabbitmqctl = str(Path(_rabbitmq_server()).with_name("rabbitmqctl"))
        return subprocess.run(
            [rabbitmqctl, "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RabbitMQNode:
        """Start the node on ``base_dir`` (durable queues and persistent messages of an
        earlier start are recovered) and return once an AMQP client can log in."""
        if self.alive():
            raise WorkerError(f"RabbitMQ node {self.node} is already running")
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [_rabbitmq_server()], cwd=self.base_dir, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_until_ready()
        except BaseException:
            self.crash()
            raise
        return self

    def _wait_until_ready(self) -> None:
        # An AMQP login, not ``rabbitmqctl await_startup``: the listener opens last in the
        # boot, a login is what the workers need, and it costs no Erlang VM start per probe.
        import amqp

        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise WorkerError(
                    f"RabbitMQ node {self.node} exited with {self.process.returncode}:\n{self.logs()}"
                )
            connection = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=1)
            try:
                connection.connect()
                return
            except (OSError, amqp.exceptions.AMQPError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    connection.close()
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"RabbitMQ node {self.node} did not accept a login within {self.start_timeout}s"
                )
            time.sleep(PROBE_INTERVAL)

    def crash(self) -> None:
        """SIGKILL to the node's whole process group (shell, Erlang VM, port programs)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_cleanly(self) -> None:
        self.stop()

    def stop(self) -> None:
        """A clean stop (``rabbitmqctl stop``); killed if that does not end it in time."""
        if not self.alive():
            return
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", timeout=self.stop_timeout)
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.crash()

    def parked(self, db: int) -> int:
        """Always 0: RabbitMQ gives a closed channel's unacknowledged messages out again at once."""
        return 0

    def logs(self, lines: int = 60) -> str:
        """The end of the launcher's output and of the node's own log."""
        node_logs = sorted((self.base_dir / "log").glob("*.log"))
        return "\n".join([log_tail(self.log_path, lines), *(log_tail(path, lines) for path in node_logs)])

    def close(self) -> None:
        """Kill the node (its data goes anyway: no clean stop needed), keep its log in
        ``test-artifacts/``, remove its directory."""
        self.crash()
        for path in (self.base_dir / "log").glob(f"{self.name}*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(path, ARTIFACTS_DIR / f"rabbitmq-{path.name}")
        shutil.rmtree(self.base_dir, ignore_errors=True)
