"""The quick start's project, built from ``docs/quickstart.md`` alone, on real workers.

Every ``python`` block of the page whose first line names a file (``# proj/celery.py``)
is written into a new directory; then the page's own commands run there, taken from its
``sh`` blocks: ``makemigrations``, ``migrate`` and ``check`` (no system check message at
all), the two workers (``-Q celery`` and ``-Q heavy``), ``runserver`` and the ``curl``
POST. The volume the view creates must reach ``ok`` through both transitions, with the
heavy throttled task run by the heavy worker and its result in the Redis result backend.

What the test adds to the page's commands: the worker's ``--hostname`` (to ping it) and
``--concurrency 2``; ``runserver``'s address (a free port) and ``--noreload``; the
database is created with psycopg instead of ``createdb``. The project gets its own
PostgreSQL database, ``QUICKSTART_DATABASE_NAME`` (default: the suite's database name
with ``_quickstart``, ``task_workflow_quickstart`` for ``make test``; created and dropped
here), and its own Redis database, ``QUICKSTART_REDIS_URL`` (default
``redis://127.0.0.1:6379/8``, flushed before and after; each nox session sets one of its
own): the session's example workers consume the ``celery`` queue of the suite's Redis
database, and would take the project's messages there. Not a Redis server of its own: a
server up for less than the throttle's restart grace (``LOCK_TTL``, 60 s) grants no slot
(it may have forgotten leases), which would hold the heavy task for a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

from tests.markdown_code import DOCS, file_blocks, shell_commands
from tests.waiting import wait_until
from tests.workers import HANG_TIMEOUT, free_port, log_tail

QUICKSTART = DOCS / "quickstart.md"
#: The suite's database name with ``_quickstart``: each nox session has a database of its own.
PROJECT_DATABASE = (
    os.environ.get("QUICKSTART_DATABASE_NAME")
    or (urllib.parse.urlsplit(os.environ.get("DATABASE_URL", "")).path.lstrip("/") or "task_workflow")
    + "_quickstart"
)
PROJECT_REDIS_URL = os.environ.get("QUICKSTART_REDIS_URL", "redis://127.0.0.1:6379/8")
#: The server the quick start's settings name (HOST, PORT, USER).
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
#: What ``manage.py check`` prints when nothing is wrong, and nothing else.
NO_ISSUES = "System check identified no issues (0 silenced)."
#: The files a new user needs; the page may show more, not fewer.
REQUIRED_FILES = {
    "manage.py",
    "proj/__init__.py",
    "proj/settings.py",
    "proj/celery.py",
    "proj/urls.py",
    "storage/__init__.py",
    "storage/models.py",
    "storage/tasks.py",
    "storage/views.py",
}
CELERY = Path(sys.executable).with_name("celery")


def quickstart_text() -> str:
    return QUICKSTART.read_text(encoding="utf-8")


def test_quickstart_shows_every_file_of_the_project() -> None:
    """Each file of the project is a block of its own that names it and compiles; the
    layout listing names the same files."""
    text = quickstart_text()
    blocks = file_blocks(text)
    assert blocks.keys() >= REQUIRED_FILES, f"missing: {sorted(REQUIRED_FILES - blocks.keys())}"
    for path, block in blocks.items():
        compile(block.text, path, "exec")
    layout = text.split("The layout:", 1)[1].split("```", 2)[1]
    listed = {line.split()[0] for line in layout.splitlines()[1:] if line.strip()}
    assert listed == blocks.keys()


def page_command(prefix: str, commands: list[str] | None = None) -> list[str]:
    """The one command line of the page's ``sh`` blocks that starts with ``prefix``, split."""
    matching = [c for c in (commands or shell_commands(quickstart_text())) if c.startswith(prefix)]
    assert len(matching) == 1, f"the quick start should give one {prefix!r} command, it gives {matching}"
    return shlex.split(matching[0])


def project_env() -> dict[str, str]:
    """This environment without what points at the test suite's project, plus the
    project's own database and Redis, as the quick start's settings read them."""
    suite_only = ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "DATABASE_URL")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in suite_only and not key.startswith("CELERY")
    }
    env.update(DB_NAME=PROJECT_DATABASE, REDIS_URL=PROJECT_REDIS_URL, PYTHONUNBUFFERED="1")
    return env


def run_manage(
    project: Path, command: list[str], timeout: float = HANG_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a page command ``python manage.py …`` in the project with this interpreter."""
    assert command[:2] == ["python", "manage.py"], command
    return subprocess.run(
        [sys.executable, *command[1:]],
        cwd=project,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Server:
    """A long-running process of the project (a worker, the web server), its own process
    group, its output in ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return f"{self.name} log {self.log}:\n{log_tail(self.log)}"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}; {self.tail()}")

    def stop(self) -> None:
        """SIGTERM (a worker's warm shutdown); the whole group is killed if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    """A list to start servers into; every one is stopped on the way out."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()


def start(started: list[Server], name: str, argv: list[str], project: Path) -> Server:
    log = project / f"{name}.log"
    with log.open("wb") as output:
        output.write(f"$ {shlex.join(argv)}\n".encode())
        output.flush()
        process = subprocess.Popen(
            argv,
            cwd=project,
            env=project_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, process, log)
    started.append(server)
    return server


@pytest.fixture
def services() -> None:
    """Skip unless the suite runs on PostgreSQL and Redis, as the quick start does."""
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql" or not settings.REDIS_URL:
        pytest.skip("needs PostgreSQL and Redis")


@pytest.fixture
def project_database(services: None) -> Iterator[str]:
    """The project's database, new and empty; dropped afterwards."""
    import psycopg
    from psycopg import sql

    def admin_execute(statement: sql.Composed) -> None:
        with psycopg.connect(dbname="postgres", autocommit=True, **POSTGRES) as connection:
            connection.execute(statement)

    name = sql.Identifier(PROJECT_DATABASE)
    admin_execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
    admin_execute(sql.SQL("CREATE DATABASE {}").format(name))
    try:
        yield PROJECT_DATABASE
    finally:
        admin_execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


@pytest.fixture
def project_redis(services: None) -> Iterator[str]:
    """The project's Redis database (broker, results, throttle slots), empty; flushed
    again afterwards."""
    import redis

    client = redis.Redis.from_url(PROJECT_REDIS_URL)
    client.flushdb()
    try:
        yield PROJECT_REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The quick start's files, written as the page shows them."""
    for path, block in file_blocks(quickstart_text()).items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text, encoding="utf-8")
    return tmp_path


def wait_for_ping(app: object, server: Server, hostname: str) -> None:
    from celery import Celery

    assert isinstance(app, Celery)

    def answered() -> bool:
        server.check_alive()
        replies = app.control.ping(destination=[hostname], timeout=0.5) or []
        return any(hostname in reply for reply in replies)

    wait_until(answered, HANG_TIMEOUT, f"{server.name} to answer a ping", interval=0.1)


def volume_row(database: str, volume_uuid: str) -> Mapping[str, str] | None:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(dbname=database, row_factory=dict_row, **POSTGRES) as connection:
        return connection.execute(
            "SELECT state, error_message FROM storage_volume WHERE uuid = %s", (volume_uuid,)
        ).fetchone()


def history(database: str, volume_uuid: str) -> list[tuple[str, str, str, str]]:
    import psycopg

    with psycopg.connect(dbname=database, **POSTGRES) as connection:
        rows = connection.execute(
            "SELECT transition, source_state, target_state, task_name FROM task_workflow_transitionrecord"
            " WHERE entity_uuid = %s ORDER BY created_at, id",
            (volume_uuid,),
        ).fetchall()
    return [tuple(row) for row in rows]


@pytest.mark.services
def test_quickstart_project_runs_a_transition_and_a_heavy_throttled_task(
    project: Path, project_database: str, project_redis: str
) -> None:
    from celery import Celery

    commands = shell_commands(quickstart_text())

    makemigrations = run_manage(project, page_command("python manage.py makemigrations", commands))
    assert makemigrations.returncode == 0, makemigrations.stdout + makemigrations.stderr
    migrate = run_manage(project, page_command("python manage.py migrate", commands))
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    # migrate runs the system checks first and prints any message they give.
    for output in (migrate.stdout, migrate.stderr):
        assert "System check identified" not in output, migrate.stdout + migrate.stderr
        assert "WARNINGS" not in output, migrate.stdout + migrate.stderr
    check = run_manage(project, page_command("python manage.py check", commands))
    assert (check.returncode, check.stdout.strip(), check.stderr) == (0, NO_ISSUES, "")

    worker_commands = [shlex.split(c) for c in commands if c.startswith("celery ")]
    queues = [command[command.index("-Q") + 1] for command in worker_commands if "-Q" in command]
    assert sorted(queues) == ["celery", "heavy"], f"the page's worker commands: {worker_commands}"
    runserver = page_command("python manage.py runserver", commands)
    curl = page_command("curl ", commands)

    # Not the current app, no Django fixup: only a client of the project's broker.
    client = Celery(
        "quickstart-client", broker=project_redis, backend=project_redis, set_as_current=False, fixups=[]
    )
    with contextlib.closing(client), servers() as started:
        workers = {}
        for command in worker_commands:
            queue = command[command.index("-Q") + 1]
            hostname = f"quickstart-{queue}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
            argv = [str(CELERY), *command[1:], "--hostname", hostname, "--concurrency", "2"]
            workers[queue] = start(started, f"worker-{queue}", argv, project)
            wait_for_ping(client, workers[queue], hostname)

        port = free_port()
        web = start(
            started,
            "runserver",
            [sys.executable, *runserver[1:], f"127.0.0.1:{port}", "--noreload"],
            project,
        )

        def listening() -> bool:
            web.check_alive()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, HANG_TIMEOUT, "runserver to listen", interval=0.1)

        # The page's curl: POST its -d data to its URL's path.
        url = urllib.parse.urlsplit(curl[-1])
        data = curl[curl.index("-d") + 1].encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}{url.path}", data=data, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=HANG_TIMEOUT) as response:
                assert response.status == 202
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            pytest.fail(f"POST {url.path} answered {error.code}; {web.tail()}")
        assert answer["state"] == "creation_scheduled"
        volume_uuid = answer["uuid"]

        def settled() -> Mapping[str, str] | None:
            for server in started:
                server.check_alive()
            row = volume_row(project_database, volume_uuid)
            return row if row and row["state"] in ("ok", "erred") else None

        row = wait_until(settled, HANG_TIMEOUT, f"volume {volume_uuid} to reach ok or erred", interval=0.05)
        assert row == {"state": "ok", "error_message": ""}, "\n".join(s.tail() for s in started)
        assert history(project_database, volume_uuid) == [
            ("begin_creating", "creation_scheduled", "creating", "storage.create_volume"),
            ("set_ok", "creating", "ok", "storage.volume_created"),
        ]

        # The heavy throttled task ran on the heavy worker (and only there), and its result
        # is in the result backend.
        succeeded = re.compile(r"Task storage\.provision_volume\[(?P<id>[0-9a-f-]+)\] succeeded")
        match = wait_until(
            lambda: succeeded.search(workers["heavy"].log.read_text(errors="replace")),
            HANG_TIMEOUT,
            "the heavy worker to log storage.provision_volume's success",
        )
        assert "storage.provision_volume[" not in workers["celery"].log.read_text(errors="replace")
        result = client.AsyncResult(match.group("id"))
        assert result.get(timeout=HANG_TIMEOUT).startswith("region-1/disk-")
        assert result.state == "SUCCESS"
        web_log = web.log.read_text(errors="replace")
        assert NO_ISSUES in web_log, web.tail()
