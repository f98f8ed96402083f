"""Send tasks declared with ``@shared_task(is_heavy_task=True)`` to the heavy queue.

Celery turns unknown task options into task class attributes, so ``is_heavy_task`` is
readable on the task. The router is appended to every Celery app's ``task_routes`` when
the app is finalized, so ``task_workflow`` in INSTALLED_APPS is all it takes. Routes the
user configured come first, and an explicit ``queue=`` on the task or the call wins.

Celery has no public hook for "every app, including those finalized already", so
:func:`install_on_all_apps` goes through :func:`task_workflow.celery_hooks.on_every_app_finalized`,
the one place that uses Celery's private API for it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, current_app

from .celery_hooks import on_every_app_finalized
from .conf import get_setting


def route_heavy_tasks(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router: ``{"queue": TASK_WORKFLOW['HEAVY_QUEUE']}`` for heavy tasks."""
    if task is None:
        task = current_app.tasks.get(name)
    if getattr(task, "is_heavy_task", False):
        return {"queue": get_setting("HEAVY_QUEUE")}
    return None


def install_heavy_task_router(app: Celery) -> None:
    """Append :func:`route_heavy_tasks` to ``app.conf.task_routes`` (once)."""
    routes = app.conf.task_routes
    if routes is None:
        routes = []
    elif not isinstance(routes, list | tuple):
        routes = [routes]
    if route_heavy_tasks in routes:
        return
    app.conf.task_routes = [*routes, route_heavy_tasks]
    # Routers are built lazily and cached: rebuild the table, and drop the cached router
    # (a cached property: deleting it is a no-op when it was never built).
    app.amqp.flush_routes()
    del app.amqp.router


def install_on_all_apps() -> None:
    """Install the router on finalized apps now and on every app finalized later."""
    on_every_app_finalized(install_heavy_task_router)
