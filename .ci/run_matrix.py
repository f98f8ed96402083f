"""Run the nox sessions tagged ``matrix`` (every supported Python/Django pair but the one
``make test`` runs, and the lowest dependencies), a few at a time, and print one line per
session: result and wall time. Exit status 1 when any session failed.

Usage: ``python .ci/run_matrix.py [--jobs 2] [SESSION ...]``. Each session writes its
whole output to ``test-artifacts/matrix/<session>.log``; the end of a failed session's log
is printed. Sessions can run side by side because each has its own PostgreSQL database and
Redis database number (``noxfile.py``); the suite waits on workers and servers much more
than it computes, so two sessions on two cores take little longer than one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
NOX = [sys.executable, "-m", "nox", "--noxfile", str(ROOT / "noxfile.py")]
LOGS = ROOT / "test-artifacts" / "matrix"
#: Seconds a session has to tear down (stop its workers, drop its database) after SIGINT.
TEARDOWN_SECONDS = 60

#: The sessions running now, each in a process group of its own.
running: set[subprocess.Popen[bytes]] = set()
running_lock = threading.Lock()
stopping = threading.Event()


def matrix_sessions() -> list[str]:
    listing = subprocess.run(
        [*NOX, "-t", "matrix", "--list", "--json"], check=True, capture_output=True, text=True
    )
    return [entry["session"] for entry in json.loads(listing.stdout)]


def run_session(session: str) -> tuple[str, int, float, str]:
    """Run one session; returns (session, exit status, seconds, the pytest summary line)."""
    log = LOGS / (re.sub(r"[^\w.-]+", "_", session).strip("_") + ".log")
    started = time.monotonic()
    with log.open("w") as out:
        if stopping.is_set():
            return session, 1, 0.0, "not started: the matrix was stopped"
        process = subprocess.Popen(
            [*NOX, "-s", session], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        with running_lock:
            running.add(process)
        try:
            status = process.wait()
        finally:
            with running_lock:
                running.discard(process)
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    summaries = re.findall(r"^=+ (.*(?:passed|failed|error).*) =+$", text, flags=re.MULTILINE)
    summary = summaries[-1] if summaries else "no pytest summary"
    if status != 0:
        tail = "\n".join(text.splitlines()[-60:])
        print(f"--- {session} failed; end of {log.relative_to(ROOT)}:\n{tail}\n---", flush=True)
    else:
        print(f"{session}: ok in {elapsed:.0f} s ({summary})", flush=True)
    return session, status, elapsed, summary


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_sessions(signum: int, frame: FrameType | None) -> None:
    """On SIGTERM or SIGINT: interrupt every running session's command (pytest) as Ctrl-C
    would, so that it stops its workers and servers and drops its database; start no new
    session; kill what is left after ``TEARDOWN_SECONDS``. Not nox itself: interrupted, it
    gives its command 0.3 s before it terminates it, too short for that teardown."""
    stopping.set()
    with running_lock:
        processes = list(running)
    for process in processes:
        for pid in children(process.pid) or [process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + TEARDOWN_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MATRIX_JOBS", "2")))
    parser.add_argument("sessions", nargs="*", help="default: every session tagged 'matrix'")
    args = parser.parse_args()
    LOGS.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, stop_sessions)
    signal.signal(signal.SIGINT, stop_sessions)
    sessions = args.sessions or matrix_sessions()
    print(f"matrix: {len(sessions)} sessions, {args.jobs} at a time", flush=True)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_session, sessions))
    print(f"\n{'session':<28} {'result':<7} {'time':>7}  pytest")
    for session, status, elapsed, summary in results:
        print(f"{session:<28} {'ok' if status == 0 else 'FAILED':<7} {elapsed:>6.0f}s  {summary}")
    print(f"matrix wall time: {time.monotonic() - started:.0f} s")
    return 1 if any(status for _, status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
