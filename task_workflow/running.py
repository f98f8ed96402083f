"""The Celery task running in this thread, for the modules that act differently inside one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task
from celery._state import get_current_task


def running_task(run: Callable[..., Any] | None = None) -> Task | None:
    """The Celery task executing in this thread, or ``None``: also when its function is
    called directly rather than run by Celery, and, given ``run``, when the running task's
    function is not (a wrapper of) ``run`` (``run`` was called from another task's body)."""
    task = get_current_task()
    if task is None or task.request.called_directly:
        return None
    if run is not None and not _task_runs(task, run):
        return None
    return task


def _task_runs(task: Task, func: Callable[..., Any]) -> bool:
    current: Any = getattr(task.run, "__func__", task.run)
    while current is not None:
        if current is func:
            return True
        current = getattr(current, "__wrapped__", None)
    return False
