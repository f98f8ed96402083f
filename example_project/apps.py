"""App config of the example project's models and tasks."""

from django.apps import AppConfig


class ExampleConfig(AppConfig):
    """The ``example`` app: an ``Instance`` model and the tasks that drive it."""

    name = "example_project"
    label = "example"
    verbose_name = "Example cloud"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        # The demo's timeline; off unless asked for, so tests and production pay nothing.
        if getattr(settings, "EXAMPLE_TIMELINE", False):
            from . import timeline

            timeline.connect()
