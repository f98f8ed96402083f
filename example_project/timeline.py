"""A cross-process timeline of task runs and state transitions for ``make demo``.

Worker processes append one JSON line per event to ``var/timeline.jsonl`` (appends of
a short line are atomic with O_APPEND); the demo command reads and prints it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from celery import signals
from django.conf import settings
from django_fsm.signals import post_transition

from task_workflow.signals import slot_acquired, slot_released, slot_waiting


def timeline_path() -> Path:
    return Path(settings.VAR_DIR) / "timeline.jsonl"


def record(event: str, **fields: Any) -> None:
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields}, default=str)
    with timeline_path().open("a", encoding="utf-8") as stream:
        stream.write(line + "\n")


def read_timeline() -> list[dict[str, Any]]:
    path = timeline_path()
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return sorted(events, key=lambda e: e["t"])


def _short_args(args: Any) -> str:
    return ", ".join(str(a)[:8] for a in (args or ()))


def _on_prerun(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
    queue = (task.request.delivery_info or {}).get("routing_key")
    record("start", task=task.name, args=_short_args(args), host=socket.gethostname(), queue=queue)


def _on_postrun(task_id: str, task: Any, state: str | None = None, **_: Any) -> None:
    record("end", task=task.name, state=state)


def _on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    record("retry", task=getattr(sender, "name", "?"), reason=str(reason))


def _on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    record("failed", task=getattr(sender, "name", "?"), error=f"{type(exception).__name__}: {exception}")


def _on_transition(sender: Any, instance: Any, name: str, source: str, target: str, **_: Any) -> None:
    record("transition", entity=str(instance), transition=name, source=source, target=target)


def _on_slot_acquired(sender: Any, lease: Any, **_: Any) -> None:
    record("slot", action="acquired", group=str(sender))


def _on_slot_released(sender: Any, lease: Any, **_: Any) -> None:
    record("slot", action="released", group=str(sender))


def _on_slot_waiting(sender: Any, **_: Any) -> None:
    record("slot", action="waiting", group=str(sender))


def connect() -> None:
    """Record events from this process (called by the example app's ``ready()``)."""
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
    signals.task_retry.connect(_on_retry, weak=False)
    post_transition.connect(_on_transition, weak=False)
    slot_waiting.connect(_on_slot_waiting, weak=False)
    slot_acquired.connect(_on_slot_acquired, weak=False)
    slot_released.connect(_on_slot_released, weak=False)
