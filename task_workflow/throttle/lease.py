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

#: Fraction of a lease a holder gives up of its own view of it, for the difference
#: between its monotonic clock and the store's clock over one lease (far larger than any
#: clock's drift rate), plus a fixed floor in seconds.
LEASE_MARGIN_FRACTION = 0.02
LEASE_MARGIN_FLOOR = 0.002


def lease_view(sent_at: float, seconds: float) -> float:
    """Until when (``time.monotonic()``) a holder may believe in a lease of ``seconds``
    that the store granted or renewed in answer to a request sent at ``sent_at``: the
    store counted from a moment after ``sent_at``, so this ends before the store's
    deadline."""
    return sent_at + seconds * (1 - LEASE_MARGIN_FRACTION) - LEASE_MARGIN_FLOOR


@dataclass(eq=False)
class Lease:
    """A held slot.

    ``lost`` turns true as soon as the store may have given the slot away: a renewal
    found it gone (expired or force-released), or the holder's own view of the lease ran
    out (``valid_until``, its last successful renewal plus the TTL, by the monotonic
    clock) because renewals did not get through. It never turns false again. The holder
    keeps running, so long bodies should check it, and a resource that must never see
    two holders should check ``fencing_token`` (docs/design/throttle-protocol.md, "Fencing tokens").
    """

    backend: ThrottleBackend
    group: SlotGroup
    token: str
    slot: str
    ttl: float
    #: Strictly increases per group with every grant: pass it to the protected resource.
    fencing_token: int = 0
    released: bool = field(default=False, repr=False)
    #: ``time.monotonic()`` until which the holder may believe it holds the slot.
    valid_until: float = field(default=math.inf, repr=False)
    _lost: bool = field(default=False, repr=False)
    #: ``time.monotonic()`` until which a failed release is sent again (see
    #: :meth:`LeaseRenewer.retry_release`).
    release_retry_until: float = field(default=0.0, repr=False)

    @property
    def lost(self) -> bool:
        """The store may have given the slot away (latched: never false again)."""
        if not self._lost and not self.released and time.monotonic() >= self.valid_until:
            self._lost = True
        return self._lost

    def mark_lost(self) -> None:
        """The store says the slot is gone."""
        self._lost = True

    def release(self) -> bool:
        """Give the slot back (once); ``False`` if it was no longer ours."""
        if self.released:
            return False
        self.released = True
        lease_renewer.discard(self)
        try:
            # Sent while the slot is still ours, so that receivers (timelines, metrics)
            # never see the next holder's ``slot_acquired`` before this one.
            slot_released.send_robust(sender=self.group, lease=self)
        finally:
            released = self._release_in_store()
        return released

    def _release_in_store(self) -> bool:
        try:
            return self.backend.release(self.group, self.token, self.slot)
        except Exception as exc:
            # The guarded work is done; failing the task now would lose its result. The
            # holder still knows its token: the lease renewer sends the release again
            # until the store takes it (a failover, a restart), so waiters get the slot
            # then instead of a whole lease later.
            logger.warning(
                "Could not release throttle slot of %s (%s); retrying in the background "
                "(it expires within %ss anyway)",
                self.group,
                exc,
                self.ttl,
            )
            lease_renewer.retry_release(self)
            return False


class LeaseRenewer:
    """One daemon thread per process renews every held lease about every ``ttl / 3``.

    Started lazily, and again in a forked child (prefork workers), since threads do not
    survive ``fork``. An acquire wakes the thread only when the new lease is due before
    the thread's next wake-up: waking a thread on every acquire costs a context switch
    and a GIL handoff, about as much as the acquire's own round trip.

    The thread cannot stop renewing silently: an unexpected error is logged and the
    loop goes on; a thread that died anyway, or that hangs in one pass for longer than
    ``STALL_AFTER``, is replaced (logged) by a watchdog thread that looks every
    ``WATCHDOG_PERIOD`` seconds while leases are held (and by every :meth:`add`). Leases
    are safe meanwhile: each one's ``lost`` follows its own view of the lease, renewed or
    not.
    """

    #: Fraction of the TTL between renewals: two renewals may fail before the lease ends.
    RENEW_FRACTION = 1 / 3

    #: Shortest idle sleep in seconds; a shorter lease taken meanwhile wakes the thread.
    IDLE_PERIOD_FLOOR = 1.0

    #: Seconds one pass over the due leases may take before the thread counts as stuck.
    STALL_AFTER = 30.0

    #: Seconds between the watchdog's looks at the renewer thread.
    WATCHDOG_PERIOD = 1.0

    #: Seconds after a failed release before it is sent again, and between later tries.
    RELEASE_RETRY_FIRST = 0.1
    RELEASE_RETRY_PERIOD = 0.5
    #: Seconds past the holder's view of its lease that a release is still retried (one
    #: call's socket timeout, by default 5 s: the store may have counted from that late).
    RELEASE_RETRY_SLACK = 5.0

    def __init__(self) -> None:
        self._due: dict[Lease, float] = {}
        self._condition = threading.Condition()
        self._pid: int | None = None
        #: ``time.monotonic()`` at which the thread wakes next on its own.
        self._wake_at = math.inf
        #: How long the thread sleeps when idle: the shortest renewal period seen (at
        #: least a second), so a lease taken while it sleeps is due after it wakes.
        self._idle_period = math.inf
        self._thread: threading.Thread | None = None
        #: Bumped when a thread is replaced: an older thread exits when it sees it.
        self._generation = 0
        #: ``time.monotonic()`` at which the running pass began (``None`` when asleep).
        self._busy_since: float | None = None
        #: How many times a thread was replaced (diagnostics, tests).
        self.restarts = 0
        #: Stores (by ``id`` of the backend) whose last release retry failed, and until
        #: when (``time.monotonic()``) the other pending releases to them wait without a
        #: call: one failing call per store and period, however many releases are pending.
        self._failing_stores: dict[int, float] = {}

    def add(self, lease: Lease, *, renew_now: bool = False) -> None:
        """Renew ``lease`` every ``ttl / 3`` from now on; first at once with ``renew_now``
        (a slot handed over under a short claim)."""
        with self._condition:
            self._ensure_thread()
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
            return [lease for lease in self._due if not lease.released]

    def pending_releases(self) -> list[Lease]:
        """Released leases whose release the store has not taken yet (retried)."""
        with self._condition:
            return [lease for lease in self._due if lease.released]

    def retry_release(self, lease: Lease) -> None:
        """Send ``lease``'s release again, soon and then every ``RELEASE_RETRY_PERIOD``,
        until the store takes it or the lease would have lapsed in the store anyway.

        For a release that failed (the store unreachable, a failover under way, a release
        its replicas did not acknowledge): the slot is freed, and handed to a waiter,
        within one period of the store's return instead of a whole lease later.
        """
        now = time.monotonic()
        # The store counted the lease from a moment before the holder's view of it ended,
        # plus the margin and one call's timeout at most; a release after that is harmless.
        if math.isfinite(lease.valid_until):
            lease.release_retry_until = (
                lease.valid_until + lease.ttl * LEASE_MARGIN_FRACTION + self.RELEASE_RETRY_SLACK
            )
        else:
            lease.release_retry_until = now + lease.ttl + self.RELEASE_RETRY_SLACK
        with self._condition:
            self._ensure_thread()
            due = now + self.RELEASE_RETRY_FIRST
            self._due[lease] = due
            if due < self._wake_at:
                self._wake_at = due
                self._condition.notify()

    def check(self) -> None:
        """Replace a renewer thread that died or hangs (the watchdog; also run by add)."""
        with self._condition:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        # Called with the condition held.
        if self._pid != os.getpid():
            self._due.clear()  # leases inherited through fork belong to the parent
            self._pid = os.getpid()
            self._wake_at = math.inf
            self._busy_since = None
            self._start_thread()
            threading.Thread(target=self._watch, name="task-workflow-lease-watchdog", daemon=True).start()
            return
        thread = self._thread
        if thread is None or not thread.is_alive():
            logger.error("Throttle lease renewer thread died; starting a new one")
            self._start_thread()
        elif self._busy_since is not None and time.monotonic() - self._busy_since > self.STALL_AFTER:
            logger.error(
                "Throttle lease renewer thread hangs (one pass has taken over %ss); starting a new one",
                self.STALL_AFTER,
            )
            self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is not None:
            self.restarts += 1
        self._generation += 1
        self._busy_since = None
        self._wake_at = math.inf
        self._thread = threading.Thread(
            target=self._run, args=(self._generation,), name="task-workflow-lease-renewer", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.WATCHDOG_PERIOD)
            with self._condition:
                if self._due and self._pid == pid:
                    self._ensure_thread()

    def _run(self, generation: int) -> None:
        try:
            while self._pass(generation):
                pass
        except BaseException:
            logger.exception("Throttle lease renewer thread failed; the next acquire starts a new one")
            raise

    def _pass(self, generation: int) -> bool:
        """Sleep until leases are due, then renew them; ``False`` once replaced."""
        with self._condition:
            if generation != self._generation:
                return False
            now = time.monotonic()
            due = [lease for lease, at in self._due.items() if at <= now]
            if not due:
                self._busy_since = None
                self._wake_at = min(self._due.values(), default=now + self._idle_period)
                self._condition.wait(self._wake_at - now if self._wake_at < math.inf else None)
                return True
            self._busy_since = now
        for lease in due:
            with self._condition:
                if generation != self._generation:
                    return False
                if lease in self._due:
                    # In flight: a replacement thread must not block on it too; the renewal
                    # reschedules it.
                    self._due[lease] = math.inf
            try:
                self._renew(lease)
            except Exception:
                logger.exception("Throttle lease renewer: unexpected error renewing %s", lease.group)
                self._reschedule(lease, lease.ttl / 10)
        return True

    def _renew(self, lease: Lease) -> None:
        if lease.released:
            self._release_again(lease)
            return
        if lease.lost:  # its own view ran out: the slot may be someone else's by now
            self._give_up(lease)
            return
        # A database-backed cache: drop a connection the server closed, so one lost
        # connection does not fail every later renewal.
        close_old_connections()
        sent_at = time.monotonic()
        try:
            renewed = lease.backend.renew(lease.group, lease.token, lease.slot, lease.ttl)
        except Exception:
            if lease.released:  # released meanwhile: the release's own retry takes over
                return
            if not lease.lost:
                # The store is unreachable: try again soon; the lease may still be saved.
                logger.warning("Could not renew throttle lease of %s; retrying", lease.group, exc_info=True)
                self._reschedule(lease, min(lease.ttl / 10, max(lease.valid_until - time.monotonic(), 0) / 2))
                return
            renewed = False
        if lease.released:  # released while this renewal was on its way
            return
        if renewed and not lease.lost:
            lease.valid_until = lease_view(sent_at, lease.ttl)
            self._reschedule(lease, lease.ttl * self.RENEW_FRACTION)
            return
        lease.mark_lost()
        self._give_up(lease)

    def _release_again(self, lease: Lease) -> None:
        now = time.monotonic()
        if now > lease.release_retry_until:
            self.discard(lease)
            logger.warning(
                "Throttle slot of %s: release still failing; the store frees it itself", lease.group
            )
            return
        store = id(lease.backend)
        failing_until = self._failing_stores.get(store, 0.0)
        if now < failing_until:
            self._reschedule(lease, failing_until - now)  # its store just failed another one
            return
        try:
            lease.backend.release(lease.group, lease.token, lease.slot)
        except Exception as exc:
            logger.debug("Throttle slot of %s: release failed again (%s)", lease.group, exc)
            self._failing_stores[store] = time.monotonic() + self.RELEASE_RETRY_PERIOD
            self._reschedule(lease, self.RELEASE_RETRY_PERIOD)
            return
        self._failing_stores.pop(store, None)
        self.discard(lease)
        logger.info("Throttle slot of %s released after the store came back", lease.group)

    def _give_up(self, lease: Lease) -> None:
        self.discard(lease)
        logger.error(
            "Throttle slot of %s was lost (lease expired, unrenewable or force-released) while its "
            "holder still runs; the limit may be exceeded until it finishes",
            lease.group,
        )

    def _reschedule(self, lease: Lease, delay: float) -> None:
        with self._condition:
            if lease in self._due:
                self._due[lease] = time.monotonic() + delay


#: The process-wide renewer.
lease_renewer = LeaseRenewer()
