"""Real Celery workers for end-to-end tests, and a task-event waiter.

``WorkerProcess`` starts ``celery -A example_project worker`` as a subprocess on the
test database and the test Redis, waits until it answers a control ``ping`` (not a
fixed sleep) and stops it with a warm shutdown. Its output goes to
``test-artifacts/worker-<name>.log``.

``TaskEvents`` consumes the Celery event stream in a thread, so a test can wait for
"the task named X, whose arguments mention Y, finished" with a deadline. The task name
is only in ``task-received`` events; ``task-succeeded`` and ``task-failed`` carry just
the task id, so the two are joined on the id. Workers send task events only when
started with ``-E``, which ``WorkerProcess`` always passes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
#: Worker and server logs, reports, screenshots. Each nox session has its own
#: (``TEST_ARTIFACTS_DIR``): sessions run side by side and name their files alike.
ARTIFACTS_DIR = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "test-artifacts")

#: Task event types after which a task does not run again (for this delivery).
FINAL_STATES = ("succeeded", "failed")
#: How long a wait for an event may take before the test calls it a hang: a budget, not a
#: speed (waits return at the event; a CI machine running two suites at once is slow).
HANG_TIMEOUT = 90.0


def database_url(settings_dict: Mapping[str, Any]) -> str:
    """A ``postgres://`` URL for a Django PostgreSQL ``DATABASES`` entry, in the form
    ``example_project.settings.database_from_url`` reads back."""
    if settings_dict["ENGINE"] != "django.db.backends.postgresql":
        raise ValueError(f"workers need PostgreSQL, the test database is {settings_dict['ENGINE']}")
    user = quote(settings_dict.get("USER") or "", safe="")
    password = quote(settings_dict.get("PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    return f"postgres://{credentials}{host}{port}/{quote(settings_dict['NAME'], safe='')}"


def log_tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class WorkerError(RuntimeError):
    """A worker did not start, or did not stop."""


@dataclass
class WorkerProcess:
    """One ``celery worker`` subprocess (prefork pool, task events on).

    ``env`` is added to this process's environment; give it at least
    ``DJANGO_SETTINGS_MODULE``, ``DATABASE_URL`` and ``REDIS_URL``.
    """

    app: Celery
    env: Mapping[str, str]
    name: str = "e2e"
    queues: Sequence[str] = ("celery",)
    concurrency: int = 2
    start_timeout: float = 60.0
    stop_timeout: float = 30.0
    hostname: str = field(init=False)
    log_path: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # Unique per start, so a ping can only be answered by this worker.
        self.hostname = f"{self.name}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.log_path = ARTIFACTS_DIR / f"worker-{self.name}.log"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "example_project", "worker",
            "--pool", "prefork", "--concurrency", str(self.concurrency),
            "-Q", ",".join(self.queues), "--hostname", self.hostname,
            "-E", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip

    def start(self) -> WorkerProcess:
        """Start the worker and return once it answers a ping; raise ``WorkerError``
        (with the end of its log) if it exits or stays silent until the deadline."""
        if self.process is not None:
            raise WorkerError(f"worker {self.hostname} was already started")
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            # Own process group: if the warm shutdown hangs, its pool children are
            # killed together with it.
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        with self.app.connection_for_write() as connection:  # not connected: only its error types
            connection_errors = connection.connection_errors + connection.channel_errors
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerError(
                    f"worker {self.hostname} exited with {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                # Blocks up to the timeout waiting for the reply: this is the wait.
                replies = self.app.control.ping(destination=[self.hostname], timeout=0.5) or []
            except connection_errors:
                # The broker is (re)starting, or this app's pooled connection is from before
                # a broker restart: the next ping gets a new connection.
                time.sleep(0.1)
                continue
            if any(self.hostname in reply for reply in replies):
                return
        raise WorkerError(
            f"worker {self.hostname} did not answer a ping within {self.start_timeout}s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> int | None:
        """Warm shutdown (SIGTERM: running tasks finish); kill the process group if it
        does not exit within ``stop_timeout``. Returns the exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            return process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)


@dataclass(frozen=True)
class TaskOutcome:
    """How one task execution ended, from the worker's events."""

    uuid: str
    name: str
    state: str  # "succeeded" or "failed"
    args: str  # the worker's repr of the positional arguments
    hostname: str
    result: str | None = None  # repr of the return value (succeeded)
    exception: str | None = None  # repr of the exception (failed)
    traceback: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @property
    def failed(self) -> bool:
        return self.state == "failed"


class TaskEvents:
    """Collect task events from every worker of ``app`` in a background thread.

    Use as a context manager, or ``start()`` / ``stop()``. ``start()`` returns once the
    event subscription is live (it sees an event it sent itself): Redis delivers events
    by pub/sub, so events published before that would be lost.
    """

    HANDSHAKE = "tests-events-handshake"

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._cond = threading.Condition()
        self._names: dict[str, tuple[str, str]] = {}  # task id -> (name, args repr)
        self._finished: dict[str, dict[str, Any]] = {}  # task id -> final event
        self._handshakes: set[str] = set()
        self._history: dict[str, list[dict[str, Any]]] = {}  # task id -> its events, in order
        self._receiver: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the consumer thread ----------------------------------------------------------

    def _on_received(self, event: dict[str, Any]) -> None:
        with self._cond:
            self._names[event["uuid"]] = (event.get("name") or "", event.get("args") or "")
            self._history.setdefault(event["uuid"], []).append(event)
            self._cond.notify_all()

    def _on_finished(self, event: dict[str, Any]) -> None:
        with self._cond:
            self._finished[event["uuid"]] = event
            self._history.setdefault(event["uuid"], []).append(event)
            self._cond.notify_all()

    def _on_progress(self, event: dict[str, Any]) -> None:
        """``task-started`` and ``task-retried``: kept in the task's history only."""
        with self._cond:
            self._history.setdefault(event["uuid"], []).append(event)
            self._cond.notify_all()

    def _on_handshake(self, event: dict[str, Any]) -> None:
        with self._cond:
            self._handshakes.add(event.get("token", ""))
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as connection:
                self._receiver = self.app.events.Receiver(
                    connection,
                    handlers={
                        "task-received": self._on_received,
                        "task-succeeded": self._on_finished,
                        "task-failed": self._on_finished,
                        "task-started": self._on_progress,
                        "task-retried": self._on_progress,
                        self.HANDSHAKE: self._on_handshake,
                    },
                )
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    # -- control ----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> TaskEvents:
        self._thread = threading.Thread(target=self._run, name="celery-task-events", daemon=True)
        self._thread.start()
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        with self.app.connection_for_write() as connection:
            dispatcher = self.app.events.Dispatcher(connection, hostname=f"pytest-{token[:8]}")
            with self._cond:
                while token not in self._handshakes:
                    self._raise_if_dead()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"the task event receiver did not subscribe within {timeout}s")
                    # Re-sent until seen: one sent before the subscription is lost.
                    dispatcher.send(self.HANDSHAKE, token=token)
                    self._cond.wait(min(remaining, 0.2))
            dispatcher.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> TaskEvents:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the task event receiver died: {self._error!r}") from self._error
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the task event receiver thread is not running")

    # -- queries ----------------------------------------------------------------------

    def _outcomes(self, name: str, args_contain: str | None, states: Iterable[str]) -> list[TaskOutcome]:
        """Finished executions of task ``name`` (caller holds the lock)."""
        found = []
        for task_id, event in self._finished.items():
            task_name, args = self._names.get(task_id, ("", ""))
            state = event["type"].removeprefix("task-")
            if task_name != name or state not in states:
                continue
            if args_contain is not None and args_contain not in args:
                continue
            found.append(
                TaskOutcome(
                    uuid=task_id,
                    name=task_name,
                    state=state,
                    args=args,
                    hostname=event.get("hostname", ""),
                    result=event.get("result"),
                    exception=event.get("exception"),
                    traceback=event.get("traceback"),
                )
            )
        return found

    def finished(
        self, name: str, *, args_contain: str | None = None, states: Iterable[str] = FINAL_STATES
    ) -> list[TaskOutcome]:
        """Executions of ``name`` that finished so far (no waiting)."""
        with self._cond:
            return self._outcomes(name, args_contain, tuple(states))

    def received(self, name: str, *, args_contain: str | None = None) -> list[str]:
        """Ids of executions of ``name`` that a worker received so far (no waiting)."""
        with self._cond:
            return [
                task_id
                for task_id, (task_name, args) in self._names.items()
                if task_name == name and (args_contain is None or args_contain in args)
            ]

    def wait_for(
        self,
        name: str,
        *,
        args_contain: str | None = None,
        states: Iterable[str] = FINAL_STATES,
        timeout: float = HANG_TIMEOUT,
    ) -> TaskOutcome:
        """Wait until an execution of task ``name`` whose argument repr contains
        ``args_contain`` (e.g. an entity uuid) ended in one of ``states``; return it.

        Raises ``TimeoutError`` describing the events seen so far.
        """
        states = tuple(states)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._outcomes(name, args_contain, states)
                if found:
                    return found[0]
                self._raise_if_dead()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no {'/'.join(states)} event for task {name!r}"
                        f"{f' with args containing {args_contain!r}' if args_contain else ''} "
                        f"within {timeout}s; events seen:\n{self._describe()}"
                    )
                self._cond.wait(remaining)

    def _describe(self) -> str:
        lines = []
        for task_id, (name, args) in self._names.items():
            event = self._finished.get(task_id)
            state = event["type"] if event else "(not finished)"
            detail = f" {event.get('exception')}" if event and event.get("exception") else ""
            lines.append(f"  {task_id} {name}{args} -> {state}{detail}")
        orphans = set(self._finished) - set(self._names)
        lines.extend(
            f"  {task_id} (no task-received seen) -> {self._finished[task_id]['type']}" for task_id in orphans
        )
        return "\n".join(lines) or "  (none)"

    # -- queries by task id -------------------------------------------------------------

    def history(self, task_id: str) -> list[dict[str, Any]]:
        """Every event of task ``task_id`` seen so far (received, started, retried,
        succeeded, failed), in arrival order. A re-queued message keeps its id, so one
        id may have several deliveries."""
        with self._cond:
            return list(self._history.get(task_id, ()))

    def wait_for_id(
        self,
        task_id: str,
        types: Iterable[str] = ("task-succeeded", "task-failed"),
        *,
        count: int = 1,
        timeout: float = HANG_TIMEOUT,
    ) -> dict[str, Any]:
        """Wait for the ``count``-th event of task ``task_id`` whose type is one of
        ``types`` (e.g. ``("task-retried",)``) and return it; ``TimeoutError`` (with the
        task's events so far) at the deadline."""
        types = tuple(types)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = [e for e in self._history.get(task_id, ()) if e["type"] in types]
                if len(matching) >= count:
                    return matching[count - 1]
                self._raise_if_dead()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [e["type"] for e in self._history.get(task_id, ())]
                    raise TimeoutError(
                        f"no {count}x {'/'.join(types)} event for task {task_id} within {timeout}s; "
                        f"its events: {seen}"
                    )
                self._cond.wait(remaining)

    def wait_for_ids(
        self, task_ids: Iterable[str], *, timeout: float = HANG_TIMEOUT
    ) -> dict[str, dict[str, Any]]:
        """Wait until every task of ``task_ids`` finished (succeeded or failed); return
        task id -> its final event."""
        task_ids = list(task_ids)
        pending = set(task_ids)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pending -= set(self._finished)
                if not pending:
                    return {task_id: self._finished[task_id] for task_id in task_ids}
                self._raise_if_dead()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(pending)} task(s) did not finish within {timeout}s, e.g. "
                        + ", ".join(
                            f"{t}: {[e['type'] for e in self._history.get(t, ())]}" for t in list(pending)[:5]
                        )
                    )
                self._cond.wait(remaining)


def start_workers(*workers: WorkerProcess) -> tuple[WorkerProcess, ...]:
    """Start several workers at once (each ``start()`` in its own thread) and return
    them once all answer a ping; if one fails, stop them all and raise its error."""
    errors: list[BaseException] = []

    def start(worker: WorkerProcess) -> None:
        try:
            worker.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for worker in workers:
            worker.stop()
        raise errors[0]
    return workers


def stop_workers(*workers: WorkerProcess) -> None:
    """Warm-shut several workers down at once (each ``stop()`` in its own thread)."""
    threads = [threading.Thread(target=worker.stop) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def iter_workers(value: Any) -> Iterable[WorkerProcess]:
    """The ``WorkerProcess`` objects in a fixture value: the value itself, the items of
    a list/tuple, or its ``workers`` attribute."""
    if isinstance(value, WorkerProcess):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_workers(item)
    elif isinstance(getattr(value, "workers", None), list | tuple):
        yield from iter_workers(value.workers)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1:``port`` (no persistence), which a test
    may stop and start again on the same port. Its output goes to
    ``test-artifacts/redis-<name>.log``."""

    port: int
    name: str = "throttle"
    start_timeout: float = 10.0
    #: Keep every write in an append-only file (``appendfsync always``) in a directory of
    #: its own, so a restart loses nothing (a broker's queued and unacknowledged messages).
    persistent: bool = False
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = ARTIFACTS_DIR / f"redis-{self.name}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        """A client that fails at once (no retries with backoff) when the server is down."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=1,
            socket_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> RedisServer:
        """Start the server and return once it answers ``PING``."""
        if self.alive():
            raise WorkerError(f"redis-server on port {self.port} is already running")
        import redis

        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        if self.persistent:
            data_dir = ARTIFACTS_DIR / f"redis-{self.name}-{self.port}-data"
            data_dir.mkdir(exist_ok=True)
            storage = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)]
        else:
            storage = ["--appendonly", "no", "--dir", str(ARTIFACTS_DIR)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *storage],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise WorkerError(
                        f"redis-server on port {self.port} exited with {self.process.returncode}:\n"
                        f"{log_tail(self.log_path)}"
                    )
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise WorkerError(f"redis-server on port {self.port} did not answer within the deadline")
                time.sleep(0.02)  # readiness poll of a starting server; no event to wait for
        finally:
            client.close()

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE`` and wait for the process to exit."""
        import redis

        if not self.alive():
            return
        client = self.client()
        try:
            client.shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        assert self.process is not None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
