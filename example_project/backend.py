"""A simulated cloud backend: each call takes a short while; some ids always fail."""

from __future__ import annotations

import time

from django.conf import settings

#: Backend ids starting with this prefix fail every call, to show the failure path.
FAILING_PREFIX = "fail-"


class BackendError(Exception):
    """The cloud backend refused a call."""


def _call(operation: str, backend_id: str) -> None:
    time.sleep(settings.EXAMPLE_BACKEND_DELAY)
    if backend_id.startswith(FAILING_PREFIX):
        raise BackendError(f"backend refused to {operation} {backend_id}: quota exceeded")


def stop(backend_id: str) -> None:
    """Shut the machine down."""
    _call("stop", backend_id)


def start(backend_id: str) -> None:
    """Boot the machine."""
    _call("start", backend_id)
