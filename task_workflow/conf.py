"""The one accessor for task_workflow settings.

All settings live in a single ``TASK_WORKFLOW`` dict in Django settings; every key has
a default here, so an empty or missing dict is a valid configuration.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings

#: The values of ``IF_NOT_PERMITTED`` (and of ``transition(..., if_not_permitted=...)``).
IF_NOT_PERMITTED_CHOICES = ("fail", "ignore")

#: Defaults for every key of ``settings.TASK_WORKFLOW``.
DEFAULTS: dict[str, Any] = {
    # Django cache alias that stores throttle slots.
    "CACHE": "default",
    # Seconds a throttle lease lives without renewal; a dead holder frees its slot
    # within this time.
    "LOCK_TTL": 60,
    # Seconds a task waits in-process for a free slot before it is re-queued.
    "THROTTLE_WAIT": 5.0,
    # Bounds, in seconds, of the jittered backoff used to re-queue a throttled task.
    "THROTTLE_RETRY_BACKOFF": 1.0,
    "THROTTLE_RETRY_BACKOFF_MAX": 30.0,
    # Seconds any one call of the throttle to Redis may take (socket timeout of its own
    # connections), so a half-open connection cannot stall the lease renewer.
    "THROTTLE_SOCKET_TIMEOUT": 5.0,
    # Seconds a restarted Redis (which forgot every lease) grants no slot; at least the
    # longest lease anyone holds. ``None``: LOCK_TTL.
    "THROTTLE_RESTART_GRACE": None,
    # How many replicas of the lock cache's Redis must acknowledge (``WAIT``) a grant, a
    # renewal or a release before it counts; fewer within THROTTLE_REPLICAS_TIMEOUT is a
    # store failure (fail closed). 0: no ``WAIT`` (a failover to a replica that missed the
    # latest grants may grant a held slot again).
    "THROTTLE_REPLICAS": 0,
    # Seconds one ``WAIT`` for THROTTLE_REPLICAS acknowledgements may take; below
    # THROTTLE_SOCKET_TIMEOUT.
    "THROTTLE_REPLICAS_TIMEOUT": 0.5,
    # Queue that receives tasks declared with ``is_heavy_task=True``.
    "HEAVY_QUEUE": "heavy",
    # Write a TransitionRecord for every transition applied through task_workflow.
    "TRANSITION_HISTORY": True,
    # What a @transition task does when its transition is not allowed (a duplicate message,
    # an entity that moved on): "fail" ends it as FAILURE with TransitionNotPermitted, logged
    # as one WARNING line; "ignore" drops the message (acked, no result, logged at DEBUG).
    # transition(..., if_not_permitted=...) overrides it per task.
    "IF_NOT_PERMITTED": "fail",
    # Seconds after start-up at which a worker that does not consume HEAVY_QUEUE, in a
    # project with heavy tasks, looks in CACHE for a worker that does, and logs a WARNING
    # if none was seen. ``None``: workers neither record their queues nor check.
    "HEAVY_CONSUMER_GRACE": 60.0,
}


def get_setting(name: str) -> Any:
    """Return ``settings.TASK_WORKFLOW[name]``, or its default when unset.

    Raises ``KeyError`` for a name that is not a task_workflow setting, so a typo in
    code fails loudly instead of silently reading ``None``.
    """
    if name not in DEFAULTS:
        raise KeyError(f"{name!r} is not a TASK_WORKFLOW setting; known: {sorted(DEFAULTS)}")
    configured = getattr(django_settings, "TASK_WORKFLOW", None) or {}
    return configured.get(name, DEFAULTS[name])
