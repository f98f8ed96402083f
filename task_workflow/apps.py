"""Django app configuration for task_workflow."""

from django.apps import AppConfig


class TaskWorkflowConfig(AppConfig):
    """Registers task_workflow with Django."""

    name = "task_workflow"
    verbose_name = "Task workflow"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
        from .routing import install_on_all_apps

        install_on_all_apps()
