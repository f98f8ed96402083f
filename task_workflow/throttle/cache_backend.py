"""Generic backend for any Django cache with an atomic ``add`` (Memcached, LocMem, …).

Keys of a group (``<d>`` its digest), all through the Django cache API:

- ``tw:throttle:<d>:<i>``: slot *i*, the holder's lease (owner token, deadline, fencing
  token, metadata), taken with ``cache.add`` and the lease as its timeout;
- ``tw:throttle:<d>:fence``: the fencing counter, ``cache.incr``;
- ``tw:throttle:<d>:tickets``: the ticket counter, a waiter's place in line (``incr``);
- ``tw:throttle:<d>:w:<n>``: ticket *n* is live: its owner's token, for ``WAITER_MS``
  milliseconds after its latest attempt (liveness is kept apart from the place in line, so
  attempting again never moves a waiter back);
- ``tw:throttle:<d>:floor``: the lowest ticket that may still be live, so an attempt
  reads only the live part of the line;
- ``tw:throttle:groups``: the groups, for operators' listing (a cache cannot be scanned).

Counters start (and restart, after expiry or eviction) at this host's clock in
microseconds, so a lost counter goes on above the numbers it handed out. The cache
client is looked up per call in Django's ``caches`` (per thread) when the backend knows
its alias: some Memcached clients must not be shared between threads, and the lease
renewer is another thread.

Guaranteed, given an atomic ``add``:

- at most ``concurrency`` holders: a slot is one key, and ``add`` has one winner;
- a refused caller that keeps attempting keeps its place in line; a newcomer does not
  take a free slot while a live waiter that arrived earlier is in line, and a waiter
  takes one only while fewer live waiters are ahead of it than slots are free.

Best effort, since a generic cache has no compare-and-set:

- renew and release read the slot, check the owner token, then write: a call that is a
  whole lease late (its lease ran out and another caller took the slot in between) can
  touch the next holder's slot; likewise a holder stalled for a whole lease between its
  ``add`` and the write of its fencing token;
- fencing tokens increase with every grant only where ``incr`` is atomic (Memcached,
  Redis, LocMem; not the file or database caches, whose ``incr`` reads then writes);
- the line is read, then acted on: a waiter that has just taken its ticket and not yet
  marked it live can be skipped once by a concurrent attempt (it puts itself back in
  line on its next attempt); a line that lost its ticket counter may be overtaken once
  by newcomers; a waiter whose liveness key the cache evicted goes to the back;
- deadlines use each host's clock, so hosts need synchronised clocks;
- waiters poll (every ``poll_interval`` seconds) instead of being woken.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from django.core.cache import caches
from django.core.cache.backends.base import BaseCache

from .base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend, WaitingCall
from .redis_backend import held_slot_from_metadata

#: Every key of the throttle starts with this.
SLOT_KEY_PREFIX = "tw:throttle:"
REGISTRY_KEY = "tw:throttle:groups"


@dataclass
class _Ticket:
    """A waiter's place in line, as this process knows it."""

    number: int


class CacheThrottleBackend(ThrottleBackend):
    """Slots as ``cache.add`` keys, one per slot number, and a ticket line of waiters."""

    wakes_waiters = False

    #: Milliseconds a refused caller counts as waiting after its latest attempt (as on
    #: Redis); ``throttle`` attempts again at least once a second.
    WAITER_MS = 3000

    #: Seconds the counters and the line's floor live (they restart safely when gone).
    COUNTER_TIMEOUT = 24 * 3600

    #: Most tickets read per attempt (a line longer than this is read at both ends).
    MAX_LINE = 1000

    def __init__(
        self, cache: BaseCache | None, poll_interval: float = 0.05, *, alias: str | None = None
    ) -> None:
        self._cache = cache
        self.alias = alias
        self.poll_interval = poll_interval
        self._tickets: dict[tuple[str, str], _Ticket] = {}
        self._tickets_lock = threading.Lock()

    @property
    def cache(self) -> BaseCache:
        """This thread's cache client (``caches[alias]``), else the object given."""
        if self.alias is not None:
            return caches[self.alias]
        assert self._cache is not None, "a CacheThrottleBackend needs a cache or an alias"
        return self._cache

    # Keys ------------------------------------------------------------------------------
    @staticmethod
    def _slot_key(group: SlotGroup, slot: int | str) -> str:
        return f"{SLOT_KEY_PREFIX}{group.digest}:{slot}"

    @staticmethod
    def _group_key(group: SlotGroup, name: str) -> str:
        return f"{SLOT_KEY_PREFIX}{group.digest}:{name}"

    def _waiter_key(self, group: SlotGroup, number: int) -> str:
        return self._group_key(group, f"w:{number}")

    # Operations ------------------------------------------------------------------------
    def acquire(
        self,
        group: SlotGroup,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
    ) -> AcquireResult:
        cache = self.cache
        slot_keys = [self._slot_key(group, slot) for slot in range(concurrency)]
        tickets_key, floor_key = self._group_key(group, "tickets"), self._group_key(group, "floor")
        ticket = self._ticket(group, token)
        wanted = [*slot_keys, tickets_key, floor_key]
        if ticket is not None:
            wanted.append(self._waiter_key(group, ticket.number))
        found = cache.get_many(wanted)
        if ticket is not None and found.get(self._waiter_key(group, ticket.number)) != token:
            # It stopped attempting for WAITER_MS (or the cache evicted the key): it
            # left the line, and comes back at the back.
            self._forget(group, token)
            ticket = None
        held = {slot: found[key] for slot, key in enumerate(slot_keys) if isinstance(found.get(key), dict)}
        ahead = self._line(
            cache, group, found.get(tickets_key), found.get(floor_key), ticket, move_floor=True
        )
        if len(held) + len(ahead) < concurrency:
            lease = {"token": token, "deadline": time.time() + ttl, **metadata}
            for slot, key in enumerate(slot_keys):
                if slot in held or not cache.add(key, lease, timeout=ttl):
                    continue
                # The token is drawn after the slot is ours, so grants and tokens have
                # the same order.
                fence = self._next_number(cache, self._group_key(group, "fence"))
                cache.set(key, {**lease, "fencing_token": fence}, timeout=ttl)
                if ticket is not None:
                    self._leave_line(cache, group, token)
                self._register(group, metadata)
                return AcquireResult(True, slot=str(slot), fencing_token=fence)
        # Refused: the first refusal takes a ticket (the back of the line); later ones only
        # refresh its liveness.
        if ticket is None:
            ticket = _Ticket(self._next_number(cache, tickets_key))
            with self._tickets_lock:
                self._tickets[(group.digest, token)] = ticket
            # A new line starts its floor at its first ticket (a no-op for later ones).
            cache.add(floor_key, ticket.number, timeout=self.COUNTER_TIMEOUT)
        cache.set(self._waiter_key(group, ticket.number), token, timeout=self.WAITER_MS / 1000)
        deadlines = [value["deadline"] for value in held.values() if "deadline" in value]
        # All slots held: until the earliest lease ends. Else it waits its turn in line:
        # no useful hint (a zero would make the caller spin).
        retry_after = max(min(deadlines) - time.time(), 0.0) if len(deadlines) >= concurrency else None
        return AcquireResult(False, retry_after=retry_after)

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        cache = self.cache
        self._leave_line(cache, group, token)
        key = self._slot_key(group, slot)
        value = cache.get(key)
        if not isinstance(value, dict) or value.get("token") != token:
            return False
        cache.delete(key)
        return True

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        cache = self.cache
        key = self._slot_key(group, slot)
        value = cache.get(key)
        if not isinstance(value, dict) or value.get("token") != token:
            return False
        cache.set(key, {**value, "deadline": time.time() + ttl}, timeout=ttl)
        self._register(group, value)
        return True

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> AcquireResult | None:
        # No wake-up channel in a generic cache: poll.
        time.sleep(max(0.0, min(timeout, self.poll_interval)))
        return None

    def cancel_wait(self, group: SlotGroup, token: str) -> AcquireResult | None:
        # Nothing is ever handed over here, so leaving the line is all there is to it.
        self._leave_line(self.cache, group, token)
        return None

    def waiting(self, group: SlotGroup) -> list[str]:
        cache = self.cache
        found = cache.get_many([self._group_key(group, "tickets"), self._group_key(group, "floor")])
        line = self._line(
            cache,
            group,
            found.get(self._group_key(group, "tickets")),
            found.get(self._group_key(group, "floor")),
            None,
            move_floor=False,
        )
        return [token for _, token in line]

    # The line --------------------------------------------------------------------------
    def _line(
        self,
        cache: BaseCache,
        group: SlotGroup,
        last: Any,
        floor: Any,
        ticket: _Ticket | None,
        *,
        move_floor: bool,
    ) -> list[tuple[int, str]]:
        """Live waiters ahead of ``ticket`` (the whole line without one), first first.

        With ``move_floor``, moves the floor past the dead tickets at the front of the
        line, or back to ``ticket`` if a concurrent move skipped it.
        """
        if not isinstance(last, int):
            return []  # no ticket was ever taken (or the counter is gone)
        high = last if ticket is None else ticket.number - 1
        # A lost floor: the newest tickets are the likeliest to be live.
        low = floor if isinstance(floor, int) else high - self.MAX_LINE + 1
        if ticket is not None and ticket.number < low:
            if move_floor:
                cache.set(self._group_key(group, "floor"), ticket.number, timeout=self.COUNTER_TIMEOUT)
            return []
        if high < low:
            return []
        if high - low < self.MAX_LINE:
            numbers = list(range(low, high + 1))
        else:  # the oldest waiters are near the floor, the newest near the end
            half = self.MAX_LINE // 2
            numbers = [*range(low, low + half), *range(high - half + 1, high + 1)]
        keys = {self._waiter_key(group, number): number for number in numbers}
        found = cache.get_many(list(keys))
        live = sorted((keys[key], token) for key, token in found.items() if isinstance(token, str))
        if move_floor:
            first = live[0][0] if live else (high + 1 if ticket is None else ticket.number)
            if first > low:
                cache.set(self._group_key(group, "floor"), first, timeout=self.COUNTER_TIMEOUT)
        return live

    def _ticket(self, group: SlotGroup, token: str) -> _Ticket | None:
        with self._tickets_lock:
            return self._tickets.get((group.digest, token))

    def _forget(self, group: SlotGroup, token: str) -> _Ticket | None:
        with self._tickets_lock:
            return self._tickets.pop((group.digest, token), None)

    def _leave_line(self, cache: BaseCache, group: SlotGroup, token: str) -> None:
        ticket = self._forget(group, token)
        if ticket is not None:
            cache.delete(self._waiter_key(group, ticket.number))

    def _next_number(self, cache: BaseCache, key: str) -> int:
        """The counter's next number; a missing counter restarts at the clock in µs."""
        try:
            return int(cache.incr(key))
        except ValueError:  # missing: whoever adds first sets the start, then everyone counts
            cache.add(key, int(time.time() * 1_000_000), timeout=self.COUNTER_TIMEOUT)
            return int(cache.incr(key))

    # Listing ---------------------------------------------------------------------------
    def _register(self, group: SlotGroup, metadata: dict[str, Any]) -> None:
        """Record the group so operators can list it (a cache cannot be scanned).

        Read-modify-write: a concurrent registration may be lost, but holders register
        again on every renewal, so a lost entry comes back within a third of a TTL.
        """
        cache = self.cache
        registry = cache.get(REGISTRY_KEY) or {}
        known = registry.get(group.digest)
        if known is not None and known["concurrency"] >= metadata.get("concurrency", 1):
            return
        registry[group.digest] = {
            "task_name": group.task_name,
            "key": group.key,
            "concurrency": metadata.get("concurrency", 1),
        }
        cache.set(REGISTRY_KEY, registry, timeout=None)

    #: Slot keys read per ``get_many`` when listing.
    LIST_BATCH = 1000

    def held_slots(self) -> list[HeldSlot]:
        cache = self.cache
        registry: dict[str, dict[str, Any]] = cache.get(REGISTRY_KEY) or {}
        now = time.time()
        keys: dict[str, tuple[str, str]] = {}  # slot key -> (slot number, group digest)
        for digest, info in registry.items():
            group = SlotGroup(info["task_name"], info.get("key"))
            for number in range(int(info.get("concurrency", 1))):
                keys[self._slot_key(group, number)] = (str(number), digest)
        names = list(keys)
        found: dict[str, Any] = {}
        for start in range(0, len(names), self.LIST_BATCH):
            found.update(cache.get_many(names[start : start + self.LIST_BATCH]))
        slots = [
            held_slot_from_metadata(
                value["token"],
                keys[key][0],
                value,
                value["deadline"],
                now,
                fencing_token=value.get("fencing_token"),
            )
            for key, value in found.items()
            if isinstance(value, dict)
        ]
        empty = set(registry) - {keys[key][1] for key in found}
        if empty:  # forget idle groups, so per-entity keys do not grow the registry forever
            current = cache.get(REGISTRY_KEY) or {}
            for digest in empty:
                current.pop(digest, None)
            cache.set(REGISTRY_KEY, current, timeout=None)
        return slots

    def waiting_calls(self) -> list[WaitingCall]:
        """The live waiters of the groups operators can list (those with a slot held since
        their last listing), in line order. A cache keeps only a waiter's token and place:
        its task, host and time of arrival are not known (``None``)."""
        registry: dict[str, dict[str, Any]] = self.cache.get(REGISTRY_KEY) or {}
        now = time.time()
        calls = []
        for info in registry.values():
            group = SlotGroup(info["task_name"], info.get("key"))
            for place, token in enumerate(self.waiting(group), start=1):
                calls.append(WaitingCall(group=group, token=token, place=place, since=None, now=now))
        return calls
