"""``manage.py run_demo``: run the example with real Celery worker processes and print
a timeline of task runs and state transitions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from example_project import timeline
from example_project.backend import FAILING_PREFIX
from example_project.models import Instance
from example_project.tasks import demo, start_instance, stop_instance
from task_workflow.conf import get_setting

States = Instance.States


class Command(BaseCommand):
    help = "Run the example workflow on real Celery workers and print its timeline."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the run")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.EXAMPLE_TIMELINE:
            raise CommandError("run with EXAMPLE_TIMELINE=1 (make demo sets it)")
        self._reset()
        db = settings.DATABASES["default"]
        self.stdout.write(
            f"database: {db['ENGINE'].rsplit('.', 1)[-1]}  broker: {settings.CELERY_BROKER_URL.split('://')[0]}"
            f"  cache: {settings.CACHES['default']['BACKEND'].rsplit('.', 1)[-1]}"
        )
        workers = [
            self._start_worker("default", "celery", options["workers"]),
            self._start_worker("heavy", get_setting("HEAVY_QUEUE"), options["workers"]),
        ]
        try:
            instances = self._run_story()
            self._run_throttle_story()
            self._wait(instances, options["timeout"])
            self._wait_for_throttle_story(options["timeout"])
        finally:
            for worker in workers:
                self._stop_worker(worker)
        self._print_timeline()
        self._print_slot_holds()
        self._write_chart()
        self._print_outcome(instances)

    def _reset(self) -> None:
        Instance.objects.all().delete()
        timeline.timeline_path().unlink(missing_ok=True)
        broker_dir = getattr(settings, "BROKER_DIR", None)
        if broker_dir is not None:  # drop messages left by an interrupted run
            shutil.rmtree(broker_dir, ignore_errors=True)
            (broker_dir / "processed").mkdir(parents=True, exist_ok=True)

    def _start_worker(self, name: str, queue: str, concurrency: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "celery", "-A", "example_project", "worker",
            "--queues", queue, "--concurrency", str(concurrency), "--loglevel", "INFO",
            "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        log_path = settings.VAR_DIR / f"demo-worker-{name}.log"
        shown = (
            log_path.relative_to(settings.BASE_DIR)
            if log_path.is_relative_to(settings.BASE_DIR)
            else log_path
        )
        self.stdout.write(
            f"starting worker: celery -A example_project worker -Q {queue} --concurrency {concurrency}"
            f"  (log: {shown})"
        )
        self.stdout.write(f"worker log: {log_path}")
        with log_path.open("wb") as log:
            return subprocess.Popen(
                command, env={**os.environ, "EXAMPLE_TIMELINE": "1"}, stdout=log, stderr=subprocess.STDOUT
            )

    def _stop_worker(self, worker: subprocess.Popen[bytes]) -> None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    def _run_story(self) -> dict[Instance, set[str]]:
        """Create the instances, send the tasks; return where each story may end."""
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
        self.stdout.write("sending: stop_instance(vm-1), stop_instance(vm-2, backend fails),")
        self.stdout.write("         start_instance(vm-3), start_instance(vm-4, backend fails)")
        for instance in (vm1, vm2):
            stop_instance.delay(str(instance.uuid))
        for instance in (vm3, vm4):
            start_instance.delay(str(instance.uuid))
        return {
            vm1: {States.OFFLINE, States.ERRED},
            vm2: {States.OFFLINE, States.ERRED},
            vm3: {States.ONLINE, States.ERRED},
            vm4: {States.ONLINE, States.ERRED},
        }

    def _run_throttle_story(self) -> None:
        self.stdout.write("sending: demo(10), demo(20): chains slow -> fast -> dangerous; slow is heavy")
        self.stdout.write("         and throttled per region, so the two slow parts run one after another")
        demo.delay(10)
        demo.delay(20)

    def _wait_for_throttle_story(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ended = [
                e
                for e in timeline.read_timeline()
                if e["event"] == "end" and e["task"] == "example.dangerous"
            ]
            if len(ended) >= 2:
                return
            if time.monotonic() > deadline:
                raise CommandError(f"the throttle demo did not finish in {timeout:.0f}s")
            time.sleep(0.1)

    def _wait(self, endings: dict[Instance, set[str]], timeout: float) -> None:
        # A demo may poll; the tests wait on worker events instead.
        deadline = time.monotonic() + timeout
        pending = dict(endings)
        while pending:
            states = dict(Instance.objects.filter(pk__in=[i.pk for i in pending]).values_list("pk", "state"))
            pending = {i: ends for i, ends in pending.items() if states[i.pk] not in ends}
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{i.name} ({states[i.pk]})" for i in pending)
                raise CommandError(f"the demo did not finish in {timeout:.0f}s: still waiting for {names}")
            time.sleep(0.1)

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
            shown = path.relative_to(settings.BASE_DIR) if path.is_relative_to(settings.BASE_DIR) else path
            self.stdout.write(f"\nchart: {shown}")

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

    def _print_outcome(self, instances: dict[Instance, set[str]]) -> None:
        self.stdout.write("\nfinal states")
        for instance in instances:
            instance.refresh_from_db()
            error = f"  error: {instance.error_message}" if instance.error_message else ""
            self.stdout.write(f"  {instance.name}: {instance.state}{error}")
        self.stdout.write(f"\nfinished at {datetime.now(UTC):%H:%M:%S} UTC")
