"""Django system checks for task_workflow's configuration."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .conf import DEFAULTS

PER_PROCESS_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)


def _number(value: Any, *, minimum: float, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    return not isinstance(value, bool) and isinstance(value, int | float) and value >= minimum


VALIDATORS: dict[str, tuple[Any, str]] = {
    "CACHE": (lambda v: isinstance(v, str) and v in settings.CACHES, "a cache alias defined in CACHES"),
    "LOCK_TTL": (lambda v: _number(v, minimum=0.001) and v > 0, "a number of seconds > 0"),
    "THROTTLE_WAIT": (lambda v: _number(v, minimum=0, allow_none=True), "seconds >= 0, or None"),
    "THROTTLE_RETRY_BACKOFF": (lambda v: _number(v, minimum=0.001), "a number of seconds > 0"),
    "THROTTLE_RETRY_BACKOFF_MAX": (lambda v: _number(v, minimum=0.001), "a number of seconds > 0"),
    "THROTTLE_SOCKET_TIMEOUT": (lambda v: _number(v, minimum=0.01), "a number of seconds >= 0.01"),
    "THROTTLE_RESTART_GRACE": (lambda v: _number(v, minimum=0, allow_none=True), "seconds >= 0, or None"),
    "HEAVY_QUEUE": (lambda v: isinstance(v, str) and bool(v), "a non-empty queue name"),
    "TRANSITION_HISTORY": (lambda v: isinstance(v, bool), "True or False"),
}


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``TASK_WORKFLOW`` holds only known keys with sensible values."""
    configured = getattr(settings, "TASK_WORKFLOW", None)
    if configured is None:
        return []
    if not isinstance(configured, dict):
        return [Error("TASK_WORKFLOW must be a dict.", id="task_workflow.E001")]
    messages: list[CheckMessage] = []
    for key in sorted(set(configured) - set(DEFAULTS)):
        messages.append(
            Error(
                f"TASK_WORKFLOW has an unknown key {key!r}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="task_workflow.E002",
            )
        )
    for key, (is_valid, expected) in VALIDATORS.items():
        if key in configured and not is_valid(configured[key]):
            messages.append(
                Error(
                    f"TASK_WORKFLOW[{key!r}] = {configured[key]!r} is invalid: expected {expected}.",
                    id="task_workflow.E003",
                )
            )
    return messages


@register(Tags.caches)
def check_lock_cache(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The cache that holds throttle slots must be shared by every worker process."""
    configured = getattr(settings, "TASK_WORKFLOW", None) or {}
    if not isinstance(configured, dict):
        return []  # check_settings reports it
    alias = configured.get("CACHE", DEFAULTS["CACHE"])
    config: dict[str, Any] | None = settings.CACHES.get(alias) if isinstance(alias, str) else None
    if config is None:
        return []  # check_settings reports it
    backend: str = config.get("BACKEND", "")
    messages: list[CheckMessage] = []
    if backend in PER_PROCESS_CACHES:
        messages.append(
            Warning(
                f"Throttle slots live in cache {alias!r} ({backend.rsplit('.', 1)[-1]}), which is "
                "private to each process: throttle limits will not hold across workers.",
                hint="Point TASK_WORKFLOW['CACHE'] at a django-redis cache (or DatabaseCache).",
                id="task_workflow.W001",
            )
        )
    culling = (
        "django.core.cache.backends.db.DatabaseCache",
        "django.core.cache.backends.filebased.FileBasedCache",
    )
    if backend in culling and int(config.get("OPTIONS", {}).get("MAX_ENTRIES", 300)) < 100_000:
        messages.append(
            Warning(
                f"Cache {alias!r} culls entries past OPTIONS['MAX_ENTRIES'] (default 300), which "
                "would drop live throttle slots.",
                hint="Set OPTIONS={'MAX_ENTRIES': 1_000_000} (or more) on the lock cache.",
                id="task_workflow.W003",
            )
        )
    if backend.startswith("django_redis.") and config.get("OPTIONS", {}).get("IGNORE_EXCEPTIONS"):
        messages.append(
            Warning(
                f"Cache {alias!r} has IGNORE_EXCEPTIONS=True, which hides 'Redis down' from "
                "code that uses the cache API.",
                hint="Use a separate cache alias without IGNORE_EXCEPTIONS for TASK_WORKFLOW['CACHE'].",
                id="task_workflow.W002",
            )
        )
    return messages
