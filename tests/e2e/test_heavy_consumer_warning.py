"""The worker start-up warning for heavy tasks without a consumer of their queue, on real
workers (``task_workflow.queue_consumers``), Redis as the ``TASK_WORKFLOW['CACHE']`` cache.

The workers run ``tests.e2e.mistakes_settings`` with a grace period of 1 s. They consume
queues of their own (never ``celery``), so they take no task of the session's other tests;
what matters is that they do not consume ``HEAVY_QUEUE`` (or do). The example project has a
heavy task, ``example.slow``.

On the code before this change a worker without a heavy consumer said nothing at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.core.cache import caches

from task_workflow.conf import get_setting
from task_workflow.queue_consumers import consumer_key
from tests.waiting import wait_until
from tests.workers import HANG_TIMEOUT, WorkerProcess, stop_workers

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

#: Seconds a default worker waits before it looks for a heavy consumer (the default is 60).
GRACE = 1.0
MISSING = "No worker consuming the heavy queue"


@pytest.fixture
def no_heavy_consumer_seen() -> Iterator[None]:
    """Forget heavy consumers recorded by workers of earlier tests (their record outlives
    them by up to ANNOUNCE_TTL)."""
    cache = caches[get_setting("CACHE")]
    cache.delete(consumer_key(get_setting("HEAVY_QUEUE")))
    yield
    cache.delete(consumer_key(get_setting("HEAVY_QUEUE")))


def worker(celery_app, worker_env, name: str, queues: tuple[str, ...], **env: str) -> WorkerProcess:
    return WorkerProcess(
        celery_app,
        env={
            **worker_env,
            "DJANGO_SETTINGS_MODULE": "tests.e2e.mistakes_settings",
            "MISTAKES_HEAVY_GRACE": str(GRACE),
            **env,
        },
        name=name,
        queues=queues,
        concurrency=1,
    )


def log_lines(worker: WorkerProcess) -> list[str]:
    return worker.log_path.read_text(errors="replace").splitlines()


def wait_for_line(worker: WorkerProcess, text: str) -> list[str]:
    """Wait until a line of the worker's log contains ``text``; return the whole log."""

    def log_with_text() -> list[str] | None:
        lines = log_lines(worker)
        return lines if any(text in line for line in lines) else None

    return wait_until(log_with_text, HANG_TIMEOUT, f"{text!r} in {worker.log_path}")


def test_a_worker_without_a_heavy_consumer_warns_once_naming_tasks_queue_and_command(
    celery_app, worker_env, no_heavy_consumer_seen
):
    heavy_queue = get_setting("HEAVY_QUEUE")
    default = worker(celery_app, worker_env, "no-heavy-consumer", ("mistakes-default",)).start()
    try:
        lines = wait_for_line(default, MISSING)
        assert default.alive()
    finally:
        default.stop()
    warnings = [line for line in lines if MISSING in line]
    assert len(warnings) == 1, "\n".join(lines)
    (warning,) = warnings
    assert ": WARNING/" in warning, warning
    for part in (f"{heavy_queue!r}", "example.slow", f"celery -A example_project worker -Q {heavy_queue}"):
        assert part in warning, (part, warning)
    assert "Traceback" not in "\n".join(lines)


def test_no_warning_when_a_worker_consumes_the_heavy_queue(celery_app, worker_env, no_heavy_consumer_seen):
    heavy_queue = get_setting("HEAVY_QUEUE")
    # The heavy worker first: it records its queues when it is ready. Started side by side,
    # a loaded machine (CI, beside two matrix sessions) once readied it 1.05 s after the
    # other worker, whose 1 s grace had just ended: the warning was right.
    heavy = worker(celery_app, worker_env, "heavy-consumer", (heavy_queue,)).start()
    try:
        default = worker(celery_app, worker_env, "with-heavy-consumer", ("mistakes-default",)).start()
    except BaseException:
        heavy.stop()
        raise
    try:
        lines = wait_for_line(default, f"The heavy queue {heavy_queue!r} has a consumer")
        heavy_lines = log_lines(heavy)
    finally:
        stop_workers(heavy, default)
    assert not [line for line in lines if MISSING in line], "\n".join(lines)
    assert f"worker {heavy.hostname} was seen" in "\n".join(lines)
    # The heavy worker consumes the queue itself: it does not look for another consumer.
    assert not [line for line in heavy_lines if "heavy queue" in line], "\n".join(heavy_lines)


def test_a_cache_that_is_down_neither_fails_nor_delays_the_worker(celery_app, worker_env):
    """Port 1 refuses connections: the worker starts, says at INFO that it could not record
    or check, and logs no warning nor traceback."""
    down = worker(
        celery_app,
        worker_env,
        "cache-down",
        ("mistakes-default",),
        MISTAKES_CACHE_URL="redis://127.0.0.1:1/0",
    ).start()
    try:
        lines = wait_for_line(down, "Could not check whether a worker consumes the heavy queue")
        assert down.alive()
    finally:
        down.stop()
    text = "\n".join(lines)
    assert "Could not record this worker's queues" in text
    assert not [line for line in lines if ": WARNING/" in line or ": ERROR/" in line], text
    assert "Traceback" not in text
