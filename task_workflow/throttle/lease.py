"""Leases held by this process, and the background thread that renews them."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field

from django.db import close_old_connections

from ..signals import slot_released
from .base import SlotGroup, ThrottleBackend

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """A held slot. ``lost`` turns true if a renewal finds the slot gone (expired or
    force-released); the holder keeps running, so long bodies may check it."""

    backend: ThrottleBackend
    group: SlotGroup
    token: str
    slot: str
    ttl: float
    lost: bool = False
    released: bool = field(default=False, repr=False)
    #: ``time.monotonic()`` of the acquire or the last successful renewal.
    renewed_at: float = field(default_factory=time.monotonic, repr=False)

    def release(self) -> bool:
        """Give the slot back (once); ``False`` if it was no longer ours."""
        if self.released:
            return False
        self.released = True
        lease_renewer.discard(self)
        try:
            released = self.backend.release(self.group, self.token, self.slot)
        except Exception:
            # The guarded work is done; failing the task now would lose its result. The
            # slot is no longer renewed, so it frees itself within one TTL.
            logger.exception(
                "Could not release throttle slot of %s; it expires within %ss", self.group, self.ttl
            )
            return False
        slot_released.send(sender=self.group, lease=self)
        return released


class LeaseRenewer:
    """One daemon thread per process renews every held lease about every ``ttl / 3``.

    Started lazily, and again in a forked child (prefork workers), since threads do not
    survive ``fork``. An acquire wakes the thread only when the new lease is due before
    the thread's next wake-up: waking a thread on every acquire costs a context switch
    and a GIL handoff, about as much as the acquire's own round trip.
    """

    #: Fraction of the TTL between renewals: two renewals may fail before the lease ends.
    RENEW_FRACTION = 1 / 3

    #: Shortest idle sleep in seconds; a shorter lease taken meanwhile wakes the thread.
    IDLE_PERIOD_FLOOR = 1.0

    def __init__(self) -> None:
        self._due: dict[Lease, float] = {}
        self._condition = threading.Condition()
        self._pid: int | None = None
        #: ``time.monotonic()`` at which the thread wakes next on its own.
        self._wake_at = math.inf
        #: How long the thread sleeps when idle: the shortest renewal period seen (at
        #: least a second), so a lease taken while it sleeps is due after it wakes.
        self._idle_period = math.inf

    def add(self, lease: Lease, *, renew_now: bool = False) -> None:
        """Renew ``lease`` every ``ttl / 3`` from now on; first at once with ``renew_now``
        (a slot handed over under a short claim)."""
        with self._condition:
            if self._pid != os.getpid():
                self._due.clear()  # leases inherited through fork belong to the parent
                self._pid = os.getpid()
                self._wake_at = math.inf
                threading.Thread(target=self._run, name="task-workflow-lease-renewer", daemon=True).start()
            period = lease.ttl * self.RENEW_FRACTION
            due = time.monotonic() + (0.0 if renew_now else period)
            self._due[lease] = due
            self._idle_period = min(self._idle_period, max(period, self.IDLE_PERIOD_FLOOR))
            if due < self._wake_at:
                self._wake_at = due
                self._condition.notify()

    def discard(self, lease: Lease) -> None:
        with self._condition:
            self._due.pop(lease, None)

    def held(self) -> list[Lease]:
        """Leases this process holds now (for diagnostics and tests)."""
        with self._condition:
            return list(self._due)

    def _run(self) -> None:
        while True:
            with self._condition:
                now = time.monotonic()
                due = [lease for lease, at in self._due.items() if at <= now]
                if not due:
                    self._wake_at = min(self._due.values(), default=now + self._idle_period)
                    self._condition.wait(self._wake_at - now if self._wake_at < math.inf else None)
                    continue
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        # A database-backed cache: drop a connection the server closed, so one lost
        # connection does not fail every later renewal.
        close_old_connections()
        try:
            renewed = lease.backend.renew(lease.group, lease.token, lease.slot, lease.ttl)
        except Exception:
            if time.monotonic() - lease.renewed_at < lease.ttl:
                # The store is unreachable: try again soon; the lease may still be saved.
                logger.warning("Could not renew throttle lease of %s; retrying", lease.group, exc_info=True)
                self._reschedule(lease, lease.ttl / 10)
                return
            renewed = False  # unrenewed for a whole TTL: the slot is gone by now
        if renewed:
            lease.renewed_at = time.monotonic()
            self._reschedule(lease, lease.ttl * self.RENEW_FRACTION)
            return
        if lease.released:  # released while this renewal was on its way
            return
        lease.lost = True
        self.discard(lease)
        logger.error(
            "Throttle slot of %s was lost (lease expired or force-released) while its holder "
            "still runs; the limit may be exceeded until it finishes",
            lease.group,
        )

    def _reschedule(self, lease: Lease, delay: float) -> None:
        with self._condition:
            if lease in self._due:
                self._due[lease] = time.monotonic() + delay


#: The process-wide renewer.
lease_renewer = LeaseRenewer()
