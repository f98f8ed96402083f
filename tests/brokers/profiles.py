"""The Celery settings a broker-restart run compares ("profiles").

``celery_options(profile, broker_url)`` returns Celery's own (lower-case) setting names:
the scenario's producer app takes them as they are, and ``tests.brokers.settings`` turns
them into ``CELERY_*`` Django settings for the workers, so both sides of a run use the
same settings. No Django here: the module is imported before Django is set up.

``recommended`` is what README's "Broker restarts" recommends; ``defaults`` is Celery's
defaults; each other profile is ``recommended`` with one setting dropped or changed, to
show what that setting does (``tests/campaigns/test_broker_restart_long.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

#: Seconds a Redis-broker message may stay unacknowledged before another consumer gets it.
#: Messages a worker had received when the broker went away (prefetched, or whose ack was
#: lost) come back only then: with kombu's default, an hour. The scenario's longest task
#: runs 0.4 s; short, so they come back within the test (README: longer than your longest
#: task, or running tasks are given out twice).
TEST_VISIBILITY_TIMEOUT = float(os.environ.get("BROKER_TEST_VISIBILITY_TIMEOUT", "5"))

#: Publishing (a producer's send, a worker's link callback) tries 10 more times, 0, 0.5, 1,
#: 1, ... s apart. A try fails at once on a pooled connection the client already knows is
#: dead, or after the client's own reconnect backoff (redis-py: about 6 s): Celery's default
#: 3 retries gave up after 0.6 s to 20 s (a 2 s Redis outage left a chain in ``updating``);
#: these cover at least 10 s and up to about a minute.
PUBLISH_RETRY_POLICY = {"max_retries": 10, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0}

#: Celery's default publish retry policy (celery.app.defaults), for the variant without ours.
CELERY_DEFAULT_PUBLISH_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_max": 1,
    "interval_step": 0.2,
}


def broker_kind(broker_url: str) -> str:
    """``redis`` or ``rabbitmq``, from the URL's scheme."""
    scheme = urlsplit(broker_url).scheme
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "rabbitmq"
    raise ValueError(f"unsupported broker URL scheme {scheme!r} in {broker_url!r}")


def queue_name(profile: str) -> str:
    """Each profile's tasks go to a queue of their own, so profiles can share one broker."""
    return f"restart-{profile}"


def _recommended(kind: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        # The message is acknowledged after the body ran, not before: a message whose
        # worker or broker connection went away comes back instead of being gone (after a
        # broker restart, also a chain step whose link callback could not be published).
        "task_acks_late": True,
        # ... also when the pool process died (not exercised by a broker restart).
        "task_reject_on_worker_lost": True,
        # No message waits in the worker's memory behind a busy pool process: on Redis,
        # such messages wait for the visibility timeout after a restart.
        "worker_prefetch_multiplier": 1,
        # A worker started while the broker is down waits for it instead of exiting
        # (Celery 5 falls back to broker_connection_retry, True; Celery 6 will not).
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
    }
    if kind == "redis":
        options["broker_transport_options"] = {
            "visibility_timeout": TEST_VISIBILITY_TIMEOUT,
            # kombu looks for expired unacknowledged messages every 10 s x 10 calls
            # (about 100 s): every second here, so they come back one visibility timeout
            # after their delivery.
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    else:
        # The broker confirms each publish once the (persistent) message is on disk.
        # Without it, a node killed while its queue is busy forgot every message it had
        # not flushed yet: 354 of 400 (the whole queue), though published seconds before.
        options["broker_transport_options"] = {"confirm_publish": True}
    return options


def _defaults(kind: str) -> dict[str, Any]:
    # Celery's and kombu's defaults; the empty transport options undo the example
    # project's visibility_timeout (3600 s, the same as kombu's default anyway).
    return {"broker_transport_options": {}}


def _variant(**changes: Any) -> Callable[[str], dict[str, Any]]:
    """``recommended`` with ``changes``; a value ``...`` drops the setting (Celery's default)."""

    def build(kind: str) -> dict[str, Any]:
        options = _recommended(kind)
        for key, value in changes.items():
            if value is ...:
                options.pop(key, None)
            else:
                options[key] = value
        return options

    return build


def _redis_variant(**transport: Any) -> Callable[[str], dict[str, Any]]:
    """``recommended`` with these Redis transport options (RabbitMQ: as recommended)."""

    def build(kind: str) -> dict[str, Any]:
        options = _recommended(kind)
        if kind == "redis":
            options["broker_transport_options"] = {**options["broker_transport_options"], **transport}
        return options

    return build


def _without_confirms(kind: str) -> dict[str, Any]:
    options = _recommended(kind)
    options["broker_transport_options"].pop("confirm_publish", None)
    return options


#: name -> (what it is, options by broker kind)
PROFILES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "recommended": ("README's recommendation", _recommended),
    "defaults": ("Celery's defaults", _defaults),
    "no-acks-late": ("recommended, without acks_late", _variant(task_acks_late=False)),
    "no-publish-retry": (
        "recommended, Celery's default publish retry policy",
        _variant(task_publish_retry_policy=dict(CELERY_DEFAULT_PUBLISH_RETRY_POLICY)),
    ),
    "prefetch-4": (
        "recommended, prefetch multiplier 4 (Celery's default)",
        _variant(worker_prefetch_multiplier=...),
    ),
    "visibility-3600": (
        "recommended, visibility_timeout 3600 s and kombu's restore sweep (Redis)",
        _redis_variant(visibility_timeout=3600, unacked_restore_interval=10, unacked_restore_throttle=10),
    ),
    "no-confirm": ("recommended, without publisher confirms (RabbitMQ)", _without_confirms),
    "cancel-on-loss": (
        "recommended + worker_cancel_long_running_tasks_on_connection_loss",
        _variant(worker_cancel_long_running_tasks_on_connection_loss=True),
    ),
    "dedup": (
        "recommended + worker_deduplicate_successful_tasks",
        _variant(worker_deduplicate_successful_tasks=True),
    ),
}


def celery_options(profile: str, broker_url: str) -> dict[str, Any]:
    """Every Celery setting of ``profile`` on the broker at ``broker_url``."""
    try:
        _, build = PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown broker profile {profile!r}; known: {', '.join(PROFILES)}") from None
    return {
        **build(broker_kind(broker_url)),
        "broker_url": broker_url,
        "task_default_queue": queue_name(profile),
    }


def visibility_timeout(options: dict[str, Any]) -> float:
    """Seconds until a Redis broker gives an unacknowledged message out again (kombu's
    default, an hour, when unset), plus the restore sweep's period."""
    transport = options.get("broker_transport_options") or {}
    sweep = transport.get("unacked_restore_interval", 10) * transport.get("unacked_restore_throttle", 10)
    return float(transport.get("visibility_timeout", 3600)) + float(sweep)
