"""task_workflow: Celery tasks that honour the state machines of the models they work on.

Public API lives in :mod:`task_workflow.tasks`.
"""

__version__ = "0.2.0.dev0"
