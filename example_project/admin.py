"""Admin of the example: instances with state badges, transition buttons and history."""

from django.contrib import admin

from task_workflow.admin import StateMixinAdmin

from .models import Instance


@admin.register(Instance)
class InstanceAdmin(StateMixinAdmin):
    """Instances with their state as a badge, in the colours of the example's own states."""

    list_display = ("name", "uuid", "state", "backend_id", "state_changed_at")
    search_fields = ("name", "uuid", "backend_id")
    state_colours = {
        Instance.States.ONLINE: "#2e7d32",
        Instance.States.OFFLINE: "#616161",
    }
