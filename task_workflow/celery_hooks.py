"""Every use of Celery's private API in task_workflow, in one place.

Celery has no public way to do these things; each function below says which private
name it uses and what stops working if Celery changes it. ``tests/test_checks_routing.py``
(``test_celery_private_api_*``) checks each of them against the installed Celery, so an
upgrade that changes one fails there first rather than in a worker.

- :func:`current_task_object`: the public ``celery.current_task`` is a proxy, never
  ``None`` itself (it is falsy when no task runs); callers keep the task past the call,
  so it is unwrapped with the proxy's ``_get_current_object()`` (``celery.local.Proxy``'s
  documented way to reach the object behind it, which Celery's own modules use). If it
  changes, no code can tell it runs inside a task: transitions are recorded without
  their task, and the throttle raises instead of re-queueing the task.
- :func:`on_every_app_finalized`: Celery's public ``app.on_after_finalize`` signal is per
  app, and nothing public announces that an app was created or finalized, nor lists the
  apps. ``@shared_task`` itself registers with every app through
  ``celery._state.connect_on_app_finalize`` (called at ``finalize()``) plus
  ``celery._state._get_active_apps`` (the apps finalized before). If either changes, the
  heavy-task router is no longer installed: heavy tasks go to the default queue.
- :func:`project_celery_app`: ``celery.current_app`` creates and installs a fallback app
  when none exists yet; the thread's current app and ``celery._state.default_app`` are
  read instead. If they change, check W006 finds no app and reports nothing.
- :func:`app_fixups`: ``app._fixups`` holds the fixup instances Celery created (the
  public ``app.fixups`` holds only their names, installed or not). If it changes, W006
  reports nothing.
- :func:`has_autoretry_wrapper`: Celery's ``autoretry_for`` wraps ``task.run`` and keeps
  the original as ``task._orig_run``. If that changes, a task's failure is treated as final
  even when Celery will retry it (its error transition runs at the first failure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, Task, current_task
from celery import _state as celery_state


def current_task_object() -> Task | None:
    """The Celery task executing in this thread (the object, not a proxy), or ``None``."""
    task: Task | None = current_task._get_current_object()  # type: ignore[attr-defined]
    return task


def on_every_app_finalized(callback: Callable[[Celery], None]) -> None:
    """Call ``callback(app)`` for every Celery app: those already finalized now, the
    others when they are finalized (``callback`` must be idempotent)."""
    celery_state.connect_on_app_finalize(callback)
    for app in list(celery_state._get_active_apps()):  # type: ignore[attr-defined]
        if app.finalized:
            callback(app)


def project_celery_app() -> Celery | None:
    """The app ``celery.current_app`` stands for (the one the project created, or set
    current), or ``None`` when none exists yet: reading ``current_app`` would create
    Celery's fallback app, which has no fixups, and make it every thread's default app."""
    thread_state = getattr(celery_state, "_tls", None)  # what current_app reads first
    app = getattr(thread_state, "current_app", None) or getattr(celery_state, "default_app", None)
    return app if isinstance(app, Celery) else None


def app_fixups(app: Celery | None) -> tuple[Any, ...]:
    """The fixup objects Celery installed on ``app`` (e.g. its Django fixup), or ``()``."""
    return tuple(getattr(app, "_fixups", None) or ())


def has_autoretry_wrapper(task: Task) -> bool:
    """Whether Celery wrapped ``task.run`` for ``autoretry_for`` (only then does Celery
    retry the task on those exceptions)."""
    return hasattr(task, "_orig_run")
