"""``manage.py run_demo``: run the example with real Celery worker processes and print
a timeline of task runs and state transitions.

The demo watches its workers while it waits: a worker that exits stops the demo at once
(the other workers are stopped) with the worker's name, exit code, log path and the end
of its log; so does a worker that is not ready within ``--ready-timeout``. ``--runs N``
runs the whole story N times on the same workers (rows and timeline reset between runs),
which is how the tests run it many times in little time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from kombu import Exchange, Queue

from example_project import timeline
from example_project.backend import FAILING_PREFIX
from example_project.celery import app as celery_app
from example_project.models import Instance
from example_project.tasks import demo, start_instance, stop_instance
from task_workflow.conf import get_setting

States = Instance.States

#: Where each instance of the story ends: the backend ids with FAILING_PREFIX fail.
EXPECTED_STATES = {"vm-1": States.OFFLINE, "vm-2": States.ERRED, "vm-3": States.ONLINE, "vm-4": States.ERRED}
#: States no task moves an instance out of by itself.
FINAL_STATES = {States.ONLINE, States.OFFLINE, States.ERRED}
#: Seconds between two looks at the workers and the story while the demo waits.
POLL_INTERVAL = 0.05
#: Lines of a worker's log shown when the demo fails.
LOG_TAIL_LINES = 30


def _shown(path: Path) -> Path:
    """``path`` relative to the project root when it is inside it."""
    return path.relative_to(settings.BASE_DIR) if path.is_relative_to(settings.BASE_DIR) else path


@dataclass
class DemoWorker:
    """A ``celery worker`` process the demo started, and its log."""

    name: str
    queue: str
    nodename: str  # the part of its node name before the host: "name-xxxxxx"
    process: subprocess.Popen[bytes]
    log_path: Path

    def ready(self) -> bool:
        """True once the worker logged that it is ready (it consumes from then on)."""
        pattern = rf"\b{re.escape(self.nodename)}@\S+ ready\."
        return bool(re.search(pattern, self.log_path.read_text(encoding="utf-8", errors="replace")))

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the worker's log, headed by its path."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"--- {self.log_path}: not readable ({exc}) ---"
        tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}\n--- end of {self.log_path} ---"


def stop_workers(workers: list[DemoWorker], *, cold: bool = False, timeout: float = 30) -> None:
    """Warm shutdown (running tasks finish) or cold (SIGQUIT: they are abandoned) of every
    worker at once, since each takes seconds; those still running after ``timeout`` seconds
    are killed."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGQUIT if cold else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


class Command(BaseCommand):
    help = "Run the example workflow on real Celery workers and print its timeline."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each run")
        parser.add_argument(
            "--ready-timeout", type=float, default=60.0, help="seconds to wait for the workers to start"
        )
        parser.add_argument(
            "--runs", type=int, default=1, help="run the story this many times on the same workers"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.EXAMPLE_TIMELINE:
            raise CommandError("run with EXAMPLE_TIMELINE=1 (make demo sets it)")
        runs = options["runs"]
        if runs < 1:
            raise CommandError("--runs must be at least 1")
        self._reset_broker()
        self._reset_run()
        db = settings.DATABASES["default"]
        self.stdout.write(
            f"database: {str(db['ENGINE']).rsplit('.', 1)[-1]}  broker: {self._broker_name()}"
            f"  results: {settings.CELERY_RESULT_BACKEND.split('://')[0]}"
            f"  cache: {str(settings.CACHES['default']['BACKEND']).rsplit('.', 1)[-1]}"
        )
        self.workers: list[DemoWorker] = []
        try:
            for name, queue in (("default", "celery"), ("heavy", get_setting("HEAVY_QUEUE"))):
                self.workers.append(self._start_worker(name, queue, options["workers"]))
            self._wait_for(
                lambda: all(worker.ready() for worker in self.workers),
                options["ready_timeout"],
                lambda: (
                    "the workers to be ready: not ready: "
                    + ", ".join(w.name for w in self.workers if not w.ready())
                ),
            )
            for number in range(1, runs + 1):
                if number > 1:
                    self._reset_run()
                self._run_once(number, runs, options["timeout"])
        except BaseException:
            # Failed or interrupted: do not wait for running tasks to finish.
            stop_workers(self.workers, cold=True, timeout=10)
            raise
        stop_workers(self.workers)
        if runs == 1:
            self._print_timeline()
            self._print_slot_holds()
        self._write_chart()
        self._print_outcome()

    def _run_once(self, number: int, runs: int, timeout: float) -> None:
        """The whole story once: send it, wait until it ended and every task run ended."""
        started = time.monotonic()
        instances = self._run_story(quiet=number > 1)
        self._run_throttle_story(quiet=number > 1)
        self._wait_for(
            lambda: not self._pending_instances(instances),
            timeout,
            lambda: "the instances' final states: still waiting for " + self._pending_instances(instances),
        )
        self._wait_for(
            self._throttle_story_finished,
            max(timeout - (time.monotonic() - started), 1.0),
            lambda: "the throttle demo: both example.dangerous tasks to end",
        )
        # Tasks still ending (their end event after the last transition): the next run and
        # the chart start from a quiet timeline.
        self._wait_for(self._no_task_running, 10.0, lambda: "every started task to end")
        states = dict(Instance.objects.values_list("name", "state"))
        summary = ", ".join(f"{name} {states[name]}" for name in EXPECTED_STATES)
        self.stdout.write(f"run {number}/{runs} finished in {time.monotonic() - started:.2f}s: {summary}")
        unexpected = {name: states[name] for name, state in EXPECTED_STATES.items() if states[name] != state}
        if unexpected:
            raise CommandError(
                f"run {number}/{runs} ended in unexpected states: {unexpected}; expected {EXPECTED_STATES}"
            )

    def _broker_name(self) -> str:
        with celery_app.connection_for_write() as connection:
            driver = str(connection.transport.driver_name)
        if driver == "sqlalchemy":
            return f"sqlalchemy ({urlsplit(settings.CELERY_BROKER_URL).scheme})"
        return driver

    def _reset_broker(self) -> None:
        """Embedded broker and result store: new files, their tables and the demo's queues
        created before any worker starts (so the workers do not race to create them)."""
        for path in (getattr(settings, "BROKER_DB", None), getattr(settings, "RESULTS_DB", None)):
            if path is not None:  # drop messages and results left by an interrupted run
                for stale in (path, path.with_name(path.name + "-journal")):
                    stale.unlink(missing_ok=True)
        if getattr(settings, "BROKER_DB", None) is not None:
            with celery_app.connection_for_write() as connection:
                for name in ("celery", get_setting("HEAVY_QUEUE")):
                    queue = Queue(name, Exchange(name), routing_key=name)  # as Celery declares it
                    queue.bind(connection.default_channel).declare()
            celery_app.backend  # noqa: B018 - creates the result tables (database backend)

    def _reset_run(self) -> None:
        Instance.objects.all().delete()
        timeline.timeline_path().unlink(missing_ok=True)

    def _start_worker(self, name: str, queue: str, concurrency: int) -> DemoWorker:
        nodename = f"{name}-{uuid.uuid4().hex[:6]}"
        command = [
            sys.executable, "-m", "celery", "-A", "example_project", "worker",
            "--queues", queue, "--concurrency", str(concurrency), "--loglevel", "INFO",
            "--hostname", f"{nodename}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        log_path = Path(settings.VAR_DIR) / f"demo-worker-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, env={**os.environ, "EXAMPLE_TIMELINE": "1"}, stdout=log, stderr=subprocess.STDOUT
            )
        self.stdout.write(
            f"starting worker {name}: celery -A example_project worker -Q {queue} --concurrency {concurrency}"
            f"  (pid {process.pid}, log: {_shown(log_path)})"
        )
        return DemoWorker(name, queue, nodename, process, log_path)

    def _wait_for(self, condition: Callable[[], Any], timeout: float, what: Callable[[], str]) -> None:
        """Until ``condition()`` is true, watching the workers: a worker that exited, or
        ``timeout`` seconds, raise ``CommandError`` with the workers' log tails."""
        # A demo may poll; the tests wait on worker events instead.
        deadline = time.monotonic() + timeout
        while True:
            self._check_workers()
            if condition():
                return
            if time.monotonic() > deadline:
                logs = ", ".join(str(worker.log_path) for worker in self.workers)
                tails = "\n".join(worker.log_tail() for worker in self.workers)
                message = f"timed out after {timeout:.0f}s waiting for {what()}; logs: {logs}"
                raise CommandError(f"{message}\n{tails}")
            time.sleep(POLL_INTERVAL)

    def _check_workers(self) -> None:
        """Raise ``CommandError`` (after stopping the others) when a worker exited."""
        for worker in self.workers:
            code = worker.process.poll()
            if code is None:
                continue
            stop_workers([other for other in self.workers if other is not worker], cold=True, timeout=10)
            raise CommandError(
                f"worker {worker.name} (queue {worker.queue}, pid {worker.process.pid}) exited with code"
                f" {code} while the demo waited; log: {worker.log_path}\n{worker.log_tail()}"
            )

    def _pending_instances(self, instances: list[Instance]) -> str:
        """The instances not in a final state yet, with their states ("" when none)."""
        states = dict(Instance.objects.filter(pk__in=[i.pk for i in instances]).values_list("name", "state"))
        return ", ".join(f"{name} ({state})" for name, state in states.items() if state not in FINAL_STATES)

    @staticmethod
    def _throttle_story_finished() -> bool:
        events = timeline.read_timeline()
        return sum(1 for e in events if e["event"] == "end" and e["task"] == "example.dangerous") >= 2

    @staticmethod
    def _no_task_running() -> bool:
        events = timeline.read_timeline()
        return sum(e["event"] == "start" for e in events) == sum(e["event"] == "end" for e in events)

    def _run_story(self, *, quiet: bool = False) -> list[Instance]:
        """Create the instances, send the tasks; return the instances."""
        # Instances are created directly in their running state for the demo; the
        # protected state field accepts an initial value.
        vm1 = Instance.objects.create(name="vm-1", backend_id="i-0a1b", state=Instance.States.ONLINE)
        vm2 = Instance.objects.create(
            name="vm-2", backend_id=f"{FAILING_PREFIX}i-9z8y", state=Instance.States.ONLINE
        )
        vm3 = Instance.objects.create(name="vm-3", backend_id="i-77c3", state=Instance.States.OFFLINE)
        vm4 = Instance.objects.create(
            name="vm-4", backend_id=f"{FAILING_PREFIX}i-5e6f", state=Instance.States.OFFLINE
        )
        if not quiet:
            self.stdout.write("sending: stop_instance(vm-1), stop_instance(vm-2, backend fails),")
            self.stdout.write("         start_instance(vm-3), start_instance(vm-4, backend fails)")
        for instance in (vm1, vm2):
            stop_instance.delay(str(instance.uuid))
        for instance in (vm3, vm4):
            start_instance.delay(str(instance.uuid))
        return [vm1, vm2, vm3, vm4]

    def _run_throttle_story(self, *, quiet: bool = False) -> None:
        if not quiet:
            self.stdout.write("sending: demo(10), demo(20): chains slow -> fast -> dangerous; slow is heavy")
            self.stdout.write("         and throttled per region, so the two slow parts run one after")
            self.stdout.write("         another")
        demo.delay(10)
        demo.delay(20)

    def _print_timeline(self) -> None:
        events = timeline.read_timeline()
        if not events:
            return
        origin = events[0]["t"]
        self.stdout.write("\ntimeline (seconds since first event, worker pid, event)")
        for event in events:
            self.stdout.write(
                f"  {event['t'] - origin:7.3f}s  pid {event['pid']:>6}  {self._describe(event)}"
            )

    def _print_slot_holds(self) -> None:
        """Each slot group's holds as intervals, and the most held at once."""
        events = timeline.read_timeline()
        if not events:
            return
        origin = events[0]["t"]
        holds: dict[str, list[tuple[float, float, int]]] = {}
        opened: dict[tuple[str, int], float] = {}
        for event in events:
            if event["event"] != "slot":
                continue
            key = (event["group"], event["pid"])
            if event["action"] == "acquired":
                opened[key] = event["t"] - origin
            elif key in opened:
                holds.setdefault(event["group"], []).append(
                    (opened.pop(key), event["t"] - origin, event["pid"])
                )
        self.stdout.write("\nthrottled sections (slot group: held from-to by pid; most holders at once)")
        for group, intervals in holds.items():
            spans = ", ".join(f"{start:.3f}-{end:.3f}s pid {pid}" for start, end, pid in intervals)
            most = max(sum(1 for s, e, _ in intervals if s <= start < e) for start, _, _ in intervals)
            self.stdout.write(f"  {group}: {spans}; at most {most} at once")

    def _write_chart(self) -> None:
        """The same timeline as a PNG Gantt chart; an extra that never fails the demo."""
        try:
            from example_project.timeline_chart import render_timeline_png
        except ImportError:
            self.stdout.write("\nchart: skipped (matplotlib is not installed: pip install -e '.[dev]')")
            return
        try:
            path = render_timeline_png(timeline.read_timeline(), Path(settings.VAR_DIR) / "timeline.png")
        except Exception as exc:  # a drawing problem must not hide the demo's outcome
            self.stdout.write(f"\nchart: not drawn ({type(exc).__name__}: {exc})")
            return
        if path is not None:
            self.stdout.write(f"\nchart: {_shown(path)}")

    @staticmethod
    def _describe(event: dict[str, Any]) -> str:
        kind = event["event"]
        if kind == "transition":
            return f"    {event['entity']}: {event['source']} --{event['transition']}--> {event['target']}"
        if kind == "start":
            return f"▶ {event['task']}({event['args']})  [queue {event.get('queue')}]"
        if kind == "end":
            return f"■ {event['task']} {event['state']}"
        if kind == "slot":
            return f"    slot {event['action']}: {event['group']}"
        if kind == "retry":
            return f"↻ {event['task']} re-queued: {event['reason']}"
        if kind == "failed":
            return f"✗ {event['task']}: {event['error']}"
        return str(event)

    def _print_outcome(self) -> None:
        self.stdout.write("\nfinal states")
        for instance in Instance.objects.order_by("name"):
            error = f"  error: {instance.error_message}" if instance.error_message else ""
            self.stdout.write(f"  {instance.name}: {instance.state}{error}")
        self.stdout.write(f"\nfinished at {datetime.now(UTC):%H:%M:%S} UTC")
