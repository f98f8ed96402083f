"""Admin of the example: instances with state badges, transition buttons and history."""

from django.contrib import admin

from task_workflow.admin import StateMixinAdmin

from .models import Instance


@admin.register(Instance)
class InstanceAdmin(StateMixinAdmin):
    list_display = ("name", "uuid", "state", "backend_id", "state_changed_at")
    search_fields = ("name", "uuid", "backend_id")
