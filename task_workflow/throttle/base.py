"""The throttle backend interface: N leased slots per slot group.

A backend stores, per slot group, at most ``concurrency`` holders. Each holder is an
owner token with a lease deadline; a holder that stops renewing loses its slot when the
lease runs out. Backends never count with read-modify-write: acquiring a slot is one
atomic operation of the store.

Every backend keeps the protocol's invariants (docs/design/throttle-protocol.md):

1. At most ``concurrency`` live leases per group.
2. A holder's lease deadline changes only through its own acquire or renewal: no release,
   handoff or sweep shortens (or extends) another holder's lease.
3. A slot is handed over only to a caller that is waiting and holds no slot of the
   group; every successful acquire path ends the caller's waiter registration; a waiter
   is told of a handoff only while the handed claim is still its own (not force-released,
   not lapsed).
4. Waiters are served in order of first arrival (FIFO); a waiter that stops attempting
   (gave up, died) drops out of line without moving anybody else.
5. The group's records outlive every live lease, whatever mix of TTLs its callers use.
6. Every grant carries a fencing token that strictly increases per group.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class SlotGroup:
    """Holders that share one limit: a task name and an optional key.

    ``digest`` names the group in the store, so long or odd keys are safe; ``key`` keeps
    the original form for display.
    """

    task_name: str
    key: str | None = None

    @cached_property
    def digest(self) -> str:
        raw = self.task_name if self.key is None else f"{self.task_name}\x00{self.key}"
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]

    def __str__(self) -> str:
        return self.task_name if self.key is None else f"{self.task_name}[{self.key}]"


@dataclass(frozen=True)
class AcquireResult:
    """Outcome of one acquire attempt.

    ``retry_after`` is a hint, in seconds, after which the earliest current lease runs
    out (a waiter need not wait longer for an expiry); ``None`` when unknown.
    """

    acquired: bool
    retry_after: float | None = None
    #: Which slot was taken, for backends with numbered slots (passed back on release).
    slot: str = ""
    #: A release handed the slot over under a short claim: the new holder extends it to
    #: its own lease at once.
    handed_over: bool = False
    #: For a grant: a number that strictly increases per group with every grant, so a
    #: protected resource can refuse a holder whose lease has been given away.
    fencing_token: int = 0
    #: For a refusal that is not "every slot is busy": why (``"restart grace"``: a
    #: restarted server grants nothing until the leases it forgot have ended).
    reason: str = ""


@dataclass(frozen=True)
class HeldSlot:
    """One held slot, as operators see it."""

    #: The slot group the slot belongs to (task name and key).
    group: SlotGroup
    #: The holder's owner token: a random string, the holder's name in the store.
    token: str
    #: Which slot: the slot number on the generic and database backends, the token's
    #: first 8 characters on Redis (whose slots are not numbered).
    slot: str
    #: The group's limit as its holder asked for it (``0`` when the store lost it).
    concurrency: int
    #: The Celery task id of the holder, ``None`` when it was taken outside a task.
    task_id: str | None
    #: The holder's worker host name (``celery@…`` inside a task, else the machine's name).
    hostname: str | None
    #: The holder's process id.
    pid: int | None
    #: When the holder's granted attempt was sent (seconds since the epoch, its host's
    #: clock); ``None`` when the store did not record it.
    acquired_at: float | None
    #: Until when the lease runs unless renewed (seconds since the epoch, the store's clock).
    lease_deadline: float
    #: The store's clock when the slot was read (seconds since the epoch): the times above
    #: are relative to it.
    now: float
    #: The grant's fencing token (``None`` where the store did not record one).
    fencing_token: int | None = None
    #: Anything else the backend knows about the holder (empty for the built-in backends).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        """The lease is past its deadline (its holder stopped renewing)."""
        return self.lease_deadline <= self.now

    @property
    def held_for(self) -> float | None:
        """Seconds since the slot was acquired."""
        return None if self.acquired_at is None else max(self.now - self.acquired_at, 0.0)

    @property
    def expires_in(self) -> float:
        """Seconds until the lease deadline (negative once past it)."""
        return self.lease_deadline - self.now

    @property
    def ref(self) -> str:
        """A string naming this slot for a later force release (admin forms, CLI)."""
        return json.dumps(
            [self.group.task_name, self.group.key, self.token, self.slot], separators=(",", ":")
        )

    @staticmethod
    def parse_ref(ref: str) -> tuple[SlotGroup, str, str]:
        """``(group, token, slot)`` from :attr:`ref`; ``ValueError`` if malformed."""
        try:
            task_name, key, token, slot = json.loads(ref)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a throttle slot reference: {ref!r}") from exc
        if not all(isinstance(v, str) for v in (task_name, token, slot)) or not isinstance(key, str | None):
            raise ValueError(f"not a throttle slot reference: {ref!r}")
        return SlotGroup(task_name, key), token, slot


@dataclass(frozen=True)
class WaitingCall:
    """A caller waiting for a slot of its group (refused, and attempting again), as
    operators see it. Listed by :meth:`ThrottleBackend.waiting_calls`."""

    #: The slot group it waits for (task name and key).
    group: SlotGroup
    #: Its owner token: the token it will hold the slot under.
    token: str
    #: Its place in the group's line of live waiters: 1 is served next.
    place: int
    #: When it first asked for the slot (seconds since the epoch), ``None`` where the store
    #: does not record it (the generic cache backend).
    since: float | None
    #: The store's clock when the line was read (seconds since the epoch).
    now: float
    #: The group's limit as the waiter asked for it, ``None`` where not recorded.
    concurrency: int | None = None
    #: The waiter's Celery task id, ``None`` outside a task or where not recorded.
    task_id: str | None = None
    #: The waiter's worker host name, ``None`` where not recorded.
    hostname: str | None = None
    #: The waiter's process id, ``None`` where not recorded.
    pid: int | None = None

    @property
    def waited_for(self) -> float | None:
        """Seconds since it first asked (``None`` when :attr:`since` is unknown)."""
        return None if self.since is None else max(self.now - self.since, 0.0)


class ThrottleBackend(abc.ABC):
    """Where slots live. One instance per cache alias, shared by the whole process."""

    #: Whether :meth:`wait_for_release` is woken by releases (else it sleeps a while).
    wakes_waiters: bool = False

    #: Seconds (at most; never more than the waiter's ``ttl``) that a slot handed over by
    #: a release is held before its new holder must renew it.
    handoff_claim: float = 0.0

    #: Whether a slot handed over by a release counts only once its new holder has
    #: renewed it (the durable mode: the renewal is what replicas acknowledge); else the
    #: holder uses it at once and the lease renewer extends it in the background.
    confirms_handoffs: bool = False

    @abc.abstractmethod
    def acquire(
        self,
        group: SlotGroup,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
    ) -> AcquireResult:
        """Take a slot for ``token`` if fewer than ``concurrency`` live leases exist."""

    @abc.abstractmethod
    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        """Remove ``token``'s slot if it still holds one and wake a waiter.

        Returns whether a slot was removed; a late release (after expiry or a force
        release) removes nothing and is harmless.
        """

    @abc.abstractmethod
    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        """Push ``token``'s lease deadline to now + ``ttl``; ``False`` if the slot is lost."""

    @abc.abstractmethod
    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> AcquireResult | None:
        """Block until a slot of ``group`` may have been freed, or ``timeout`` seconds.

        Returns the grant (``handed_over=True``, with its fencing token) when a release
        handed the slot to ``token`` (a refused caller of :meth:`acquire`): the caller
        holds it now, under a short claim that it extends with :meth:`renew` at once, and
        must not acquire again. ``None`` otherwise: the caller attempts again.
        """

    def cancel_wait(self, group: SlotGroup, token: str) -> AcquireResult | None:
        """A refused caller gives up waiting and leaves the line.

        Returns the grant if a release handed it a slot meanwhile (it holds that slot
        now and must release or renew it), else ``None``.
        """
        return None

    def waiting(self, group: SlotGroup) -> list[str]:
        """Tokens of the live waiters of ``group``, first in line first (diagnostics, tests)."""
        return []

    @abc.abstractmethod
    def held_slots(self) -> list[HeldSlot]:
        """Every slot currently recorded in the store (expired leases included)."""

    def waiting_calls(self) -> list[WaitingCall]:
        """Every live waiter of every group, each group's line first in line first.

        For operators (the admin's throttle locks page, ``manage.py throttle_locks``); a
        backend that cannot list its waiters returns an empty list.
        """
        return []
