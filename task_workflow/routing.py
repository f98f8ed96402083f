"""Send tasks declared with ``@shared_task(is_heavy_task=True)`` to the heavy queue.

Celery turns unknown task options into task class attributes, so ``is_heavy_task`` is
readable on the task. The router is appended to every Celery app's ``task_routes`` when
the app is finalized, so ``task_workflow`` in INSTALLED_APPS is all it takes. Routes the
user configured come first, and an explicit ``queue=`` on the task or the call wins.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, current_app
from celery._state import _get_active_apps, connect_on_app_finalize  # type: ignore[attr-defined]

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
    # Routers are built lazily and cached; rebuild them with the new table.
    app.amqp.flush_routes()
    app.amqp.__dict__.pop("router", None)


def install_on_all_apps() -> None:
    """Install the router on finalized apps now and on every app finalized later."""
    connect_on_app_finalize(install_heavy_task_router)
    for app in list(_get_active_apps()):
        if app.finalized:
            install_heavy_task_router(app)
