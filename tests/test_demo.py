"""``manage.py run_demo`` on the embedded defaults (SQLite, the SQLite broker and result
store, the database cache) in a temporary ``TASK_WORKFLOW_VAR_DIR``: no server needed.

The demo runs as a user runs it (``migrate``, ``createcachetable``, ``run_demo`` as
subprocesses), with real Celery worker processes; each test kills whatever is left of the
demo's process group when it ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]

# The PostgreSQL pass runs them; they use no test database, so the SQLite pass would only
# repeat them.
pytestmark = pytest.mark.skipif(
    os.environ.get("TEST_DATABASE") == "sqlite", reason="needs no server; runs in the first pass only"
)

#: The demo's expected final states: the failing backend ids end erred.
EXPECTED = "vm-1 offline, vm-2 erred, vm-3 online, vm-4 erred"


def _demo_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """The embedded defaults: no DATABASE_URL or REDIS_URL, the example project's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "TEST_DATABASE")}
    env.update(
        DJANGO_SETTINGS_MODULE="example_project.settings",
        TASK_WORKFLOW_VAR_DIR=str(var_dir),
        EXAMPLE_TIMELINE="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _manage(var_dir: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=_demo_env(var_dir), check=True, timeout=120
    )


@pytest.fixture
def var_dir(tmp_path: Path) -> Path:
    """A migrated var directory with the cache table, as ``make demo`` prepares it."""
    var = tmp_path / "var"
    _manage(var, "migrate", "--verbosity", "0")
    _manage(var, "createcachetable")
    return var


@pytest.fixture
def demo_processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Demo commands a test starts (each in a session of its own): at the end, their whole
    process group (the demo, its workers and their pool processes) is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        # Pool processes orphaned by a killed worker stay in the group: wait until none is left.
        wait_until(lambda pgid=process.pid: not _group_members(pgid), 15, "the demo's processes to exit")


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _worker_pid(demo_pid: int, queue: str) -> int | None:
    """The pid of the demo's ``celery worker`` consuming ``queue`` (a child of the demo)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == demo_pid and b"worker" in cmdline and queue.encode() in cmdline:
            return int(stat.parent.name)
    return None


def test_the_demo_runs_many_times_with_the_expected_final_states(var_dir: Path) -> None:
    """The whole story ten times on one pair of workers (rows and timeline reset between
    runs): every run ends with the same final states, and the last draws its chart."""
    runs = 10
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "manage.py", "run_demo", "--runs", str(runs), "--timeout", "30"],
        cwd=ROOT,
        env=_demo_env(var_dir, EXAMPLE_SLOW_SECONDS="0.2", EXAMPLE_BACKEND_DELAY="0.1"),
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    finished = re.findall(r"^run (\d+)/(\d+) finished in [\d.]+s: (.*)$", result.stdout, re.MULTILINE)
    assert [(int(n), int(total)) for n, total, _ in finished] == [(n, runs) for n in range(1, runs + 1)]
    assert {states for *_, states in finished} == {EXPECTED}, output
    assert "broker: sqlalchemy (sqlite)" in result.stdout
    assert (var_dir / "timeline.png").exists()
    print(f"{runs} runs of the demo in {elapsed:.1f}s (workers started once)")


def test_a_worker_killed_while_the_demo_waits_stops_the_demo_at_once(
    var_dir: Path, demo_processes: list[subprocess.Popen[str]]
) -> None:
    """SIGKILL of the heavy worker while its slow task runs: the demo notices within
    seconds (not after its timeout), stops the other worker, exits non-zero, and names the
    dead worker, its exit code and its log with the log's last lines."""
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "run_demo", "--timeout", "120"],
        cwd=ROOT,
        env=_demo_env(var_dir, EXAMPLE_SLOW_SECONDS="60", EXAMPLE_BACKEND_DELAY="0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    demo_processes.append(demo)
    timeline = var_dir / "timeline.jsonl"
    wait_until(
        lambda: timeline.exists() and '"task": "example.slow"' in timeline.read_text(),
        60,
        "the heavy worker to start example.slow",
    )
    heavy = wait_until(lambda: _worker_pid(demo.pid, "heavy"), 10, "the heavy worker's pid")
    default = wait_until(lambda: _worker_pid(demo.pid, "celery"), 10, "the default worker's pid")
    os.kill(heavy, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        output, _ = demo.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the demo still waits 20s after its heavy worker was killed")
    stopped_after = time.monotonic() - killed_at
    assert demo.returncode != 0, output
    assert stopped_after < 10, output
    log_path = var_dir / "demo-worker-heavy.log"
    assert re.search(r"worker heavy .*exited with code -9", output), output
    assert str(log_path) in output, output
    # The tail of the dead worker's log: its own last lines, e.g. the task it received.
    last_line = log_path.read_text().rstrip("\n").rsplit("\n", 1)[-1]
    assert last_line in output, output
    assert "example.slow" in output.split(str(log_path), 1)[1], output
    # The other worker was stopped (and reaped) before the demo exited.
    assert not Path(f"/proc/{default}").exists()
    print(f"the demo stopped {stopped_after:.1f}s after the heavy worker was killed")
