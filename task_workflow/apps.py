"""Django app configuration for task_workflow."""

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class TaskWorkflowConfig(AppConfig):
    """Registers task_workflow with Django."""

    name = "task_workflow"
    verbose_name = _("Task workflow")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the system checks, connect the signal receivers (django-fsm's, and the
        Celery worker's for the heavy-queue consumer warning), and install the heavy-task
        router on every Celery app."""
        from django_fsm.signals import post_transition

        from . import checks  # noqa: F401 - registers the system checks
        from .models import _stamp_state_change
        from .queue_consumers import connect_worker_signals
        from .routing import install_on_all_apps

        # Here rather than at import of models.py: Django's rule for receivers, so that
        # importing the models has no side effect.
        post_transition.connect(_stamp_state_change, dispatch_uid="task_workflow.stamp_state_change")
        install_on_all_apps()
        connect_worker_signals()
