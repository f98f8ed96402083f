"""The broker-restart scenario, shared by the test and ``tests/campaigns/test_broker_restart_long.py``.

For each profile (``tests.brokers.profiles``) on one broker: a worker of its own
(prefork, 2 processes, the profile's settings, its own queue and, on Redis, its own
database), ``plain`` plain tasks and ``chains`` transition chains (``begin_update`` with a
``finish_update`` link) on ``Volume`` rows, every task id chosen up front. Once every
profile has finished ``restart_after`` tasks (and, if it comes within a second or two, is
in the middle of a transition chain's first step), the broker is killed (SIGKILL; with
``graceful=True`` stopped cleanly instead), stays down ``downtime`` seconds and starts
again on the same data. Then the scenario waits, polling PostgreSQL and the broker
against a deadline, until each profile *settled*; meanwhile it starts a new worker in
place of one that exited, as a process supervisor would (counted as a worker exit):

- every task id finished (a ``done`` row), or
- nothing is left anywhere: its queue is empty, its worker has no active or reserved
  task, and no message waits for the Redis visibility timeout, unless that timeout is
  beyond the deadline (Celery's default: an hour), in which case such messages are
  counted as *parked*. Seen twice in a row, so that a publish in flight between two
  looks cannot be missed.

Counts per profile: task ids sent (link callbacks included), completed, lost (never
finished), parked (part of lost), duplicate body runs (at least once means some), failed
executions (a redelivered transition refused because the entity moved on, a link callback
that could not be published), chains that ended in ``ok`` with each transition recorded
exactly once, and worker exits.

Needs Django set up on the database the workers use (the test database in pytest).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import Celery
from kombu.exceptions import ChannelError

from tests.brokers import profiles, tasks
from tests.workers import WorkerProcess, start_workers, stop_workers

#: Seconds between looks at PostgreSQL while waiting for the moment to restart.
TRIGGER_POLL = 0.02
#: Seconds between looks while waiting for the profiles to settle.
SETTLE_POLL = 0.25
#: Seconds the trigger waits, after enough tasks finished, for a chain step to be running.
CHAIN_STEP_WAIT = 2.0
#: A worker's log line for a message it took from the broker: ``Task name[id] received``.
RECEIVED = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] received")


class Broker(Protocol):
    """What the scenario needs of ``servers.BrokerRedis`` and ``servers.RabbitMQNode``."""

    kind: str

    @property
    def description(self) -> str: ...

    def broker_url(self, db: int = 0) -> str: ...

    def restart(self, downtime: float = 0.0, graceful: bool = False) -> float: ...

    def parked(self, db: int) -> int: ...


@dataclass
class BrokerWorker(WorkerProcess):
    """A ``WorkerProcess`` that also imports the scenario's task module."""

    include: Sequence[str] = ("tests.brokers.tasks",)

    @property
    def command(self) -> list[str]:
        return [*super().command, "--include", ",".join(self.include)]


@dataclass
class Counts:
    """What one profile's run came to."""

    broker: str
    profile: str
    sent: int
    completed: int = 0
    lost: int = 0
    #: Lost task ids that no worker of the profile logged as received (see ``received_ids``).
    never_received: int = 0
    parked: int = 0
    duplicates: int = 0
    failed: int = 0
    chains: int = 0
    chains_ok: int = 0
    stuck_states: dict[str, int] = field(default_factory=dict)
    worker_exits: int = 0
    done_at_restart: int = 0
    restart_seconds: float = 0.0
    settle_seconds: float = 0.0
    timed_out: bool = False
    waiting_for: str = ""

    def line(self) -> str:
        stuck = ", ".join(f"{n} {state}" for state, n in sorted(self.stuck_states.items()))
        return (
            f"{self.broker} / {self.profile}: sent {self.sent}, completed {self.completed}, "
            f"lost {self.lost} (parked {self.parked}, never received {self.never_received}), "
            f"duplicates {self.duplicates}, failed {self.failed}, "
            f"chains ok {self.chains_ok}/{self.chains}{f' (stuck: {stuck})' if stuck else ''}, "
            f"worker exits {self.worker_exits}, "
            f"done at restart {self.done_at_restart}, restart {self.restart_seconds:.1f}s, "
            f"settled {self.settle_seconds:.1f}s later"
            + (f" (TIMED OUT waiting for {self.waiting_for})" if self.timed_out else "")
        )


COLUMNS = (
    ("broker", "broker"),
    ("settings", "profile"),
    ("sent", "sent"),
    ("completed", "completed"),
    ("lost", "lost"),
    ("parked", "parked"),
    ("duplicates", "duplicates"),
    ("failed", "failed"),
    ("chains ok", "chains_ok"),
    ("worker exits", "worker_exits"),
    ("restart s", "restart_seconds"),
    ("settle s", "settle_seconds"),
)


def format_table(rows: Sequence[Counts]) -> str:
    """A plain-text table of ``rows`` (one per broker and profile)."""

    def cell(row: Counts, attr: str) -> str:
        value = getattr(row, attr)
        if attr == "chains_ok":
            return f"{value}/{row.chains}"
        if attr == "settle_seconds" and row.timed_out:
            return f"{value:.1f} (timed out)"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    table = [[title for title, _ in COLUMNS], *[[cell(row, attr) for _, attr in COLUMNS] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out = [
        " | ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)) for line in table
    ]
    out.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(out)


@dataclass
class Plan:
    """One profile's part of the run."""

    profile: str
    db: int
    options: dict[str, Any]
    app: Celery
    worker: BrokerWorker
    task_ids: list[str] = field(default_factory=list)
    chain_first_ids: list[str] = field(default_factory=list)
    volume_uuids: list[uuid.UUID] = field(default_factory=list)
    replaced: list[BrokerWorker] = field(default_factory=list)
    settled_at: float | None = None
    quiet_looks: int = 0
    waiting_for: str = ""
    timed_out: bool = False

    @property
    def queue(self) -> str:
        return profiles.queue_name(self.profile)

    @property
    def all_workers(self) -> list[BrokerWorker]:
        return [*self.replaced, self.worker]

    def received_ids(self) -> set[str]:
        """Task ids that a worker of this profile logged as received (Celery logs each
        message it takes from the broker, before the pool runs it). A lost id that is not
        among them was taken by no worker: lost in the broker, or popped by kombu's Redis
        transport at the instant of the kill (it pops a message with ``BRPOP`` and records
        its unacknowledged copy with a second command; a kill between the two loses it)."""
        received: set[str] = set()
        for worker in self.all_workers:
            with contextlib.suppress(FileNotFoundError):
                received.update(RECEIVED.findall(worker.log_path.read_text(errors="replace")))
        return received

    def replace_worker(self) -> None:
        """Start a new worker in place of one that exited, as a supervisor (systemd
        ``Restart=always``, Kubernetes) would: kombu can end a worker's main process on a
        Redis connection loss (``AttributeError`` in ``restore_unacked``)."""
        old = self.worker
        self.replaced.append(old)
        self.worker = BrokerWorker(
            self.app, env=old.env, name=f"{self.replaced[0].name}-r{len(self.replaced)}",
            queues=old.queues, concurrency=old.concurrency,
        )  # fmt: skip
        self.worker.start()


class RestartScenario:
    """Workers per profile on ``broker``; ``run()`` sends, restarts, waits and counts.

    Use as a context manager (or call ``close()``): it stops the workers it started.
    """

    def __init__(
        self,
        broker: Broker,
        profile_names: Sequence[str],
        worker_env: Mapping[str, str],
        *,
        plain: int = 40,
        chains: int = 10,
        task_seconds: tuple[float, float] = (0.05, 0.1),
        chain_seconds: float = 0.4,
        restart_after: int = 6,
        downtime: float = 0.0,
        graceful: bool = False,
        timeout: float = 60.0,
        concurrency: int = 2,
    ) -> None:
        self.broker = broker
        self.plain, self.chains = plain, chains
        self.task_seconds, self.chain_seconds = task_seconds, chain_seconds
        self.restart_after, self.downtime, self.timeout = restart_after, downtime, timeout
        self.graceful = graceful
        self.plans: list[Plan] = []
        for db, name in enumerate(profile_names):
            url = broker.broker_url(db)
            options = profiles.celery_options(name, url)
            app = Celery(f"broker-restart-{name}", set_as_current=False)
            app.conf.update(options)
            env = {
                **worker_env,
                "DJANGO_SETTINGS_MODULE": "tests.brokers.settings",
                "BROKER_TEST_URL": url,
                "BROKER_TEST_PROFILE": name,
            }
            worker = BrokerWorker(
                app, env=env, name=f"broker-{broker.kind}-{name}", queues=(profiles.queue_name(name),),
                concurrency=concurrency,
            )  # fmt: skip
            self.plans.append(Plan(profile=name, db=db, options=options, app=app, worker=worker))

    @property
    def workers(self) -> list[WorkerProcess]:
        """Every worker started, replacements included (``tests.workers.iter_workers``
        attaches their log tails to a failed test)."""
        return [worker for plan in self.plans for worker in plan.all_workers]

    def __enter__(self) -> RestartScenario:
        start_workers(*(plan.worker for plan in self.plans))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        stop_workers(*(plan.worker for plan in self.plans))
        for plan in self.plans:
            plan.app.close()

    # -- sending ----------------------------------------------------------------------------

    def _send(self, plan: Plan) -> None:
        """Publish ``plain`` plain tasks with a chain every few of them, so chains run
        before, during and after the restart."""
        from tests.testapp.models import Volume

        every = max(1, (self.plain + self.chains) // max(1, self.chains))
        chains_left, plain_left = self.chains, self.plain
        low, high = self.task_seconds
        for position in itertools.count():
            if not chains_left and not plain_left:
                break
            if chains_left and (position % every == every - 1 or not plain_left):
                chains_left -= 1
                volume = Volume.objects.create(state=Volume.States.UPDATE_SCHEDULED)
                first_id, last_id = str(uuid.uuid4()), str(uuid.uuid4())
                # The link's task id is fixed too: a redelivered first step re-sends the same
                # message, which the transition guard recognises as its own re-run.
                link = plan.app.signature(
                    f"{tasks.PREFIX}finish_update", args=(str(volume.uuid),), immutable=True
                ).set(task_id=last_id)
                plan.app.send_task(
                    f"{tasks.PREFIX}begin_update",
                    args=(str(volume.uuid), self.chain_seconds),
                    task_id=first_id,
                    link=link,
                )
                plan.volume_uuids.append(volume.uuid)
                plan.chain_first_ids.append(first_id)
                plan.task_ids += [first_id, last_id]
            else:
                plain_left -= 1
                task_id = str(uuid.uuid4())
                seconds = low + (high - low) * (position % 5) / 4
                plan.app.send_task(f"{tasks.PREFIX}record", args=(seconds,), task_id=task_id)
                plan.task_ids.append(task_id)

    # -- looking ----------------------------------------------------------------------------

    @staticmethod
    def _runs(plan: Plan) -> tuple[Counter[str], set[str], Counter[str]]:
        """(body starts per task id, finished task ids, failures by kind) from PostgreSQL."""
        from tests.testapp.models import BodyRun

        started: Counter[str] = Counter()
        done: set[str] = set()
        failed: Counter[str] = Counter()
        rows = BodyRun.objects.filter(entity_uuid__in=plan.task_ids).values_list("entity_uuid", "state_seen")
        for task_uuid, seen in rows:
            if seen == tasks.STARTED:
                started[str(task_uuid)] += 1
            elif seen == tasks.DONE:
                done.add(str(task_uuid))
            elif seen.startswith(tasks.FAILED):
                failed[seen.removeprefix(tasks.FAILED)] += 1
        return started, done, failed

    def _queue_length(self, plan: Plan) -> int | None:
        """Ready messages in the profile's queue; None if the broker did not answer."""
        try:
            with plan.app.connection_for_write() as connection:
                return int(
                    connection.default_channel.queue_declare(queue=plan.queue, passive=True).message_count
                )
        except ChannelError as exc:
            # "Not found": no queue, no messages. kombu's Redis transport says so of an
            # empty queue (Redis deletes a list when its last item is popped).
            if getattr(exc, "reply_code", None) == 404 or "NOT_FOUND" in str(exc):
                return 0
            return None
        except Exception:  # the broker is still coming back
            return None

    @staticmethod
    def _worker_idle(plan: Plan) -> bool:
        """The worker answers and has no active and no reserved task."""
        inspect = plan.app.control.inspect(destination=[plan.worker.hostname], timeout=2.0, limit=1)
        try:
            for answer in (inspect.active(), inspect.reserved()):
                if not answer or answer.get(plan.worker.hostname):  # no reply, or tasks listed
                    return False
        except Exception:  # no answer through a broker that is coming back
            return False
        return True

    def _settled(self, plan: Plan, restarted_at: float, deadline: float) -> bool:
        _, done, _ = self._runs(plan)
        if done.issuperset(plan.task_ids):
            return True
        plan.waiting_for = self._busy(plan, restarted_at, deadline)
        plan.quiet_looks = 0 if plan.waiting_for else plan.quiet_looks + 1
        return plan.quiet_looks >= 2

    def _busy(self, plan: Plan, restarted_at: float, deadline: float) -> str:
        """What the profile still waits for ("" if nothing). A body mid-run is one of the
        worker's active tasks (a body whose process died is not: it is lost, or redelivered)."""
        if (length := self._queue_length(plan)) != 0:
            return f"{length} message(s) in the queue"
        if not self._worker_idle(plan):
            return "the worker's active or reserved tasks"
        # Messages waiting for the visibility timeout come back by themselves, unless
        # that is beyond the deadline: then they are parked (counted with the lost).
        comes_back_at = restarted_at + profiles.visibility_timeout(plan.options) + 2.0
        if comes_back_at < deadline and time.monotonic() < comes_back_at and self.broker.parked(plan.db):
            return "messages past their visibility timeout"
        return ""

    # -- the run ----------------------------------------------------------------------------

    def _wait_for_the_moment(self) -> list[int]:
        """Poll until every profile finished ``restart_after`` tasks (then, briefly, until
        each has a chain's first step running); the number each had finished."""
        deadline = time.monotonic() + self.timeout
        chain_deadline: float | None = None
        while True:
            looks = [self._runs(plan) for plan in self.plans]
            finished = [len(done) for _, done, _ in looks]
            if min(finished) >= self.restart_after:
                chain_deadline = chain_deadline or time.monotonic() + CHAIN_STEP_WAIT
                in_chain = all(
                    any(started[t] and t not in done for t in plan.chain_first_ids)
                    for plan, (started, done, _) in zip(self.plans, looks, strict=True)
                )
                if in_chain or time.monotonic() > chain_deadline:
                    return finished
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks finished per profile before the restart: {finished}")
            time.sleep(TRIGGER_POLL)

    def run(self) -> list[Counts]:
        """Send, restart the broker mid-run, wait until every profile settled, count."""
        for plan in self.plans:
            self._send(plan)
        done_at_restart = self._wait_for_the_moment()
        restart_seconds = self.broker.restart(self.downtime, graceful=self.graceful)
        restarted_at = time.monotonic()
        deadline = restarted_at + self.timeout
        while pending := [plan for plan in self.plans if plan.settled_at is None]:
            for plan in pending:
                if not plan.worker.alive():
                    plan.replace_worker()
                if self._settled(plan, restarted_at, deadline):
                    plan.settled_at = time.monotonic()
                elif time.monotonic() > deadline:
                    plan.settled_at, plan.timed_out = time.monotonic(), True
            if any(plan.settled_at is None for plan in self.plans):
                time.sleep(SETTLE_POLL)
        return [
            self._count(plan, done, restart_seconds, (plan.settled_at or restarted_at) - restarted_at)
            for plan, done in zip(self.plans, done_at_restart, strict=True)
        ]

    def _count(
        self, plan: Plan, done_at_restart: int, restart_seconds: float, settle_seconds: float
    ) -> Counts:
        from task_workflow.models import TransitionRecord
        from tests.testapp.models import Volume

        started, done, failed = self._runs(plan)
        finished = done.intersection(plan.task_ids)
        lost_ids = set(plan.task_ids) - finished
        lost = len(lost_ids)
        parked = 0
        with contextlib.suppress(Exception):
            parked = min(lost, self.broker.parked(plan.db))
        records = Counter(
            TransitionRecord.objects.filter(entity_uuid__in=plan.volume_uuids).values_list(
                "entity_uuid", "transition"
            )
        )
        states = dict(Volume.objects.filter(uuid__in=plan.volume_uuids).values_list("uuid", "state"))
        chains_ok = sum(
            states.get(volume) == Volume.States.OK
            and records[(volume, "begin_updating")] == 1
            and records[(volume, "set_ok")] == 1
            and len([key for key in records if key[0] == volume]) == 2
            for volume in plan.volume_uuids
        )
        return Counts(
            broker=self.broker.description,
            profile=plan.profile,
            sent=len(plan.task_ids),
            completed=len(finished),
            lost=lost,
            never_received=len(lost_ids - plan.received_ids()),
            parked=parked,
            duplicates=sum(count - 1 for count in started.values()),
            failed=sum(failed.values()),
            chains=len(plan.volume_uuids),
            chains_ok=chains_ok,
            worker_exits=len(plan.replaced),
            stuck_states=dict(Counter(str(state) for state in states.values() if state != Volume.States.OK)),
            done_at_restart=done_at_restart,
            restart_seconds=restart_seconds,
            settle_seconds=settle_seconds,
            timed_out=plan.timed_out,
            waiting_for=plan.waiting_for,
        )
