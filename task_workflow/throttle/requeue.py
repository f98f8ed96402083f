"""Re-queueing a throttled task: jittered backoff, and a header that counts the attempts.

A task that finds every slot busy for ``wait`` seconds, or the slot store unreachable, is
sent again with a countdown instead of failing; unlike ``task.retry()`` this does not use
up ``max_retries``.
"""

from __future__ import annotations

import logging
import random
from typing import Any, cast

from celery import Task
from celery.exceptions import Reject, Retry

from ..conf import get_setting

logger = logging.getLogger(__name__)

#: Message header counting throttle re-queues (drives the backoff; not ``retries``).
THROTTLE_ATTEMPT_HEADER = "task_workflow_throttle_attempt"


def backoff(attempt: int) -> float:
    """Jittered exponential backoff for the ``attempt``-th re-queue (1-based), in seconds:
    ``THROTTLE_RETRY_BACKOFF`` doubling up to ``THROTTLE_RETRY_BACKOFF_MAX``, then a random
    point in its upper half (so re-queued tasks do not come back in step)."""
    base = float(get_setting("THROTTLE_RETRY_BACKOFF"))
    cap = float(get_setting("THROTTLE_RETRY_BACKOFF_MAX"))
    ceiling = min(cap, base * 2 ** min(attempt - 1, 32))
    return random.uniform(ceiling / 2, ceiling)


def throttle_attempts(task: Task) -> int:
    """How many times the running task's message has been re-queued by a throttle."""
    return int((task.request.headers or {}).get(THROTTLE_ATTEMPT_HEADER) or 0)


def requeue(task: Task, reason: str) -> Retry:
    """Re-send the running task with backoff; return the ``Retry`` to raise.

    Unlike ``task.retry()`` this keeps ``request.retries`` (throttling does not use up
    ``max_retries``) while the message keeps its id, chain, callbacks and errbacks.

    If the broker cannot take the message either (a Redis that is broker and slot store
    at once is down), raises Celery's ``Reject(requeue=True)``: control flow, not a
    failure of the task (no error transition), and with ``acks_late`` the broker delivers
    the message again once it is back.
    """
    request = task.request
    headers = dict(request.headers or {})
    attempt = throttle_attempts(task) + 1
    headers[THROTTLE_ATTEMPT_HEADER] = attempt
    countdown = backoff(attempt)
    signature = task.signature_from_request(
        request, countdown=countdown, retries=request.retries, headers=headers
    )
    message = f"{reason}; re-queued in {countdown:.1f}s (throttle attempt {attempt})"
    if request.is_eager:  # apply() runs the signature again itself
        return Retry(message, when=cast(Any, countdown), is_eager=True, sig=signature)
    try:
        signature.apply_async()
    except Exception as exc:
        logger.error(
            "Throttle: could not re-queue %s[%s] (%s); rejecting it back to the broker",
            task.name,
            request.id,
            exc,
        )
        raise Reject(f"{reason}; the broker could not take the re-queued task: {exc}", requeue=True) from exc
    return Retry(message, when=cast(Any, countdown), sig=signature)
