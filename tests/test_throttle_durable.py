"""The durable mode (``TASK_WORKFLOW['THROTTLE_REPLICAS']``) on a real primary and two
replicas that the tests start on ports of their own.

What must always hold:

- with N > 0, a call that grants, renews, releases or hands over a slot returns only once
  at least N replicas hold its effect (read on the replicas right after it returned);
  fewer acknowledgements within the timeout raise ``ReplicationNotAcknowledged`` (a store
  failure) after about that timeout, never later;
- with N > 0, the lost-write failover (replicas paused, a grant, the primary killed, a
  replica promoted) never leaves two callers that both believe they hold a limit-1 slot;
- in every mode, fencing tokens granted across that failover strictly increase (today's
  counter gave the promoted replica's grant the same token as the lost one);
- with N = 0 nothing is sent but the script: no ``WAIT``, no extra command.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import task_workflow.throttle as throttle_module
from task_workflow.conf import get_setting
from task_workflow.tasks import throttle
from task_workflow.throttle import RedisThrottleBackend, SlotGroup, ThrottleUnavailable
from task_workflow.throttle.errors import ReplicationNotAcknowledged
from tests.faults.proxy import ProxyControl, ProxyProcess, RouteSpec
from tests.waiting import wait_until
from tests.workers import ARTIFACTS_DIR, ROOT, free_port, log_tail

pytestmark = [pytest.mark.services]

#: WAIT's timeout in these tests, seconds.
REPLICAS_TIMEOUT = 0.3


@dataclass
class Node:
    """One ``redis-server`` process of the topology."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self) -> redis.Redis:
        """A client that fails at once (no retries) when the server is down or paused."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=1,
            socket_timeout=3,
            retry=Retry(NoBackoff(), 0),
        )

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


#: Seconds the replication stream is held back on a lagging link: longer than any test.
LAG = 3600.0


@dataclass
class ReplicatedRedis:
    """A primary and ``replicas_count`` replicas (no persistence), each on a free port,
    data and logs under ``workdir``; :meth:`stop` kills every process (also a paused one).

    Each replica reaches the primary through a route of a TCP proxy of its own
    (``tests/faults/proxy.py``), so a test can make the replicas lag: :meth:`lag` holds
    back what the primary sends them (their acknowledgements still flow), and :meth:`cut`
    closes the links, dropping what was held, as a crashed primary's unsent replication
    stream is lost. (A SIGSTOPped replica loses nothing: the primary's stream waits in the
    replica's socket buffer and is applied when it resumes.)
    """

    workdir: Path
    replicas_count: int = 2
    primary: Node = field(init=False)
    replicas: list[Node] = field(init=False, default_factory=list)
    clients: list[redis.Redis] = field(init=False, default_factory=list)
    proxy: ProxyProcess | None = field(init=False, default=None)
    links: ProxyControl | None = field(init=False, default=None)

    def _spawn(self, name: str, *args: str) -> Node:
        port = free_port()
        directory = self.workdir / name
        directory.mkdir()
        log_path = ARTIFACTS_DIR / f"redis-durable-{name}-{port}.log"
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(directory), "--repl-diskless-sync", "no", *args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        node = Node(name, port, process, log_path)
        if name == "primary":
            self.primary = node
        else:
            self.replicas.append(node)
        wait_until(lambda: node.process.poll() is not None or _pings(node), 10, f"{name} answering PING")
        if node.process.poll() is not None:
            pytest.fail(f"redis-server {name} exited:\n{log_tail(log_path)}")
        return node

    def start(self) -> ReplicatedRedis:
        self._spawn("primary")
        routes = [
            RouteSpec(f"replica{number}", ("127.0.0.1", free_port()), ("127.0.0.1", self.primary.port))
            for number in range(1, self.replicas_count + 1)
        ]
        self.proxy = ProxyProcess(
            routes,
            self.workdir / "proxy.sock",
            ARTIFACTS_DIR / f"proxy-durable-{self.primary.port}.log",
            ROOT,
        )
        self.links = self.proxy.start()
        for route in routes:
            self._spawn(route.name, "--replicaof", route.listen[0], str(route.listen[1]))
        self.wait_in_sync(self.primary, self.replicas_count)
        return self

    def lag(self) -> None:
        """Hold back everything the primary sends its replicas from now on."""
        assert self.links is not None
        for node in self.replicas:
            self.links.set_delay(node.name, up=0.0, down=LAG)

    def cut(self) -> None:
        """Close the replication links; what :meth:`lag` held back is lost."""
        assert self.links is not None
        for node in self.replicas:
            self.links.drop(node.name)

    def client(self, node: Node) -> redis.Redis:
        client = node.client()
        self.clients.append(client)
        return client

    def wait_in_sync(self, primary: Node, replicas: int) -> None:
        """Until ``primary`` has ``replicas`` online replicas that acknowledged every write."""
        client = self.client(primary)

        def in_sync() -> bool:
            info = client.info("replication")
            links = [info[f"slave{n}"] for n in range(info["connected_slaves"])]
            online = [link for link in links if link["state"] == "online"]
            return len(online) >= replicas and all(
                link["offset"] == info["master_repl_offset"] for link in online
            )

        wait_until(in_sync, 30, f"{replicas} replicas of port {primary.port} in sync")

    def promote(self, new_primary: Node) -> None:
        """``REPLICAOF NO ONE`` on ``new_primary``, every other live replica follows it
        (what Sentinel does, by hand)."""
        self.client(new_primary).replicaof("NO", "ONE")
        followers = [
            node for node in self.replicas if node is not new_primary and node.process.poll() is None
        ]
        for node in followers:
            self.client(node).replicaof("127.0.0.1", new_primary.port)
        self.wait_in_sync(new_primary, len(followers))

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for node in [getattr(self, "primary", None), *self.replicas]:
            if node is not None:
                node.kill()
        if self.proxy is not None:
            self.proxy.stop()


def _pings(node: Node) -> bool:
    client = node.client()
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture
def topology() -> Iterator[ReplicatedRedis]:
    """A primary and two replicas of this test's own."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on the PATH")
    workdir = Path(tempfile.mkdtemp(prefix="tw-durable-"))
    replicated = ReplicatedRedis(workdir)
    try:
        yield replicated.start()
    finally:
        replicated.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_backends() -> Iterator[None]:
    throttle_module._backends.clear()
    yield
    throttle_module._backends.clear()


def durable_backend(client: redis.Redis, replicas: int, prefix: str = "tw:") -> RedisThrottleBackend:
    return RedisThrottleBackend(
        client, prefix, restart_grace=0, replicas=replicas, replicas_timeout=REPLICAS_TIMEOUT
    )


def meta(group: SlotGroup) -> dict[str, Any]:
    return {"task_name": group.task_name, "key": group.key, "concurrency": 1}


def new_group() -> SlotGroup:
    return SlotGroup(f"tests.durable.{uuid.uuid4().hex[:12]}")


def holder_deadline(client: redis.Redis, backend: RedisThrottleBackend, group: SlotGroup, token: str) -> Any:
    """``token``'s lease deadline in the group's holders on ``client``'s server (``None``
    when it holds no slot there)."""
    return client.zscore(backend._keys(group)[0], token)


def replicas_holding(
    topology: ReplicatedRedis, backend: RedisThrottleBackend, group: SlotGroup, token: str, deadline: Any
) -> int:
    """How many replicas hold ``token``'s slot with exactly that lease deadline (``None``:
    hold no slot for it), read right now."""
    return sum(
        holder_deadline(topology.client(node), backend, group, token) == deadline
        for node in topology.replicas
    )


# --- Healthy replicas: every effect is on N replicas when the call returns -------------


@pytest.mark.parametrize("replicas", [1, 2])
def test_every_grant_renewal_handoff_and_release_is_on_n_replicas_when_it_returns(
    topology: ReplicatedRedis, replicas: int
) -> None:
    primary = topology.client(topology.primary)
    backend = durable_backend(primary, replicas)
    assert backend.confirms_handoffs
    for round_number in range(20):
        group = new_group()
        granted = backend.acquire(group, "first", 1, 30.0, meta(group))
        assert granted.acquired
        assert granted.fencing_token > 0
        deadline = holder_deadline(primary, backend, group, "first")
        assert replicas_holding(topology, backend, group, "first", deadline) >= replicas

        assert backend.renew(group, "first", "", 40.0)
        deadline = holder_deadline(primary, backend, group, "first")
        assert replicas_holding(topology, backend, group, "first", deadline) >= replicas

        # A waiter, handed the slot by the release, takes it when it gives up waiting.
        assert not backend.acquire(group, "second", 1, 30.0, meta(group)).acquired
        assert backend.release(group, "first")
        assert replicas_holding(topology, backend, group, "first", None) >= replicas
        handed = backend.cancel_wait(group, "second")
        assert handed is not None
        assert handed.fencing_token > granted.fencing_token, round_number
        deadline = holder_deadline(primary, backend, group, "second")
        assert deadline is not None
        assert replicas_holding(topology, backend, group, "second", deadline) >= replicas

        assert backend.release(group, "second")
        assert replicas_holding(topology, backend, group, "second", None) >= replicas


def test_with_one_replica_paused_mode_1_grants_and_mode_2_does_not(topology: ReplicatedRedis) -> None:
    """Acknowledged by one replica of two: enough for N = 1, a store failure for N = 2."""
    primary = topology.client(topology.primary)
    topology.replicas[0].pause()
    try:
        group = new_group()
        assert durable_backend(primary, 1).acquire(group, "one", 1, 30.0, meta(group)).acquired
        assert durable_backend(primary, 1).release(group, "one")
        with pytest.raises(ReplicationNotAcknowledged, match="1 of 2 required replicas"):
            durable_backend(primary, 2).acquire(group, "two", 1, 30.0, meta(group))
    finally:
        topology.replicas[0].resume()


# --- Replicas that do not acknowledge: a store failure after about the timeout ---------


def test_with_every_replica_paused_each_write_raises_after_about_the_timeout(
    topology: ReplicatedRedis,
) -> None:
    primary = topology.client(topology.primary)
    backend = durable_backend(primary, 1)
    group = new_group()
    assert backend.acquire(group, "holder", 1, 30.0, meta(group)).acquired
    for node in topology.replicas:
        node.pause()
    try:
        calls = {
            "grant": lambda: backend.acquire(group, "late", 2, 30.0, meta(group)),
            "renewal": lambda: backend.renew(group, "holder", "", 30.0),
            "release": lambda: backend.release(group, "holder"),
        }
        for operation, call in calls.items():
            started = time.monotonic()
            with pytest.raises(ReplicationNotAcknowledged) as raised:
                call()
            elapsed = time.monotonic() - started
            assert raised.value.operation == operation
            assert raised.value.acknowledged == 0
            assert raised.value.required == 1
            assert REPLICAS_TIMEOUT * 0.9 <= elapsed < REPLICAS_TIMEOUT + 1.0, (operation, elapsed)
        # A refusal registers a waiter only: no failure, whatever the replicas.
        refused = backend.acquire(group, "refused", 1, 30.0, meta(group))
        assert not refused.acquired
    finally:
        for node in topology.replicas:
            node.resume()


def test_a_grant_the_replicas_did_not_acknowledge_fails_closed_and_is_given_back(
    topology: ReplicatedRedis,
) -> None:
    """Through the public API: the caller is told the store failed (it never believes),
    and once the replicas are back the slot is free again, long before its lease lapses.

    The give-back is the limiter's (design point 3): the backend only raises."""
    primary = topology.client(topology.primary)
    backend = durable_backend(primary, 1)
    throttle_module._backends[(os.getpid(), get_setting("CACHE"))] = backend
    name = f"tests.durable.{uuid.uuid4().hex[:12]}"
    group = SlotGroup(name)
    for node in topology.replicas:
        node.pause()
    try:
        started = time.monotonic()
        with (
            pytest.raises(ThrottleUnavailable, match="replicas acknowledged"),
            throttle(name=name, ttl=60, wait=0),
        ):
            pytest.fail("ran on a grant no replica acknowledged")
        assert time.monotonic() - started < 5
    finally:
        for node in topology.replicas:
            node.resume()
    wait_until(lambda: not primary.zcard(backend._keys(group)[0]), 10, "the unacknowledged grant given back")
    with throttle(name=name, ttl=60, wait=0) as lease:
        assert lease.fencing_token > 0


# --- The lost-write failover ----------------------------------------------------------


@dataclass
class Believer:
    """A caller whose acquire returned a grant (it believes it holds the slot)."""

    name: str
    fencing_token: int


@pytest.mark.parametrize("replicas", [0, 1])
def test_lost_write_failover_never_two_believers_in_durable_mode_and_tokens_increase(
    topology: ReplicatedRedis, replicas: int
) -> None:
    """The issue's sequence: a grant the replicas have not got (their links lag), the
    primary SIGKILLed, a replica promoted, a second caller asks. With N = 1 the first caller never believed
    (its grant raised); with N = 0 both believe (what mode 0 allows, documented), and the
    fencing token tells them apart: the promoted replica's token is above the lost one."""
    group = new_group()
    primary = topology.client(topology.primary)
    backend = durable_backend(primary, replicas)
    # The group's counter reaches the replicas with an earlier grant (the case: the
    # restart grace cannot apply, the new primary has a counter).
    warm_up = backend.acquire(group, "earlier", 1, 30.0, meta(group))
    assert warm_up.acquired
    assert backend.release(group, "earlier")
    topology.wait_in_sync(topology.primary, 2)

    believers: list[Believer] = []
    topology.lag()
    try:
        first = backend.acquire(group, "A", 1, 60.0, meta(group))
    except ReplicationNotAcknowledged:
        assert replicas > 0
    else:
        assert first.acquired
        believers.append(Believer("A", first.fencing_token))
    topology.primary.kill()
    topology.cut()
    new_primary = topology.replicas[0]
    topology.promote(new_primary)
    promoted = durable_backend(topology.client(new_primary), replicas)

    def second_granted() -> Believer | None:
        try:
            result = promoted.acquire(group, "B", 1, 60.0, meta(group))
        except ReplicationNotAcknowledged:
            return None  # the follower is still syncing; B asks again (its own slot)
        return Believer("B", result.fencing_token) if result.acquired else None

    believers.append(wait_until(second_granted, 10, "a grant on the promoted replica"))

    tokens = [warm_up.fencing_token] + [believer.fencing_token for believer in believers]
    assert tokens == sorted(set(tokens)), f"fencing tokens repeat or go back across the failover: {believers}"
    if replicas:
        assert [believer.name for believer in believers] == ["B"], believers
    else:
        assert [believer.name for believer in believers] == ["A", "B"], believers


# --- Mode 0 sends nothing more; mode N one WAIT per call, no SCRIPT EXISTS ------------


def commands_sent(topology: ReplicatedRedis, work: Callable[[], None]) -> list[str]:
    """The names of the commands clients sent the primary while ``work`` ran, in order
    (``MONITOR``; the commands scripts ran are left out)."""
    marker = f"end-of-work-{uuid.uuid4().hex}"
    sent: list[str] = []
    marker_client = topology.client(topology.primary)
    marker_client.ping()  # connected (HELLO, CLIENT SETINFO) before the monitor starts
    with topology.client(topology.primary).monitor() as monitor:
        work()
        marker_client.echo(marker)
        while True:
            command = monitor.next_command()
            if command["client_type"] == "lua":
                continue
            if marker in command["command"]:
                return sent
            sent.append(command["command"].split(" ", 1)[0].upper())


def one_of_each(backend: RedisThrottleBackend) -> None:
    """Five script calls: grant, refusal, renewal, release (a handoff), cancel (handed)."""
    group = new_group()
    assert backend.acquire(group, "first", 1, 30.0, meta(group)).acquired
    assert not backend.acquire(group, "second", 1, 30.0, meta(group)).acquired
    assert backend.renew(group, "first", "", 30.0)
    assert backend.release(group, "first")
    assert backend.cancel_wait(group, "second") is not None


def test_mode_0_sends_the_script_alone_and_mode_n_one_wait_with_it(topology: ReplicatedRedis) -> None:
    """Mode 0 costs nothing: one EVALSHA per call, as before the durable mode. Mode N adds
    one WAIT per call (in the same round trip) and no SCRIPT EXISTS."""
    primary = topology.client(topology.primary)
    one_of_each(durable_backend(primary, 0))  # the scripts are loaded
    assert commands_sent(topology, lambda: one_of_each(durable_backend(primary, 0))) == ["EVALSHA"] * 5
    assert (
        commands_sent(topology, lambda: one_of_each(durable_backend(primary, 1))) == ["EVALSHA", "WAIT"] * 5
    )


def test_durable_mode_loads_its_scripts_on_a_server_that_does_not_know_them(
    topology: ReplicatedRedis,
) -> None:
    """A promoted replica or a restarted server answers NOSCRIPT: the script is loaded and
    the call goes through, acknowledged."""
    primary = topology.client(topology.primary)
    primary.script_flush()
    backend = durable_backend(primary, 2)
    group = new_group()
    assert backend.acquire(group, "holder", 1, 30.0, meta(group)).acquired
    deadline = holder_deadline(primary, backend, group, "holder")
    assert replicas_holding(topology, backend, group, "holder", deadline) == 2


@pytest.mark.parametrize("replicas", [0, 1])
def test_a_refusal_inside_the_restart_grace_says_so_in_every_mode(
    topology: ReplicatedRedis, replicas: int
) -> None:
    """The acquire script's ``[-1 - ms, "grace"]`` reply, on the direct and on the
    pipelined (WAIT) path: refused, with the grace's remaining time and the reason."""
    primary = topology.client(topology.primary)
    backend = RedisThrottleBackend(primary, "tw:", restart_grace=30.0, replicas=replicas)
    group = new_group()
    refused = backend.acquire(group, "early", 1, 30.0, meta(group))
    assert not refused.acquired
    assert refused.reason == "restart grace"
    assert refused.retry_after is not None
    assert 25 < refused.retry_after <= 31
