"""A replicated Redis for tests: one primary, its replicas and Sentinel processes.

``SentinelTopology`` starts ``redis-server`` processes (a primary and ``replicas``
replicas of it) and ``redis-server --sentinel`` processes monitoring them, each on a port
of its own (never 6379) with its configuration file, data directory and Unix socket in
``workdir`` and its output in ``ARTIFACTS_DIR/redis-topology-<name>-<port>.log``. It is a
context manager: leaving it kills every process it started, also after an error.

Every node listens on ``host`` (TCP, what the code under test connects to, and the
address every node announces, so Sentinel hands out addresses that work inside a network
namespace too) and on a Unix socket in ``workdir``, through which ``RedisNode.client()``
manages it: a test in the root namespace can then manage nodes that run inside another
namespace (``command_prefix=("ip", "netns", "exec", "<ns>")``).

Waits poll ``INFO`` and ``SENTINEL`` replies until the awaited state holds; a wait that
runs out raises ``TopologyError`` with the end of every node's log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.workers import ARTIFACTS_DIR, free_port, log_tail

T = TypeVar("T")

#: Longest Unix socket path the kernel accepts (``sun_path`` is 108 bytes, NUL included).
MAX_UNIX_SOCKET_PATH = 107


class TopologyError(RuntimeError):
    """A node did not start, or the topology did not reach an awaited state in time."""


class PortInUse(TopologyError):
    """A node could not listen on its port: something took it after it was chosen (an
    outgoing connection's local port, e.g. a replica's link, comes from the same range)."""


def _wait(condition: Callable[[], T | None], timeout: float, what: str, describe: Callable[[], str]) -> T:
    """Poll ``condition`` until it returns something true and return that; raise
    ``TopologyError`` naming ``what`` (and ``describe()``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out after {timeout}s waiting for {what}\n{describe()}")
        time.sleep(0.05)  # poll interval of a state held by other processes, not a synchronisation


@dataclass
class RedisNode:
    """One ``redis-server`` (primary or replica) or Sentinel process of a topology."""

    name: str
    port: int
    host: str
    #: ``"redis"`` or ``"sentinel"``.
    kind: str
    config_path: Path
    unix_socket: Path
    log_path: Path
    command_prefix: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: Stopped with SIGSTOP (``pause``) and not resumed yet.
    paused: bool = False

    @property
    def address(self) -> tuple[str, int]:
        """The TCP address clients use and Sentinel reports."""
        return (self.host, self.port)

    @property
    def command(self) -> list[str]:
        sentinel = ["--sentinel"] if self.kind == "sentinel" else []
        return [*self.command_prefix, "redis-server", str(self.config_path), *sentinel]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client over the node's Unix socket that fails fast: no retries, a 1 s connect
        and 2 s reply timeout, replies decoded (``kwargs`` override these)."""
        options: dict[str, Any] = {
            "unix_socket_path": str(self.unix_socket),
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
        }
        options.update(kwargs)
        return redis.Redis(**options)

    def start(self, timeout: float = 15.0) -> None:
        """Start the process (its own session, so a prefix that forks is signalled with
        it) and return once it answers ``PING``."""
        if self.alive():
            raise TopologyError(f"{self.name} (port {self.port}) is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.paused = False
        client = self.client()
        try:
            _wait(self._answers(client), timeout, f"{self.name} to answer PING", self.log_tail)
        except BaseException:
            self.kill()
            raise
        finally:
            client.close()

    def _answers(self, client: redis.Redis) -> Callable[[], bool]:
        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                tail = self.log_tail()
                error = PortInUse if "Address already in use" in self.log_tail(3) else TopologyError
                raise error(f"{self.name} exited with {self.process.returncode}:\n{tail}")
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        return answers

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process (also a paused one) and wait until it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait()
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing."""
        if not self.alive():
            raise TopologyError(f"{self.name} is not running")
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self.alive():
            self._signal(signal.SIGCONT)
        self.paused = False

    def alive(self) -> bool:
        """The process runs (a paused one too)."""
        return self.process is not None and self.process.poll() is None

    def responsive(self) -> bool:
        """Alive and not paused: a client call may get an answer."""
        return self.alive() and not self.paused

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section`` of this node (raises a ``redis`` error when it does not answer)."""
        client = self.client()
        try:
            return dict(client.info(section))
        finally:
            client.close()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


class SentinelTopology:
    """A primary, ``replicas`` replicas of it and ``sentinels`` Sentinels monitoring it as
    ``service``; all processes on ports of their own. Use as a context manager (or call
    ``start()`` and ``stop()``).

    ``primary`` and ``replicas`` are the roles as last seen by this object: at start, and
    after ``wait_for_failover`` (``current_primary()`` asks a Sentinel instead).
    ``min_replicas_to_write`` is the servers' ``min-replicas-to-write``; ``redis_config``
    lines are added to every data node's configuration file (e.g. an ACL ``user`` line).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        service: str = "mymaster",
        host: str = "127.0.0.1",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        command_prefix: Sequence[str] = (),
        min_replicas_to_write: int = 0,
        ports: Sequence[int] | None = None,
        redis_config: Sequence[str] = (),
    ) -> None:
        count = 1 + replicas + sentinels
        if ports is not None and len(ports) != count:
            raise ValueError(f"ports: {count} needed (primary, {replicas} replicas, {sentinels} sentinels)")
        self.workdir = Path(workdir)
        self.service = service
        self.host = host
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.command_prefix = tuple(command_prefix)
        self.min_replicas_to_write = min_replicas_to_write
        self.redis_config = tuple(redis_config)
        self.quorum = sentinels // 2 + 1
        #: Where the nodes' Unix sockets are: ``workdir``, or a short directory of its own
        #: when ``workdir``'s path is too long for one (pytest's under a nox session's).
        self.socket_dir = self.workdir
        if len(str(self.workdir / "sentinel-99.sock")) > MAX_UNIX_SOCKET_PATH:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="tw-topology-"))
        #: Ports were given: a port in use is an error, not a reason to pick another one.
        self._fixed_ports = ports is not None
        port_list = list(ports) if ports is not None else [free_port() for _ in range(count)]
        names = [f"redis-{i}" for i in range(1 + replicas)] + [f"sentinel-{i}" for i in range(sentinels)]
        all_nodes = [self._node(name, port) for name, port in zip(names, port_list, strict=True)]
        #: Every data node (``redis-server``), in start order: the first is the first primary.
        self.nodes: list[RedisNode] = all_nodes[: 1 + replicas]
        self.sentinels: list[RedisNode] = all_nodes[1 + replicas :]
        self._primary = self.nodes[0]

    def _node(self, name: str, port: int) -> RedisNode:
        unix_socket = self.socket_dir / f"{name}.sock"
        return RedisNode(
            name=name,
            port=port,
            host=self.host,
            kind="sentinel" if name.startswith("sentinel") else "redis",
            config_path=self.workdir / f"{name}.conf",
            unix_socket=unix_socket,
            log_path=self._log_path(name, port),
            command_prefix=self.command_prefix,
        )

    @staticmethod
    def _log_path(name: str, port: int) -> Path:
        return ARTIFACTS_DIR / f"redis-topology-{name}-{port}.log"

    def _start_node(self, node: RedisNode, replica_of: RedisNode | None = None, attempts: int = 5) -> None:
        """Write the node's configuration (a data node: as a replica of ``replica_of``, or
        a primary) and start it; when its port was taken meanwhile (and the ports were
        not given), on another free port."""
        for attempt in range(attempts):
            if node.kind == "sentinel":
                self._write_sentinel_config(node)
            else:
                self._write_redis_config(node, replica_of)
            try:
                node.start()
                return
            except PortInUse:
                if self._fixed_ports or attempt == attempts - 1:
                    raise
                node.port = free_port()
                node.log_path = self._log_path(node.name, node.port)

    # -- roles --------------------------------------------------------------------------

    @property
    def primary(self) -> RedisNode:
        return self._primary

    @property
    def replicas(self) -> list[RedisNode]:
        return [node for node in self.nodes if node is not self._primary]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [node.address for node in self.sentinels]

    def node_at(self, address: tuple[str, int]) -> RedisNode:
        """The data node listening on ``address`` (host, port)."""
        host, port = address
        for node in self.nodes:
            if node.host == host and node.port == int(port):
                return node
        raise TopologyError(f"no node of this topology at {host}:{port}")

    # -- configuration ------------------------------------------------------------------

    def _write_redis_config(self, node: RedisNode, replica_of: RedisNode | None) -> None:
        data_dir = self.workdir / node.name
        data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {node.port}",
            f"bind {node.host}",
            "protected-mode no",  # bound to one address; no password on a test server
            f"unixsocket {node.unix_socket}",
            "unixsocketperm 700",
            f"dir {data_dir}",
            'save ""',
            "appendonly no",
            f"replica-announce-ip {node.host}",
            # A full sync streams straight away (the default waits 5 s for more replicas).
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
            f"min-replicas-to-write {self.min_replicas_to_write}",
            *self.redis_config,
        ]
        if replica_of is not None:
            lines.append(f"replicaof {replica_of.host} {replica_of.port}")
        node.config_path.write_text("\n".join(lines) + "\n")

    def _write_sentinel_config(self, node: RedisNode) -> None:
        primary = self._primary
        lines = [
            f"port {node.port}",
            f"bind {node.host}",
            "protected-mode no",
            f"unixsocket {node.unix_socket}",
            "unixsocketperm 700",
            f"dir {self.workdir}",
            "sentinel resolve-hostnames no",
            f"sentinel announce-ip {node.host}",
            f"sentinel announce-port {node.port}",
            f"sentinel monitor {self.service} {primary.host} {primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        node.config_path.write_text("\n".join(lines) + "\n")

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start every process; return once every replica is in sync with the primary and
        every Sentinel knows the primary, every replica and every other Sentinel."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        try:
            primary = self._primary
            self._start_node(primary)
            for replica in self.replicas:
                self._start_node(replica, primary)
            self.wait_until_synced(timeout)
            for sentinel in self.sentinels:
                self._start_node(sentinel)
            self.wait_until_sentinels_agree(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every process (SIGKILL; a paused one too) and wait for each to exit."""
        for node in [*self.sentinels, *self.nodes]:
            node.kill()
        if self.socket_dir != self.workdir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> SentinelTopology:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[RedisNode]:
        return iter([*self.nodes, *self.sentinels])

    def describe(self) -> str:
        """Every node's state and the end of its log (for failure messages)."""
        parts = []
        for node in self:
            state = "paused" if node.paused else ("alive" if node.alive() else "not running")
            parts.append(f"--- {node.name} {node.host}:{node.port} ({state}):\n{node.log_tail(15)}")
        return "\n".join(parts)

    # -- observations -------------------------------------------------------------------

    def replica_offsets(self) -> dict[str, int | None]:
        """Replication offset of every data node by name: the primary's
        ``master_repl_offset``, each replica's ``slave_repl_offset`` (how much of the
        primary's stream it has processed); ``None`` for a node that does not answer.
        A replica's lag in bytes is the primary's value minus its own."""
        offsets: dict[str, int | None] = {}
        for node in self.nodes:
            if not node.responsive():
                offsets[node.name] = None
                continue
            try:
                info = node.info("replication")
            except redis.exceptions.RedisError:
                offsets[node.name] = None
                continue
            key = "master_repl_offset" if info.get("role") == "master" else "slave_repl_offset"
            offsets[node.name] = int(info.get(key, 0))
        return offsets

    def replication_lag(self) -> dict[str, int | None]:
        """Bytes of the primary's replication stream each responsive replica has not
        processed yet (``None``: it does not answer, or is not linked to the primary)."""
        primary_info = self._primary.info("replication")
        head = int(primary_info["master_repl_offset"])
        lag: dict[str, int | None] = {}
        for node in self.replicas:
            lag[node.name] = None
            if not node.responsive():
                continue
            try:
                info = node.info("replication")
            except redis.exceptions.RedisError:
                continue
            if (
                info.get("master_link_status") == "up"
                and int(info.get("master_port", 0)) == self._primary.port
            ):
                lag[node.name] = head - int(info["slave_repl_offset"])
        return lag

    def _in_sync(self) -> bool:
        """Every responsive replica follows the primary, its link is up and it has
        processed the primary's stream at least up to where it was at this call."""
        try:
            head = int(self._primary.info("replication")["master_repl_offset"])
        except redis.exceptions.RedisError:
            return False
        for node in self.replicas:
            if not node.responsive():
                continue
            try:
                info = node.info("replication")
            except redis.exceptions.RedisError:
                return False
            if (
                info.get("role") != "slave"
                or int(info.get("master_port", 0)) != self._primary.port
                or info.get("master_link_status") != "up"
                or int(info.get("slave_repl_offset", -1)) < head
            ):
                return False
        return True

    def wait_until_synced(self, timeout: float = 30.0) -> None:
        """Wait until every running replica replicates from ``primary``, with its link up
        and its offset caught up with the primary's."""
        _wait(self._in_sync, timeout, "replicas in sync with the primary", self.describe)

    def _ask_sentinels(self, question: Callable[[redis.Redis], T]) -> list[T | None]:
        """``question``'s answer from each responsive Sentinel (``None`` where it failed)."""
        answers: list[T | None] = []
        for sentinel in self.sentinels:
            if not sentinel.responsive():
                continue
            client = sentinel.client()
            try:
                answers.append(question(client))
            except redis.exceptions.RedisError:
                answers.append(None)
            finally:
                client.close()
        return answers

    def _sentinel_master(self, client: redis.Redis) -> dict[str, Any]:
        # execute_command: redis-py 6.4 (the floor) breaks sentinel_master() on a plain client
        return cast(dict[str, Any], client.execute_command("SENTINEL MASTER", self.service))

    def _sentinels_agree(self) -> bool:
        """Every responsive Sentinel names ``primary`` as the master (not down), lists
        every responsive replica (not down) and knows every other Sentinel."""
        expected_replicas = {node.address for node in self.replicas if node.responsive()}
        views = self._ask_sentinels(
            lambda client: (self._sentinel_master(client), client.sentinel_slaves(self.service))
        )
        for view in views:
            if view is None:
                return False
            master, listed = view
            if (master["ip"], int(master["port"])) != self._primary.address:
                return False
            if master.get("is_sdown") or master.get("is_odown") or master.get("is_failover_in_progress"):
                return False
            if int(master["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
            healthy = {
                (entry["ip"], int(entry["port"]))
                for entry in listed
                if not entry.get("is_sdown") and not entry.get("is_disconnected")
            }
            if not expected_replicas <= healthy:
                return False
        return True

    def wait_until_sentinels_agree(self, timeout: float = 30.0) -> None:
        """Wait until every running Sentinel knows the primary (up), every running replica
        and every other Sentinel."""
        _wait(self._sentinels_agree, timeout, "every Sentinel to know the whole topology", self.describe)

    def _reported_primaries(self) -> list[tuple[str, int]]:
        """The master address each responsive Sentinel reports."""
        answers = self._ask_sentinels(
            lambda client: cast(Any, client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.service))
        )
        return [(str(address[0]), int(address[1])) for address in answers if address]

    def sentinel_master_addresses(self) -> list[tuple[str, int]]:
        """The master's address in each responsive Sentinel's ``SENTINEL MASTER`` reply:
        what redis-py's ``Sentinel.discover_master`` reads. During a failover it is still
        the old primary's until the Sentinel switched (``+switch-master``), whereas
        ``GET-MASTER-ADDR-BY-NAME`` already names the replica being promoted."""
        return [
            (str(master["ip"]), int(master["port"]))
            for master in self._ask_sentinels(self._sentinel_master)
            if master is not None
        ]

    def current_primary(self) -> RedisNode:
        """The data node the first Sentinel that answers names as the primary."""
        reported = self._reported_primaries()
        if not reported:
            raise TopologyError(f"no Sentinel answered\n{self.describe()}")
        return self.node_at(reported[0])

    # -- faults -------------------------------------------------------------------------

    def kill_primary(self) -> RedisNode:
        """SIGKILL the primary; returns it (pass it to ``wait_for_failover``)."""
        old = self._primary
        old.kill()
        return old

    def orderly_failover(self) -> None:
        """``SENTINEL FAILOVER <service>`` on the first responsive Sentinel: it promotes a
        replica without agreement from the others and reconfigures the old primary as a
        replica of the new one."""
        sentinel = next(node for node in self.sentinels if node.responsive())
        client = sentinel.client()
        try:
            client.sentinel_failover(self.service)
        finally:
            client.close()

    def wait_for_failover(self, old: RedisNode, timeout: float = 30) -> RedisNode:
        """Wait until every responsive Sentinel names the same primary other than ``old``
        and that node answers ``ROLE`` as a master; it becomes ``primary``. Returns it."""

        def promoted() -> RedisNode | None:
            reported = set(self._reported_primaries())
            if len(reported) != 1 or old.address in reported:
                return None
            node = self.node_at(reported.pop())
            if not node.responsive():
                return None
            client = node.client()
            try:
                role = client.role()
            except redis.exceptions.RedisError:
                return None
            finally:
                client.close()
            return node if role[0] == "master" else None

        new = _wait(promoted, timeout, f"a new primary instead of {old.name}", self.describe)
        self._primary = new
        return new

    def restart(self, node: RedisNode, timeout: float = 30.0) -> None:
        """Start a killed node again. A data node starts empty as a replica of the primary
        Sentinel names now (what Sentinel would reconfigure it to); returns once it is in
        sync and every Sentinel lists it again. A Sentinel restarts from its configuration
        file (which it rewrote with what it had learnt) and is back when it agrees."""
        if node.alive():
            raise TopologyError(f"{node.name} is still running")
        if node.kind == "sentinel":
            node.start()
            self.wait_until_sentinels_agree(timeout)
            return
        self._primary = self.current_primary()
        if self._primary is node:
            raise TopologyError(f"Sentinel still names the stopped {node.name} as the primary")
        self._start_node(node, self._primary)
        self.wait_until_synced(timeout)
        self.wait_until_sentinels_agree(timeout)

    # -- Django -------------------------------------------------------------------------

    def django_cache(self, db: int = 0, **options: Any) -> dict[str, Any]:
        """A ``CACHES`` entry for this topology as django-redis documents Sentinel;
        ``options`` are added to (or replace) its ``OPTIONS``.

        django-redis keeps one connection pool per ``LOCATION`` per process (its
        ``ConnectionFactory._pools``): topologies used one after the other in one process
        need service names of their own, or a later one gets an earlier one's pool."""
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://{self.service}/{db}",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
                "SENTINELS": self.sentinel_addresses,
                **options,
            },
        }
