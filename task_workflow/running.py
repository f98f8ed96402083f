"""The Celery task running in this thread, for the modules that act differently inside one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry

from .celery_hooks import current_task_object, has_autoretry_wrapper


def running_task(run: Callable[..., Any] | None = None) -> Task | None:
    """The Celery task executing in this thread, or ``None``: also when its function is
    called directly rather than run by Celery, and, given ``run``, when the running task's
    function is not (a wrapper of) ``run`` (``run`` was called from another task's body)."""
    task = current_task_object()
    if task is None or task.request.called_directly:
        return None
    if run is not None and not _task_runs(task, run):
        return None
    return task


def _task_runs(task: Task, func: Callable[..., Any]) -> bool:
    """Whether ``func`` is the task's function or inside it: follows ``__wrapped__``
    through every decorator and wrapper, Celery's autoretry wrapper included, and through
    bound methods (``bind=True`` tasks) at every step."""
    current: Any = task.run
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current = getattr(current, "__func__", current)
        if current is func:
            return True
        current = getattr(current, "__wrapped__", None)
    return False


def celery_will_retry(task: Task, exc: BaseException) -> bool:
    """Whether Celery's ``autoretry_for`` will retry the running task for ``exc`` (so
    this attempt's failure is not the task's final failure).

    Mirrors ``celery.app.autoretry``: ``exc`` is one of ``autoretry_for`` and none of
    ``dont_autoretry_for``, and the retry limit (``retry_kwargs['max_retries']``, else the
    task's ``max_retries``; ``None`` = unlimited) is not reached. A body's own
    ``self.retry()`` raises ``Retry`` (or, past the limit, the final error) itself.
    """
    if task.request.called_directly or not has_autoretry_wrapper(task):
        return False
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    dont_autoretry_for = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    if not autoretry_for or isinstance(exc, Ignore | Retry):
        return False
    if not isinstance(exc, autoretry_for) or (dont_autoretry_for and isinstance(exc, dont_autoretry_for)):
        return False
    retry_kwargs = getattr(task, "retry_kwargs", None) or {}
    max_retries = retry_kwargs.get("max_retries", task.max_retries)
    return max_retries is None or (task.request.retries or 0) + 1 <= max_retries
