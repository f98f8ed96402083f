"""Example project: a cloud ``Instance`` driven by task_workflow tasks."""

from .celery import app as celery_app

__all__ = ["celery_app"]
