"""Network namespaces for the fault campaign: a services namespace and test hosts.

Layout of one run (``<id>`` is a short random hex id, so parallel runs never clash)::

    twf-svc-<id>   br-redis 10.77.0.1/24   br-db 10.78.0.1/24   (Redis, proxy sockets)
       |  veth twf<id>a<i> <-> twf<id>b<i>  (host i's Redis link, enslaved to br-redis)
       |  veth twf<id>c<i> <-> twf<id>d<i>  (host i's database link, enslaved to br-db)
    twf-h<i>-<id>  10.77.0.(10+i)/24 and 10.78.0.(10+i)/24, no default route

Each host has two links, so that cutting a host off from Redis (its Redis link down)
leaves its path to PostgreSQL up: the fault is "cut off from Redis", not "cut off".
The hosts have no route but their two subnets, so nothing they send leaves the run's
namespaces. Everything needs root and iproute2.

Runs register in ``RUNS_DIR/<id>`` (the owner's pid and start time, and the pids of the
processes they started outside a namespace), so a later run can tell the leftovers of a
crashed run (owner gone) from a run in progress, and remove only the former. The registry
is one directory for the whole machine, like the namespaces it describes; and a run counts
as in progress also while a process in its namespaces is still the child of the campaign
that started it (``TWF_PARENT_PID``), so a run registered elsewhere (an older checkout) is
not taken for leftovers either.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: ``setns(2)`` flag for a network namespace.
CLONE_NEWNET = 0x40000000

NETNS_DIR = Path("/var/run/netns")

#: Where runs register themselves (owner pid, started pids): beside the namespaces, on the
#: same tmpfs, for the whole machine. Not under ``$TMPDIR``: nox gives every session a
#: TMPDIR of its own, and two campaigns of parallel sessions then could not see each other's
#: registration: the later one removed the earlier one's namespaces as a crashed run's,
#: SIGKILLing its Redis and holders mid-run (which then timed out waiting for holds).
RUNS_DIR = NETNS_DIR.parent / "twf-runs"

#: Namespace names of a run: ``twf-svc-<id>`` and ``twf-h<i>-<id>``.
NAMESPACE_PATTERN = re.compile(r"^twf-(?:svc|h\d+)-(?P<id>[0-9a-f]{6})$")

REDIS_SUBNET = "10.77.0"
DB_SUBNET = "10.78.0"
#: The services namespace's addresses on its two bridges.
SERVICES_REDIS_ADDRESS = f"{REDIS_SUBNET}.1"
SERVICES_DB_ADDRESS = f"{DB_SUBNET}.1"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip <args>`` and return its output; raise ``NetnsError`` with stderr on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def new_run_id() -> str:
    return secrets.token_hex(3)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def entered(namespace: str | None) -> Iterator[None]:
    """Run the block in network namespace ``namespace`` (``None``: stay where we are).

    ``setns`` switches the calling *thread* only; sockets created inside the block belong
    to ``namespace`` for their whole life, whichever thread uses them later. Python 3.11
    has no ``os.setns``, hence ctypes.
    """
    if namespace is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / namespace, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def socket_in(namespace: str | None) -> socket.socket:
    """A new TCP socket of namespace ``namespace``."""
    with entered(namespace):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def connect_in(namespace: str | None, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to ``address`` made from inside ``namespace``."""
    sock = socket_in(namespace)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


# -- run registry -------------------------------------------------------------------

#: ``prctl(2)`` option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1

#: Environment variable: the pid of the campaign that started a child process.
PARENT_ENV = "TWF_PARENT_PID"


def die_with_parent() -> None:
    """SIGKILL this process when the campaign that started it (``$TWF_PARENT_PID``) dies,
    so a campaign killed without its clean-up leaves no process looping on; exits at once
    if that parent is already gone. (``ip netns exec`` and ``unshare`` exec, so the
    campaign is the direct parent.)"""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the next run's clean-up removes leftovers anyway
    if os.getppid() != int(parent):
        os._exit(1)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str) -> bool:
    return _start_time(pid) == start_time


@dataclass
class RunRegistry:
    """``RUNS_DIR/<run_id>``: who owns the run and which processes it started."""

    run_id: str
    path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.path = RUNS_DIR / self.run_id

    def claim(self) -> None:
        """Register this process as the run's owner. The directory appears with its owner
        file in it (renamed into place), so another run's clean-up never sees a run
        without an owner that is only starting."""
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.run_id}-", dir=RUNS_DIR))
        pid = os.getpid()
        (staging / "owner").write_text(f"{pid} {_start_time(pid)}\n")
        staging.rename(self.path)

    def add_pid(self, pid: int) -> None:
        """Remember a process started outside the run's namespaces (killed with the run)."""
        start = _start_time(pid)
        if start is not None:
            with (self.path / "pids").open("a") as pids:
                pids.write(f"{pid} {start}\n")

    def owner_alive(self) -> bool:
        try:
            pid, start = (self.path / "owner").read_text().split()
        except (OSError, ValueError):
            return False
        return _alive(int(pid), start)

    def kill_started(self) -> None:
        """SIGKILL the registered processes that still run (same pid *and* start time)."""
        try:
            lines = (self.path / "pids").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            pid, start = line.split()
            if _alive(int(pid), start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def run_namespaces(run_id: str) -> list[str]:
    """The namespaces of ``run_id`` that exist now."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return [name for name in names if (m := NAMESPACE_PATTERN.match(name)) and m["id"] == run_id]


def delete_namespace(name: str) -> None:
    """SIGKILL every process inside namespace ``name`` (all started by a run of ours),
    then delete it; its veth ends go with it, and so do their peers."""
    for pid in ip("netns", "pids", name, check=False).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "delete", name, check=False)


def _parent_env(pid: int) -> str | None:
    """``$TWF_PARENT_PID`` of process ``pid``, or ``None``."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{PARENT_ENV}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def _parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (field 4 of /proc/<pid>/stat), or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def campaign_runs_in(namespace: str) -> bool:
    """Whether a process in ``namespace`` is still the child of the campaign that started
    it (its ``$TWF_PARENT_PID``): that campaign is alive. Once a campaign dies its holders
    die with it (``die_with_parent``) and its Redis is orphaned (another parent), so a
    crashed run's namespaces hold no such process."""
    for field_ in ip("netns", "pids", namespace, check=False).split():
        pid = int(field_)
        parent = _parent_env(pid)
        if parent is not None and parent.isdigit() and _parent_pid(pid) == int(parent) > 1:
            return True
    return False


def run_alive(run_id: str) -> bool:
    """Whether run ``run_id`` is in progress: its registered owner runs, or a process in
    one of its namespaces is a child of its campaign (a run registered where this one does
    not look: a campaign of an older checkout, or one that has not registered here)."""
    if RunRegistry(run_id).owner_alive():
        return True
    return any(campaign_runs_in(name) for name in run_namespaces(run_id))


def stale_run_ids() -> set[str]:
    """Ids of runs that are not in progress (``run_alive``): registered runs, and
    namespaces of ours without a registration (a run registers before it creates anything,
    so those are leftovers of a run whose registration was removed, or of a run registered
    elsewhere whose campaign runs no process in them any more)."""
    ids = {p.name for p in RUNS_DIR.iterdir() if not p.name.startswith(".")} if RUNS_DIR.is_dir() else set()
    for line in ip("netns", "list").splitlines():
        if line.strip() and (m := NAMESPACE_PATTERN.match(line.split()[0])):
            ids.add(m["id"])
    return {run_id for run_id in ids if not run_alive(run_id)}


def cleanup_stale_runs() -> list[str]:
    """Remove the namespaces and processes of crashed earlier runs; return their ids.

    Their databases are the campaign's business (``campaign.drop_stale_databases``).
    """
    stale = sorted(stale_run_ids())
    for run_id in stale:
        registry = RunRegistry(run_id)
        registry.kill_started()
        for name in run_namespaces(run_id):
            delete_namespace(name)
        registry.remove()
    return stale


# -- topology -----------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One test host: a namespace with a link to each bridge of the services namespace."""

    index: int
    run_id: str

    @property
    def namespace(self) -> str:
        return f"twf-h{self.index}-{self.run_id}"

    @property
    def hostname(self) -> str:
        """What ``socket.gethostname()`` returns in the host's holders."""
        return f"faults-host-{self.index}"

    @property
    def redis_address(self) -> str:
        return f"{REDIS_SUBNET}.{10 + self.index}"

    @property
    def db_address(self) -> str:
        return f"{DB_SUBNET}.{10 + self.index}"

    # veth ends (<= 15 characters): a/b the Redis link, c/d the database link; the
    # first of each pair is in the host, the second in the services namespace.
    @property
    def redis_link(self) -> tuple[str, str]:
        return f"twf{self.run_id}a{self.index}", f"twf{self.run_id}b{self.index}"

    @property
    def db_link(self) -> tuple[str, str]:
        return f"twf{self.run_id}c{self.index}", f"twf{self.run_id}d{self.index}"

    def command(self, *argv: str) -> list[str]:
        """``argv`` run in this host's namespace and a UTS namespace of its own (the
        process sets its host name itself, see ``holder.py``)."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--", *argv]


@dataclass
class Topology:
    """The namespaces, bridges and links of one run."""

    run_id: str
    host_count: int = 3
    hosts: list[Host] = field(init=False)

    def __post_init__(self) -> None:
        self.hosts = [Host(i, self.run_id) for i in range(self.host_count)]

    @property
    def services(self) -> str:
        return f"twf-svc-{self.run_id}"

    def create(self) -> Topology:
        """Create everything; on failure remove what was created and re-raise."""
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def _create(self) -> None:
        svc = self.services
        ip("netns", "add", svc)
        ip("-n", svc, "link", "set", "lo", "up")
        for bridge, address in (("br-redis", SERVICES_REDIS_ADDRESS), ("br-db", SERVICES_DB_ADDRESS)):
            ip("-n", svc, "link", "add", bridge, "type", "bridge")
            ip("-n", svc, "addr", "add", f"{address}/24", "dev", bridge)
            ip("-n", svc, "link", "set", bridge, "up")
        for host in self.hosts:
            ns = host.namespace
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            for (inner, outer), bridge, address in (
                (host.redis_link, "br-redis", host.redis_address),
                (host.db_link, "br-db", host.db_address),
            ):
                # Created straight in the two namespaces: never visible in the root one.
                ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", svc)
                ip("-n", svc, "link", "set", outer, "master", bridge)
                ip("-n", svc, "link", "set", outer, "up")
                ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")

    def destroy(self) -> None:
        """Delete the run's namespaces (killing what still runs inside them)."""
        for name in run_namespaces(self.run_id):
            delete_namespace(name)

    def cut_redis(self, host: Host) -> None:
        """Take the services end of the host's Redis link down: the host's packets to Redis
        are dropped (its end only loses carrier and keeps its route, so connections stall
        instead of failing at once, like a real partition)."""
        ip("-n", self.services, "link", "set", host.redis_link[1], "down")

    def restore_redis(self, host: Host) -> None:
        ip("-n", self.services, "link", "set", host.redis_link[1], "up")
