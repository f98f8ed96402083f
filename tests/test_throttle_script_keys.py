"""Every key a throttle script touches is one it was given in ``KEYS``.

Redis documents that a script must receive every key it accesses as an input key: Redis
Cluster routes the call by those keys, and a proxy or a server that enforces it (Redis
Cluster with another node owning the key's slot, Dragonfly, some managed services) refuses
the others. Redis 7.0 itself does not refuse an undeclared key on a node that owns its
slot: a single-node cluster that owns all 16384 slots ran a script writing an undeclared
key, and even one of another slot, without an error. So the check is behavioural and
exact instead: the scripts run on a ``redis-server`` of the test's own, started in
cluster mode (one node, every slot: the declared keys of one call must share a slot,
else ``CROSSSLOT``), and ``MONITOR`` records each command a script ran (``[0 lua]``
lines, each after the ``EVALSHA`` that ran it, from Redis 7); ``COMMAND GETKEYS`` tells
which of its arguments are keys, and each must be among that ``EVALSHA``'s keys.

The first version built each waiter's wake-list key inside the scripts; this test failed
on it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from task_workflow.throttle import RedisThrottleBackend, SlotGroup
from tests.workers import free_port

pytestmark = [pytest.mark.services]


def wait_for(condition, timeout: float = 10.0, message: str = "condition never held") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def _cluster_ok(client: redis.Redis) -> bool:
    try:
        return b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[int]:
    """The port of a ``redis-server`` of this module's own in cluster mode: one node that
    owns every slot, no persistence."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on the PATH")
    port, directory = cluster_port(), tempfile.mkdtemp(prefix="tw-cluster-")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=5)
    try:
        wait_for(lambda: _pings(client), message="own redis-server never answered")
        version = client.info("server")["redis_version"]
        if int(version.split(".")[0]) < 7:
            pytest.skip(f"MONITOR lists a script's commands after its EVALSHA from Redis 7 ({version})")
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: _cluster_ok(client), message="the one-node cluster never came up")
        yield port
    finally:
        client.close()
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def cluster_port() -> int:
    """A free port whose cluster bus port (``port + 10000``) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


# --- MONITOR's lines -----------------------------------------------------------------------

_LINE = re.compile(r"^\d+\.\d+ \[\d+ ([^\]]*)\] (.*)$", re.DOTALL)
_ARGUMENT = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}


def _unescape(text: str) -> bytes:
    """An argument as MONITOR quotes it (``sdscatrepr``), back to its bytes."""
    out, index = bytearray(), 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out += char.encode("latin-1")
            index += 1
        elif text[index + 1] == "x":
            out.append(int(text[index + 2 : index + 4], 16))
            index += 4
        else:
            out += _ESCAPES[text[index + 1]]
            index += 2
    return bytes(out)


@dataclass
class ScriptCall:
    """One ``EVALSHA`` as MONITOR saw it, and the commands its script ran."""

    declared: list[bytes]
    commands: list[list[bytes]] = field(default_factory=list)


class Recorder:
    """Reads MONITOR on a connection of its own, in a thread, until stopped."""

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port)  # no socket timeout: MONITOR may be quiet a while
        self.calls: list[ScriptCall] = []
        self.echoed: set[bytes] = set()
        self.error: BaseException | None = None
        self._monitor = self.client.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        connection = self._monitor.connection
        while True:
            try:
                raw = connection.read_response()
            except (redis.exceptions.ConnectionError, OSError, AttributeError):
                return  # stopped
            try:
                self._parse(raw)
            except BaseException as exc:
                self.error = exc
                return

    def _parse(self, raw: bytes | str) -> None:
        line = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        match = _LINE.match(line)
        if match is None:
            return
        source, rest = match.groups()
        arguments = [_unescape(text) for text in _ARGUMENT.findall(rest)]
        name = arguments[0].upper()
        if source != "lua" and name in (b"EVALSHA", b"EVAL"):
            count = int(arguments[2])
            self.calls.append(ScriptCall(declared=arguments[3 : 3 + count]))
        elif source == "lua":
            assert self.calls, f"a script command before any EVALSHA: {line}"
            self.calls[-1].commands.append(arguments)
        elif name == b"ECHO":
            self.echoed.add(arguments[1])

    def stop(self) -> None:
        """Stop reading once MONITOR has shown a last command: every earlier one is read."""
        marker = f"tw-monitor-end-{uuid.uuid4().hex}".encode()
        probe = redis.Redis(port=self.client.connection_pool.connection_kwargs["port"])
        probe.echo(marker)
        probe.close()
        wait_for(
            lambda: marker in self.echoed or self.error is not None,
            message="MONITOR never showed the end marker",
        )
        self._monitor.__exit__()
        self._thread.join(5)
        self.client.close()


def undeclared_keys(client: redis.Redis, calls: list[ScriptCall]) -> list[str]:
    """One line per command a script ran on a key it was not given."""
    found = []
    for call in calls:
        for command in call.commands:
            try:
                keys = client.command_getkeys(*command)
            except redis.exceptions.ResponseError:
                continue  # no key arguments (TIME, INFO)
            for key in keys:
                if isinstance(key, str):
                    key = key.encode("latin-1")
                if key not in call.declared:
                    declared = ", ".join(_short(declared) for declared in call.declared)
                    found.append(f"{command[0].decode()} {_short(key)} (KEYS: {declared})")
    return found


def _short(key: bytes) -> str:
    """A key without its prefix and hash tag: ``holders``, ``wake:B``."""
    return key.decode(errors="replace").rpartition("}:")[2]


def meta(group: SlotGroup) -> dict:
    return {"task_name": group.task_name, "key": group.key, "concurrency": 1}


class ShortClaims(RedisThrottleBackend):
    CLAIM_MS = 300


def run_every_path(backend: RedisThrottleBackend, group: SlotGroup) -> None:
    """Each script through each of its paths, as the throttle calls them."""
    m = meta(group)
    assert backend.acquire(group, "A", 1, 60.0, m).acquired  # a grant (the counter starts)
    assert backend.renew(group, "A", "", 60.0)  # a renewal
    assert not backend.acquire(group, "B", 1, 60.0, m).acquired  # refused: B joins the line
    assert not backend.acquire(group, "C", 1, 60.0, m).acquired  # C behind B
    assert not backend.acquire(group, "B", 1, 60.0, m).acquired  # attempts again, keeps its place
    assert backend.waiting(group) == ["B", "C"]
    assert backend.release(group, "A")  # a handoff to B
    handed = backend.wait_for_release(group, "B", 1.0)  # B woken by it
    assert handed is not None
    assert handed.handed_over
    assert backend.renew(group, "B", "", 60.0)  # extends the claim
    assert backend.release(group, "B")  # a handoff to C, which does not wait yet
    assert backend.acquire(group, "C", 1, 60.0, m).acquired  # C finds it by attempting
    assert not backend.acquire(group, "D", 1, 60.0, m).acquired
    assert backend.release(group, "C")  # a handoff to D ...
    late = backend.cancel_wait(group, "D")  # ... which gives up: it holds the slot
    assert late is not None
    assert not backend.acquire(group, "E", 1, 60.0, m).acquired
    assert backend.cancel_wait(group, "E") is None  # gives up with nothing handed
    assert not backend.acquire(group, "F", 1, 60.0, m).acquired
    assert backend.release(group, "D")  # handed to F, then force-released before F woke
    assert backend.release(group, "F")
    assert backend.wait_for_release(group, "F", 0.01) is None
    assert backend.acquire(group, "P", 1, 60.0, m).acquired
    for token in ("Q", "R"):
        assert not backend.acquire(group, token, 1, 60.0, m).acquired
    assert backend.release(group, "P")  # handed to Q
    assert backend.wait_for_release(group, "R", 0.05) is None  # R pops it and passes it on
    assert backend.wait_for_release(group, "Q", 0.05) is not None
    assert backend.release(group, "Q")  # handed to R
    assert backend.wait_for_release(group, "R", 0.05) is not None
    assert backend.release(group, "R")
    assert backend.acquire(group, "G", 1, 0.05, m).acquired  # a short lease that lapses
    time.sleep(0.1)
    assert not backend.renew(group, "G", "", 60.0)  # a renewal of a lapsed lease drops it
    assert backend.acquire(group, "H", 1, 0.05, m).acquired
    assert not backend.acquire(group, "I", 1, 60.0, m).acquired
    time.sleep(0.1)
    assert not backend.release(group, "H")  # an expired lease: its slot still goes to I
    assert backend.acquire(group, "I", 1, 60.0, m).acquired
    assert not backend.acquire(group, "J", 1, 60.0, m).acquired
    time.sleep(3.2)  # J stops attempting: no longer a waiter
    assert backend.release(group, "I")
    assert [slot.token for slot in backend.held_slots() if slot.group == group] == []


def test_each_script_touches_only_the_keys_it_is_given(cluster_node):
    client = redis.Redis(port=cluster_node, socket_timeout=5)
    recorder = Recorder(cluster_node)
    try:
        backend = RedisThrottleBackend(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
        run_every_path(backend, SlotGroup("tests.keys.plain", "region-1"))
        claims = ShortClaims(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
        group = SlotGroup("tests.keys.claims")
        assert claims.acquire(group, "H", 1, 60.0, meta(group)).acquired
        assert not claims.acquire(group, "W", 1, 60.0, meta(group)).acquired
        assert claims.release(group, "H")  # handed to W under a 300 ms claim it lets lapse
        time.sleep(0.4)
        assert claims.acquire(group, "X", 1, 60.0, meta(group)).acquired  # sweeps W's claim
        restarted = RedisThrottleBackend(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=3600)
        group = SlotGroup("tests.keys.grace")
        assert not restarted.acquire(group, "early", 1, 60.0, meta(group)).acquired  # within the grace
    finally:
        recorder.stop()
    try:
        assert recorder.error is None, f"could not read MONITOR: {recorder.error!r}"
        assert len(recorder.calls) >= 30, "MONITOR did not see the scripts run"
        assert sum(len(call.commands) for call in recorder.calls) > 100
        assert undeclared_keys(client, recorder.calls) == []
    finally:
        client.close()


def test_every_call_of_a_group_declares_keys_of_one_cluster_slot(cluster_node):
    """On a cluster node, each call's declared keys must share a hash slot (the group's
    hash tag), or the server refuses it (``CROSSSLOT``): the paths above run there."""
    client = redis.Redis(port=cluster_node, socket_timeout=5)
    try:
        backend = RedisThrottleBackend(client, f"tw-test:{uuid.uuid4().hex}:", restart_grace=0)
        group = SlotGroup("tests.keys.slots", "region-2")
        run_every_path(backend, group)
        slots = {client.execute_command("CLUSTER", "KEYSLOT", key) for key in backend._keys(group)}
        assert len(slots) == 1
    finally:
        client.close()
