"""Tasks per second through a real Celery worker: bare tasks vs ``@throttle``, ``@transition`` and both.

How to run (needs PostgreSQL on 127.0.0.1:5432, user postgres, and Redis on
127.0.0.1:6379, whose db 12 it FLUSHES)::

    .venv/bin/python benchmarks/end_to_end.py                 # 5 rounds x 2000 tasks per variant
    .venv/bin/python benchmarks/end_to_end.py --rounds 12 --tasks 800 --concurrency 6
    BENCH_REDIS_URL=redis://127.0.0.1:6379/9 .venv/bin/python benchmarks/end_to_end.py

**Workers.** One prefork worker per profile (``benchmarks/e2e_settings.py``, picked by
``BENCH_E2E_PROFILE``), all started at once, each on a queue of its own and with
``--concurrency 6`` (the issue's figures were taken that way; on 2 cores, 6 processes keep
the CPUs busy while some wait on PostgreSQL's commit or a Redis round trip), loading
``benchmarks/e2e_tasks.py``. The profiles set the database connection handling
explicitly, whatever the example settings say:

- *recommended* (docs/howto/production.md): the worker keeps its database connection across
  tasks (``CELERY_DB_REUSE_MAX = 1000``, ``CONN_MAX_AGE = 600``, ``CONN_HEALTH_CHECKS``), and
  ``example_project/celery.py`` runs ``close_old_connections()`` around each task (so each
  task's first use of the connection checks it: a ``SELECT 1`` of its own, or, for
  ``@transition``, its first statement);
- *default*: Celery's default: its Django fixup closes the connection before and after
  every task (``CELERY_DB_REUSE_MAX`` unset, ``CONN_MAX_AGE = 0``), so a task that touches
  the database connects again;
- *production*, only with ``--profiles ...,production``, informational: *recommended* plus
  the guide's broker settings ("Broker restarts": ``acks_late``, ``reject_on_worker_lost``,
  prefetch 1, a publish retry policy, the Redis transport options), so each task's
  message is acknowledged after its body and no message waits in a worker;
- *async-commit*, only with ``--profiles ...,async-commit``, for diagnosis: *recommended* with
  ``synchronous_commit = off`` on the worker's sessions, so a ``COMMIT`` does not wait for
  the WAL flush to disk (not a recommendation: it shows how much of a transition is the disk).

All use the Redis at ``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/12``, flushed at
the start; ``admin_listing.py`` flushes it too: run one at a time) as broker and throttle
store, no result backend, Celery's other defaults (prefetch 4, early acks), ``DEBUG`` off
and log level WARNING. The database is
``postgres://postgres@127.0.0.1:5432/task_workflow_bench_e2e`` (``DATABASE_URL``),
created when missing, migrated, and emptied of example instances and transition history
at the start. Each worker runs in a session of its own, is stopped (warm, then its process
group killed) when the script ends, fails or is interrupted (Ctrl-C, SIGTERM), and gets
SIGTERM from the kernel if this process dies first (``PR_SET_PDEATHSIG``).

**Variants** (empty bodies, so the difference is the decorators' work):

- ``bare``: ``@shared_task`` alone;
- ``throttle``: ``@throttle(concurrency=4)``, on 20 task names (20 slot groups; the group is
  (task name, key), so 20 names are 20 keys to the protocol), task *i* on group *i* mod 20;
- ``transition``: ``@transition(Instance, "begin_stopping")`` on a fresh ``online`` row per
  task (the rows are inserted before the round, untimed, and checked afterwards);
- ``both``: ``@throttle(concurrency=4)`` over ``@transition(...)``, 20 task names;
- ``throttle_key`` (informational): ``with throttle(key=f"k{i % 20}", concurrency=4)`` in the
  body, the context-manager form;
- ``orm_floor``: the transaction ``@transition`` makes, written by hand with the public ORM
  in a plain task (``select_for_update().get()``, the transition method,
  ``save(update_fields=...)``, ``TransitionRecord.objects.create(...)`` in one
  ``atomic()``), on fresh rows like ``transition``: what the work itself costs here, the
  floor of ``@transition`` (``benchmarks/transition.py`` compares the two in-process);
- ``throttle_floor``: the two store calls ``@throttle`` makes, through the public backend
  (``get_backend().acquire()`` and ``.release()``), 20 groups of 4 as ``throttle``, with no
  ``Lease``, lease renewer, signals or decorator: the floor of ``@throttle``.

With 6 processes and 20 groups of 4 slots a task never waits for a slot: the throttle
figures are its overhead, not throttling.

**Timing.** Each block sends ``--tasks`` tasks at once (``send_task`` in a loop on one
producer) and is timed from just before the first send until the worker counted the last
completion. Completions are counted without a result backend (which would add a ``SET`` and
a ``PUBLISH`` per task and a subscriber here) and without task events (three publishes per
task from the worker): the workers' ``task_postrun`` handler makes one ``EVAL`` on the
broker's Redis per task (``INCR`` the round's counter; at the round's total, ``RPUSH`` to a
list this script blocks on with ``BLPOP``). That call costs every variant alike (its client
round trip is printed). A round runs every (profile, variant) block once, the order rotated
each round; round 0 warms every pool process up and is discarded. Blocks are 2,000 tasks
by default (400 before): on a fast machine a block of 400 lasted 0.35 s, its start (the
producer sending while the worker runs) and its end (processes idling as the queue drains)
weighed on every figure, and one variant's per-round tasks/s spread 812-979 against 927-1,010
with 2,000 in the same session. tasks/s is
``tasks / seconds``; a variant's ratio is the median over rounds of its tasks/s over
``bare``'s in the same round and profile (paired, so a slow round weighs on both).

**No goals**: every ratio to a bare task is printed for information (the micro benchmarks
hold the goals), with each decorator's ratio to its floor measured in the same rounds. The
default profile's figures are printed beside the recommended one's, and how many PostgreSQL
sessions each variant started per task (``pg_stat_database.sessions``, read before and after
each block): about 1 per transition task in the default profile, 0 in the recommended one,
which shows the profiles took effect.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import harness

DEFAULT_DATABASE_URL = f"{harness.POSTGRES}/task_workflow_bench_e2e"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
#: Loaded from this directory (``harness.BENCH_DIR`` on the workers' ``PYTHONPATH``), not as
#: ``benchmarks.*``: with another copy of the library on ``PYTHONPATH`` (before/after
#: figures), its own ``benchmarks`` package would shadow these.
SETTINGS_MODULE = "e2e_settings"
TASKS_MODULE = "e2e_tasks"
PROFILES = ("recommended", "default")
#: ``production`` (informational: ``recommended`` with the guide's broker settings too) and
#: ``async-commit`` (for diagnosis) only when asked for: ``--profiles recommended,production``.
ALL_PROFILES = (*PROFILES, "production", "async-commit")
VARIANTS = ("bare", "throttle", "transition", "both", "throttle_key", "orm_floor", "throttle_floor")
LABELS = {
    "bare": "bare task",
    "throttle": "@throttle (20 groups x 4)",
    "transition": "@transition",
    "both": "@throttle + @transition",
    "throttle_key": "with throttle(key=..) (20 keys x 4)",
    "orm_floor": "@transition's transaction, by hand (ORM)",
    "throttle_floor": "@throttle's 2 store calls (backend)",
}
#: Ratio to bare, in the recommended profile.
TRANSITION_VARIANTS = ("transition", "both", "orm_floor")
NAME = "end_to_end"
#: Variant -> the informational variant that does only its round trips (its ceiling).
FLOORS = {"transition": "orm_floor", "throttle": "throttle_floor"}
#: Seconds without a counted completion after which a block is given up.
STALL_TIMEOUT = 30.0


# -- setup -----------------------------------------------------------------------------


def setup(database_url: str, redis_url: str) -> dict[str, str]:
    """Django on the benchmark database (created, migrated, emptied), Redis flushed; the
    workers' environment."""
    env = harness.setup_django(SETTINGS_MODULE, database_url=database_url, redis_url=redis_url)
    import redis
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE example_instance, task_workflow_transitionrecord")
        cursor.execute("VACUUM ANALYZE example_instance")
        cursor.execute("VACUUM ANALYZE task_workflow_transitionrecord")
    redis.Redis.from_url(redis_url).flushdb()
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """SIGTERM this (worker) process when the benchmark that started it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Worker:
    """One ``celery worker`` subprocess on its own queue, for one profile."""

    profile: str
    env: dict[str, str]
    concurrency: int
    queue: str = field(init=False)
    hostname: str = field(init=False)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    log: IO[bytes] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.queue = f"bench_e2e.{self.profile}"
        self.hostname = f"bench-e2e-{self.profile}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"

    def start(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "example_project", "worker", "--pool", "prefork"]
        command += ["--concurrency", str(self.concurrency), "-Q", self.queue, "-n", self.hostname]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]
        command += ["--include", TASKS_MODULE]
        env = {**os.environ, **self.env, "BENCH_E2E_PROFILE": self.profile}
        # A copy of the library on PYTHONPATH comes first, then this directory, then the checkout.
        path = [env.get("PYTHONPATH"), str(harness.BENCH_DIR), str(harness.ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open while the worker runs
            "w+b", prefix=f"bench-e2e-{self.profile}-", suffix=".log"
        )
        self.process = subprocess.Popen(
            command,
            # Not the checkout: `python -m` puts the working directory first on sys.path.
            cwd=tempfile.gettempdir(),
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pool children can be killed with it
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, app: Any, timeout: float = 90.0) -> None:
        """Return once the worker answers a ping (each ping waits up to 0.5 s for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            replies = app.control.ping(destination=[self.hostname], timeout=0.5) or []
            if any(self.hostname in reply for reply in replies):
                return
        raise RuntimeError(f"worker {self.hostname} did not answer a ping within {timeout}s:\n{self.tail()}")

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"worker {self.hostname} exited ({code}):\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the worker and its live pool processes."""
        assert self.process is not None
        return tree_cpu_seconds(self.process.pid)

    def tail(self, size: int = 4000) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:]

    def stop(self) -> None:
        """Warm shutdown; kill the worker's process group if it has not exited in 20 s."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process is not None:
            # Pool children that outlived their parent (none after a warm shutdown).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self.log is not None:
            self.log.close()
            self.log = None


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and its live descendants (``/proc``)."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # After "pid (comm)": state, ppid, ..., utime (14th field of the line), stime (15th).
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_workers(
    app: Any, env: dict[str, str], profiles: Sequence[str], concurrency: int
) -> Iterator[dict[str, Worker]]:
    """The profiles' workers, started at once and ready; always stopped afterwards (also on
    SIGTERM to this process, turned into ``SystemExit`` here)."""
    workers = {profile: Worker(profile, env, concurrency) for profile in profiles}

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for worker in workers.values():
            worker.start()
        for worker in workers.values():
            worker.wait_ready(app)
            # e2e_tasks prints which task_workflow the worker imported.
            marker = "e2e_tasks: "
            found = [line.split(marker, 1)[1] for line in worker.tail(100_000).splitlines() if marker in line]
            print(f"worker {worker.profile}: {found[-1] if found else 'task_workflow: (not in its log)'}")
        yield workers
    finally:
        for worker in workers.values():
            worker.stop()
        signal.signal(signal.SIGTERM, previous)


# -- one block ---------------------------------------------------------------------------


def make_rows(count: int) -> list[str]:
    """``count`` fresh ``online`` example instances (untimed); their uuids."""
    from example_project.models import Instance

    rows = [Instance(name="bench-e2e", state=Instance.States.ONLINE) for _ in range(count)]
    Instance.objects.bulk_create(rows)
    return [str(row.uuid) for row in rows]


def check_rows(uuids: list[str]) -> None:
    """Every row of the block left ``online`` for ``stopping`` (the transition ran)."""
    from example_project.models import Instance

    moved = Instance.objects.filter(uuid__in=uuids, state=Instance.States.STOPPING).count()
    if moved != len(uuids):
        raise RuntimeError(f"{len(uuids) - moved} of {len(uuids)} rows were not moved to stopping")


def sessions_started() -> int:
    """PostgreSQL sessions ever started on the benchmark database (``pg_stat_database``)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        (sessions,) = cursor.fetchone()
    return int(sessions)


@dataclass
class BlockResult:
    seconds: float  # first send -> last completion counted
    sessions: int  # PostgreSQL sessions started meanwhile
    cpu: float  # CPU seconds the worker (main process and pool) used meanwhile


def run_block(app: Any, client: Any, worker: Worker, variant: str, tasks: int, timeout: float) -> BlockResult:
    """Send ``tasks`` tasks of ``variant`` to ``worker`` at once and wait until the worker
    counted the last completion; the database sessions and worker CPU are read before and
    after, untimed."""
    from e2e_tasks import task_name

    rows = make_rows(tasks) if variant in TRANSITION_VARIANTS else None
    sessions_before = sessions_started()
    cpu_before = worker.cpu_seconds()
    subjects: list[Any] = rows if rows is not None else list(range(tasks))
    round_key = f"bench-e2e:round:{uuid.uuid4().hex}"
    done_key = f"{round_key}:done"
    names = [task_name(variant, i) for i in range(tasks)]
    deadline = time.monotonic() + timeout
    with app.producer_or_acquire() as producer:
        started = time.perf_counter()
        for i, name in enumerate(names):
            app.send_task(name, args=(subjects[i], round_key, tasks), queue=worker.queue, producer=producer)
        counted, progress_at = b"", time.monotonic()
        while True:
            # Blocks until the last completion is counted: this is the wait.
            if client.blpop([done_key], timeout=1) is not None:
                elapsed = time.perf_counter() - started
                break
            worker.check_alive()
            now, count = time.monotonic(), client.get(round_key)
            if count != counted:
                counted, progress_at = count, now
            if now > deadline or now - progress_at > STALL_TIMEOUT:
                raise RuntimeError(
                    f"{variant} on {worker.profile}: {int(count or 0)} of {tasks} tasks counted, none for "
                    f"{now - progress_at:.0f} s (was the broker's database flushed?):\n{worker.tail()}"
                )
    cpu = worker.cpu_seconds() - cpu_before
    failed = client.lrange(f"{round_key}:failed", 0, 4)
    client.delete(round_key, done_key, f"{round_key}:failed")
    if failed:
        raise RuntimeError(f"{variant} on {worker.profile}: tasks did not succeed, e.g. {failed}")
    if rows is not None:
        check_rows(rows)
    return BlockResult(elapsed, sessions_started() - sessions_before, cpu)


def count_call_us(client: Any, calls: int = 2000) -> float:
    """Median client-side microseconds of the workers' counting call (for scale)."""
    from e2e_tasks import count

    key = f"bench-e2e:count-probe:{uuid.uuid4().hex}"
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        count(client, key, 0, "SUCCESS", "")
        samples.append(time.perf_counter_ns() - start)
    client.delete(key)
    return statistics.median(samples) / 1000


# -- the run -----------------------------------------------------------------------------


def rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


def measure(
    rounds: int = 5,
    tasks: int = 2000,
    *,
    concurrency: int = 6,
    profiles: Sequence[str] = PROFILES,
    variants: Sequence[str] = VARIANTS,
    verbose: bool = True,
) -> None:
    """Run the benchmark; print its tables (``verbose``) and ``INFO`` lines."""
    variants = ["bare", *[v for v in variants if v != "bare"]]
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS_URL
    env = setup(database_url, redis_url)
    import redis

    from example_project.celery import app

    client = redis.Redis.from_url(redis_url)
    timeout = 60 + tasks / 20
    blocks = [(profile, variant) for variant in variants for profile in profiles]
    # rates[profile][variant][round] = tasks/s
    rates: dict[str, dict[str, list[float]]] = {p: {v: [] for v in variants} for p in profiles}
    sessions: dict[str, dict[str, int]] = {p: dict.fromkeys(variants, 0) for p in profiles}
    cpu_ms: dict[str, dict[str, list[float]]] = {p: {v: [] for v in variants} for p in profiles}
    say = print if verbose else (lambda *a, **k: None)
    say(
        f"end to end: {rounds} rounds (+1 warm-up) x {tasks} tasks per variant and profile; one prefork "
        f"worker per profile, {concurrency} processes, {os.cpu_count()} CPUs; broker {redis_url}"
    )
    with running_workers(app, env, profiles, concurrency) as workers:
        count_us = count_call_us(client)
        say(f"completion counting: one EVAL per task, {count_us:.0f} us per call from this process")
        for round_no in range(rounds + 1):
            line: dict[str, float] = {}
            for profile, variant in rotated(blocks, round_no):
                result = run_block(app, client, workers[profile], variant, tasks, timeout)
                line[f"{profile}/{variant}"] = tasks / result.seconds
                if round_no:
                    rates[profile][variant].append(tasks / result.seconds)
                    sessions[profile][variant] += result.sessions
                    cpu_ms[profile][variant].append(result.cpu * 1000 / tasks)
            label = "warm-up" if round_no == 0 else f"round {round_no}"
            for profile in profiles:
                cells = "  ".join(f"{v} {line[f'{profile}/{v}']:6.0f}" for v in variants)
                say(f"  {label:<8} {profile:<11} tasks/s: {cells}")
    report(rates, profiles, variants, say)
    say("\nPostgreSQL sessions started per task (pg_stat_database.sessions; the workers' and this script's):")
    for profile in profiles:
        cells = "  ".join(f"{v} {sessions[profile][v] / (tasks * rounds):.2f}" for v in variants)
        say(f"  {profile:<12} {cells}")
    say(
        "worker CPU ms per task (main process + pool, user + system; median over rounds; "
        "PostgreSQL's and Redis's not included):"
    )
    for profile in profiles:
        cells = "  ".join(f"{v} {statistics.median(cpu_ms[profile][v]):.2f}" for v in variants)
        say(f"  {profile:<12} {cells}")


def paired_ratio(rates: dict[str, list[float]], variant: str, reference: str = "bare") -> float:
    """The median over rounds of ``variant``'s tasks/s over ``reference``'s in that round."""
    return statistics.median(v / r for v, r in zip(rates[variant], rates[reference], strict=True))


def report(
    rates: dict[str, dict[str, list[float]]], profiles: Sequence[str], variants: Sequence[str], say: Any
) -> None:
    """The tables, and one ``INFO`` line per ratio (no goals: the micro benchmarks hold them)."""
    for profile in profiles:
        say(f"\n{profile} profile")
        say(f"  {'variant':<42}{'tasks/s':>8}{'min':>7}{'max':>7}{'x bare':>8}")
        for variant in variants:
            values = rates[profile][variant]
            ratio = paired_ratio(rates[profile], variant)
            say(
                f"  {LABELS[variant]:<42}{statistics.median(values):>8.0f}{min(values):>7.0f}"
                f"{max(values):>7.0f}{ratio:>8.2f}"
            )
        harness.info(NAME, f"{profile}: bare tasks/s", statistics.median(rates[profile]["bare"]))
        for variant in variants[1:]:
            harness.info(NAME, f"{profile}: {variant} / bare", paired_ratio(rates[profile], variant))
        # How close each decorator is to its floor, measured in the same rounds: this depends
        # far less on the machine than the ratio to a bare task.
        for variant, floor in FLOORS.items():
            if variant in rates[profile] and floor in rates[profile]:
                harness.info(
                    NAME, f"{profile}: {variant} / {floor}", paired_ratio(rates[profile], variant, floor)
                )
    if "recommended" in profiles and "default" in profiles:
        say("\nrecommended / default, tasks/s (median of per-round ratios):")
        for variant in variants:
            pairs = zip(rates["recommended"][variant], rates["default"][variant], strict=True)
            say(f"  {LABELS[variant]:<42}{statistics.median(r / d for r, d in pairs):>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (plus one warm-up)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per variant, profile and round")
    parser.add_argument("--concurrency", type=int, default=6, help="worker pool processes")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    profiles = args.profiles.split(",")
    variants = args.variants.split(",")
    for name in profiles:
        if name not in ALL_PROFILES:
            parser.error(f"unknown profile {name!r}")
    for name in variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}")
    measure(args.rounds, args.tasks, concurrency=args.concurrency, profiles=profiles, variants=variants)


if __name__ == "__main__":
    main()
