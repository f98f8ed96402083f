"""The ``throttle`` class: a context manager and decorator that holds a slot of a group.

It validates its arguments, waits for a slot through the backend of its cache alias
(woken by releases where the backend can), turns a busy group or an unreachable store into
a re-queue inside a task (or an exception outside one), and hands the grant to a
:class:`~task_workflow.throttle.lease.Lease` that the renewer thread keeps alive.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, Final, TypeVar

from celery import Task
from celery.exceptions import Retry

from ..conf import get_setting
from ..exceptions import ImproperlyDecorated, TaskWorkflowError
from ..running import running_task
from ..signals import slot_acquired, slot_waiting
from .base import AcquireResult, SlotGroup, ThrottleBackend
from .errors import STORE_ERRORS, ThrottleTimeout, ThrottleUnavailable
from .factory import get_backend
from .lease import Lease, lease_renewer, lease_view
from .requeue import requeue, throttle_attempts

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class _FromSettings:
    def __repr__(self) -> str:
        return "<from TASK_WORKFLOW settings>"


#: Default of ``wait``/``ttl``: read ``TASK_WORKFLOW`` at call time, not import time.
FROM_SETTINGS: Final = _FromSettings()

HOSTNAME = socket.gethostname()


def _validate_key(key: Any) -> str | None:
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, str | int | uuid_module.UUID):
        raise TypeError(f"throttle key must be a str, int or UUID, got {type(key).__name__}: {key!r}")
    return str(key)


def _validate_seconds(name: str, value: Any, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"throttle {name} must be a finite number of seconds >= 0, got {value!r}")


#: Why a refusal inside the restart grace is one (the re-queue reason, the timeout's message).
GRACE_REASON = (
    "the lock cache's Redis started less than THROTTLE_RESTART_GRACE ago and grants nothing "
    "until leases it may have forgotten have ended (restart grace)"
)


class throttle:  # noqa: N801 - used like a function: ``with throttle(...)``, ``@throttle(...)``
    """At most ``concurrency`` holders per slot group (task name, ``key``) anywhere.

    Args:
        key: str, int or UUID that narrows the group (e.g. a backend id); ``None``
            means the task name alone.
        concurrency: how many may hold a slot of the group at once (>= 1).
        name: the group's name; defaults to the running task's name and is required
            outside a task.
        wait: seconds to wait for a slot before re-queueing the task; ``0`` re-queues at
            once, ``None`` waits indefinitely. Default ``TASK_WORKFLOW['THROTTLE_WAIT']``.
        ttl: lease seconds; renewed in the background while held, so a dead holder frees
            its slot within one TTL. Default ``TASK_WORKFLOW['LOCK_TTL']``.
        cache: cache alias; default ``TASK_WORKFLOW['CACHE']``.

    The object holds configuration only: every entry and every decorated call acquires
    its own lease, so one object may be shared across calls and threads.
    """

    def __init__(
        self,
        key: str | int | uuid_module.UUID | None = None,
        concurrency: int = 1,
        *,
        name: str | None = None,
        wait: float | _FromSettings | None = FROM_SETTINGS,
        ttl: float | _FromSettings = FROM_SETTINGS,
        cache: str | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"throttle concurrency must be an int >= 1, got {concurrency!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"throttle name must be a non-empty str, got {name!r}")
        if not isinstance(wait, _FromSettings):
            _validate_seconds("wait", wait, allow_none=True)
        if not isinstance(ttl, _FromSettings):
            _validate_seconds("ttl", ttl, allow_none=False)
            if ttl == 0:
                raise ValueError("throttle ttl must be > 0")
        self.key = _validate_key(key)
        self.concurrency = concurrency
        self.name = name
        self.wait = wait
        self.ttl = ttl
        self.cache = cache
        self._local = threading.local()
        #: Slot groups by name (the running task's name unless ``name`` is given).
        self._groups: dict[str, SlotGroup] = {}

    def __repr__(self) -> str:
        return f"throttle(key={self.key!r}, concurrency={self.concurrency}, name={self.name!r})"

    # Context manager ---------------------------------------------------------------
    def __enter__(self) -> Lease:
        lease = self.acquire()
        self._stack().append(lease)
        return lease

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack().pop().release()

    def _stack(self) -> list[Lease]:
        stack: list[Lease] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    # Decorator ---------------------------------------------------------------------
    def __call__(self, func: F) -> F:
        if isinstance(func, Task):
            raise ImproperlyDecorated(
                f"@throttle must be placed under @shared_task, not above it ({func.name})"
            )
        if not callable(func):
            raise ImproperlyDecorated(f"@throttle decorates a function, got {func!r}")

        @functools.wraps(func)
        def run_throttled(*args: Any, **kwargs: Any) -> Any:
            lease = self.acquire()
            try:
                return func(*args, **kwargs)
            finally:
                lease.release()

        # Keep Celery's argument check working through the wrapper.
        run_throttled.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
        return run_throttled  # type: ignore[return-value]

    # Acquisition -------------------------------------------------------------------
    def acquire(self) -> Lease:
        """Wait for a slot and return its lease (renewed until released).

        Inside a task, a slot that stays busy for ``wait`` seconds or an unreachable
        store raises Celery's ``Retry`` after re-queueing the task; outside a task they
        raise ``ThrottleTimeout`` / ``ThrottleUnavailable``.
        """
        task = running_task()
        group_name = self._group_name(task)
        group = self._groups.get(group_name)
        if group is None:  # kept: its digest (a SHA-256) is computed once per group
            group = self._groups[group_name] = SlotGroup(group_name, self.key)
        ttl = float(get_setting("LOCK_TTL") if isinstance(self.ttl, _FromSettings) else self.ttl)
        wait = get_setting("THROTTLE_WAIT") if isinstance(self.wait, _FromSettings) else self.wait
        backend = get_backend(self.cache)
        token = secrets.token_hex(16)  # an owner token, as unguessable as a uuid4
        metadata = {
            "task_name": group.task_name,
            "key": group.key,
            "concurrency": self.concurrency,
            "task_id": task.request.id if task else None,
            "hostname": (task.request.hostname if task else None) or HOSTNAME,
            "pid": os.getpid(),
            "ttl": ttl,
            # When this caller first asked: a store shows it as a waiter's "waiting since".
            "waiting_since": time.time(),
        }
        try:
            result, valid_until = self._wait_for_slot(backend, group, token, ttl, wait, metadata)
        except STORE_ERRORS as exc:
            logger.error("Throttle %s: slot store unreachable (%s); not running unthrottled", group, exc)
            if task is None:
                raise ThrottleUnavailable(f"throttle {group}: slot store unreachable: {exc}") from exc
            raise self._requeue(
                task, f"throttle {group}: slot store unreachable", ThrottleUnavailable
            ) from exc
        if not result.acquired:
            grace = result.reason == "restart grace"
            if task is None:
                message = f"throttle {group}: no free slot of {self.concurrency} within {wait}s"
                raise ThrottleTimeout(f"{message}: {GRACE_REASON}" if grace else message)
            why = GRACE_REASON if grace else f"all {self.concurrency} slots busy"
            raise self._requeue(task, f"throttle {group}: {why}", ThrottleTimeout)
        lease = Lease(
            backend=backend,
            group=group,
            token=token,
            slot=result.slot,
            ttl=ttl,
            fencing_token=result.fencing_token,
            valid_until=valid_until,
        )
        lease_renewer.add(lease, renew_now=result.handed_over)
        slot_acquired.send_robust(sender=group, lease=lease)
        return lease

    #: Eager runs (``apply()``, ALWAYS_EAGER) re-run a re-queued task at once, without a
    #: countdown; past this many re-runs a still-busy slot raises instead of recursing.
    EAGER_REQUEUES = 3

    @classmethod
    def _requeue(cls, task: Task, reason: str, error: type[TaskWorkflowError]) -> Retry:
        if task.request.is_eager and throttle_attempts(task) >= cls.EAGER_REQUEUES:
            raise error(f"{reason}; gave up after {cls.EAGER_REQUEUES} eager re-runs")
        return requeue(task, reason)

    def _group_name(self, task: Task | None) -> str:
        if self.name is not None:
            return self.name
        if task is None:
            raise ImproperlyDecorated(
                "throttle() outside a running Celery task needs name= to identify its slot group"
            )
        return str(task.name)

    def _wait_for_slot(
        self,
        backend: ThrottleBackend,
        group: SlotGroup,
        token: str,
        ttl: float,
        wait: float | None,
        metadata: dict[str, Any],
    ) -> tuple[AcquireResult, float]:
        """The last attempt's result and, for a grant, until when the holder may believe it
        (``time.monotonic()``)."""
        deadline = None if wait is None else time.monotonic() + wait
        try:
            return self._attempt_until(backend, group, token, ttl, deadline, metadata)
        except BaseException:
            # Interrupted (time limit, connection error, a grant its replicas did not
            # acknowledge): leave the line, and give back a slot we may hold (granted, or
            # handed to us meanwhile); a give-back the store did not take is sent again
            # by the lease renewer, so the slot is not blocked for a whole lease.
            self._give_back(backend, group, token, ttl)
            raise

    @staticmethod
    def _give_back(backend: ThrottleBackend, group: SlotGroup, token: str, ttl: float) -> None:
        # Released unconditionally: the acquire that failed may have been granted. No
        # slot_released signal: no slot_acquired was sent for it. A store that failed the
        # withdrawal is not asked again here (one more socket timeout before the task is
        # re-queued): the lease renewer sends the release.
        try:
            backend.cancel_wait(group, token)
            backend.release(group, token)
        except Exception as exc:
            logger.warning("Throttle %s: could not give back an interrupted grant (%s); retrying", group, exc)
            lease_renewer.retry_release(
                Lease(backend=backend, group=group, token=token, slot="", ttl=ttl, released=True)
            )

    def _attempt_until(
        self,
        backend: ThrottleBackend,
        group: SlotGroup,
        token: str,
        ttl: float,
        deadline: float | None,
        metadata: dict[str, Any],
    ) -> tuple[AcquireResult, float]:
        waiting = False
        while True:
            metadata["acquired_at"] = time.time()
            sent_at = time.monotonic()
            result = backend.acquire(group, token, self.concurrency, ttl, metadata)
            if result.acquired:
                return result, lease_view(sent_at, ttl)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                # A release may have handed us the slot just now: then we hold it.
                handed = backend.cancel_wait(group, token)
                if handed is not None:
                    renewed_at = time.monotonic()
                    if backend.renew(group, token, handed.slot, ttl):
                        return replace(handed, handed_over=False), lease_view(renewed_at, ttl)
                return result, 0.0
            if not waiting:
                waiting = True
                slot_waiting.send_robust(
                    sender=group, concurrency=self.concurrency, waiting_since=metadata["waiting_since"]
                )
            # Sleep until a release wakes us (on Redis it hands us the slot), the earliest
            # lease may expire, or the wait ends; a short cap keeps each blocking call
            # under any client socket timeout and keeps us counted as a live waiter.
            timeout = min(t for t in (remaining, result.retry_after, 1.0) if t is not None)
            handed = backend.wait_for_release(group, token, max(timeout, 0.001))
            if handed is not None:
                # Handed the slot under a short claim, granted after our last attempt was
                # sent. Woken well within the claim, we hold it now and the lease renewer
                # extends it at once, off this thread's path (the handoff costs the wake-up
                # alone); else the claim may have lapsed while this process was
                # descheduled: extend it here first.
                claim = min(ttl, backend.handoff_claim)
                if not backend.confirms_handoffs and time.monotonic() - sent_at < claim / 2:
                    return handed, lease_view(sent_at, claim)
                renewed_at = time.monotonic()
                if backend.renew(group, token, handed.slot, ttl):
                    return replace(handed, handed_over=False), lease_view(renewed_at, ttl)
