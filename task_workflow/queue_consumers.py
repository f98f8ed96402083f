"""Warn at worker start-up when heavy tasks have no worker consuming their queue.

Heavy tasks (``@shared_task(is_heavy_task=True)``) are routed to
``TASK_WORKFLOW['HEAVY_QUEUE']``; with no worker consuming it they wait in the broker for
ever, and nothing says so. Each ``celery worker`` therefore records in the
``TASK_WORKFLOW['CACHE']`` cache (the one the throttle shares between workers) which queues
it consumes, under one key per queue with a TTL, and refreshes that record from a daemon
thread. A worker that does not consume the heavy queue itself, in a project with heavy
tasks, looks ``HEAVY_CONSUMER_GRACE`` seconds after start-up whether any worker consuming
it was seen, and if none logs one WARNING naming the heavy tasks, the queue and the command
that starts a consumer.

Everything runs in that thread, so start-up is not slowed; a cache that is down is logged
at INFO and the worker goes on. What it cannot see (workers of another cache or settings
module, a consumer that stops later, ...): ``docs/howto/workers-per-queue.md``.

Only Celery's public API: the ``worker_ready`` and ``worker_shutdown`` signals, the
consumer's ``task_consumer.queues`` (what ``celery inspect active_queues`` reports) and
``hostname``, and the app's task registry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from .conf import get_setting

logger = logging.getLogger(__name__)

#: Seconds between two records of a worker's queues in the cache.
ANNOUNCE_INTERVAL = 60.0
#: Seconds a record lives: a worker that stopped refreshing is no longer "seen" after it.
ANNOUNCE_TTL = 3 * ANNOUNCE_INTERVAL
#: Prefix of the cache keys, one per queue: ``task_workflow:queue-consumer:<queue>``.
KEY_PREFIX = "task_workflow:queue-consumer:"

_announcers: dict[str, QueueAnnouncer] = {}
_announcers_lock = threading.Lock()


def consumer_key(queue: str) -> str:
    """The cache key that says a worker consuming ``queue`` was seen recently."""
    return f"{KEY_PREFIX}{queue}"


def heavy_task_names(app: Celery) -> list[str]:
    """Names of the app's tasks declared with ``is_heavy_task=True``, sorted."""
    return sorted(name for name, task in list(app.tasks.items()) if getattr(task, "is_heavy_task", False))


def consumed_queues(consumer: Any) -> list[str]:
    """Names of the queues a worker's consumer consumes now (``[]`` before it consumes)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    return sorted({queue.name for queue in getattr(task_consumer, "queues", None) or ()})


def missing_consumer_message(app: Celery, queue: str, tasks: list[str], grace: float) -> str:
    """The WARNING logged when no worker consuming ``queue`` was seen."""
    shown = ", ".join(tasks[:10]) + (f" and {len(tasks) - 10} more" if len(tasks) > 10 else "")
    return (
        f"No worker consuming the heavy queue {queue!r} was seen within {grace:g}s of this "
        f"worker's start: the heavy tasks ({shown}) wait in the broker until one runs. "
        f"Start one: celery -A {app.main or '<app>'} worker -Q {queue} (docs: Running workers per queue)"
    )


class QueueAnnouncer(threading.Thread):
    """The daemon thread of one worker: records its queues in the cache every
    :data:`ANNOUNCE_INTERVAL` seconds and, once, ``grace`` seconds after start-up, checks
    that the heavy queue has a consumer."""

    def __init__(self, consumer: Any, grace: float) -> None:
        super().__init__(name="task_workflow-queue-announcer", daemon=True)
        self.consumer = consumer
        self.app: Celery = consumer.app
        self.hostname = str(getattr(consumer, "hostname", "") or "")
        self.grace = grace
        self.stopped = threading.Event()

    def run(self) -> None:
        """Announce now and every interval; check once after the grace period."""
        check_at: float | None = time.monotonic() + self.grace
        next_announce = time.monotonic()
        while not self.stopped.is_set():
            now = time.monotonic()
            if now >= next_announce:
                self.announce()
                next_announce = now + ANNOUNCE_INTERVAL
            if check_at is not None and now >= check_at:
                self.check_heavy_consumer()
                check_at = None
            wake_at = next_announce if check_at is None else min(next_announce, check_at)
            self.stopped.wait(max(0.0, wake_at - time.monotonic()))

    def stop(self) -> None:
        """Ask the thread to end (it does within a moment; a daemon never delays exit)."""
        self.stopped.set()

    def announce(self) -> None:
        """Record in the cache that this worker consumes its queues now."""
        queues = consumed_queues(self.consumer)
        if not queues:
            return
        record = {"hostname": self.hostname, "seen_at": time.time()}
        try:
            cache = _cache()
            cache.set_many({consumer_key(queue): record for queue in queues}, timeout=ANNOUNCE_TTL)
        except Exception as exc:  # the cache is down: the next interval tries again
            logger.info(
                "Could not record this worker's queues %s in the cache: %s: %s",
                queues,
                type(exc).__name__,
                exc,
            )
        finally:
            _close_thread_connections()

    def check_heavy_consumer(self) -> None:
        """Log a WARNING if the app has heavy tasks, this worker does not consume the heavy
        queue, and no worker that does was seen; an INFO line when one was."""
        queue = get_setting("HEAVY_QUEUE")
        tasks = heavy_task_names(self.app)
        if not tasks or queue in consumed_queues(self.consumer):
            return
        try:
            seen = _cache().get(consumer_key(queue))
        except Exception as exc:
            logger.info(
                "Could not check whether a worker consumes the heavy queue %r: %s: %s",
                queue,
                type(exc).__name__,
                exc,
            )
            return
        finally:
            _close_thread_connections()
        if seen is None:
            logger.warning(missing_consumer_message(self.app, queue, tasks, self.grace))
        else:
            hostname = seen.get("hostname") if isinstance(seen, dict) else None
            logger.info("The heavy queue %r has a consumer (worker %s was seen)", queue, hostname or "?")


def _cache() -> Any:
    from django.core.cache import caches

    return caches[get_setting("CACHE")]


def _close_thread_connections() -> None:
    """A DatabaseCache opened a database connection in this thread: close it rather than
    hold it idle between two announcements (connections are per thread)."""
    from django.db import connections

    connections.close_all()


def start_announcer(sender: Any = None, **kwargs: Any) -> None:
    """``worker_ready`` receiver: start the worker's announcer thread (unless
    ``HEAVY_CONSUMER_GRACE`` is ``None``). Never raises: a worker must start anyway."""
    try:
        grace = get_setting("HEAVY_CONSUMER_GRACE")
        if grace is None or sender is None or getattr(sender, "app", None) is None:
            return
        announcer = QueueAnnouncer(sender, float(grace))
        with _announcers_lock:
            if announcer.hostname in _announcers:
                return
            _announcers[announcer.hostname] = announcer
        announcer.start()
    except Exception:
        logger.debug("Could not start the queue announcer", exc_info=True)


def stop_announcers(sender: Any = None, **kwargs: Any) -> None:
    """``worker_shutdown`` receiver: stop the announcer threads of this process."""
    with _announcers_lock:
        announcers = list(_announcers.values())
        _announcers.clear()
    for announcer in announcers:
        announcer.stop()


def connect_worker_signals() -> None:
    """Connect :func:`start_announcer` and :func:`stop_announcers` to Celery's worker
    signals (called from ``TaskWorkflowConfig.ready()``; connecting twice is a no-op)."""
    worker_ready.connect(start_announcer, dispatch_uid="task_workflow.queue_consumers.start", weak=False)
    worker_shutdown.connect(stop_announcers, dispatch_uid="task_workflow.queue_consumers.stop", weak=False)
