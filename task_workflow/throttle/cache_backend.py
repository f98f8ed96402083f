"""Generic backend for any Django cache with an atomic ``add`` (e.g. DatabaseCache).

Slot ``i`` of a group is one cache key, taken with ``cache.add`` (atomic on the
database, Memcached and Redis caches) with the lease as its timeout. Renewal and release
check the owner token first. Best effort where the cache is weaker than Redis:

- the check and the write of renew/release are two calls, so a lease that runs out
  between them can touch the next holder's slot (only when a renewal is a whole TTL late);
- deadlines use this host's clock, so hosts need synchronised clocks;
- waiters poll (every ``poll_interval`` seconds) instead of being woken.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.cache.backends.base import BaseCache

from .base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend
from .redis_backend import held_slot_from_metadata

#: Every slot key starts with this (then the group digest and the slot number).
SLOT_KEY_PREFIX = "tw:throttle:"
REGISTRY_KEY = "tw:throttle:groups"


class CacheThrottleBackend(ThrottleBackend):
    """Slots as ``cache.add`` keys, one per slot number."""

    wakes_waiters = False

    def __init__(self, cache: BaseCache, poll_interval: float = 0.05) -> None:
        self.cache = cache
        self.poll_interval = poll_interval

    @staticmethod
    def _slot_key(group: SlotGroup, slot: int | str) -> str:
        return f"{SLOT_KEY_PREFIX}{group.digest}:{slot}"

    def acquire(
        self,
        group: SlotGroup,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
    ) -> AcquireResult:
        lease = {"token": token, "deadline": time.time() + ttl, **metadata}
        for slot in range(concurrency):
            if self.cache.add(self._slot_key(group, slot), lease, timeout=ttl):
                self._register(group, metadata)
                return AcquireResult(True, slot=str(slot))
        return self._refused(group, concurrency)

    def _refused(self, group: SlotGroup, concurrency: int) -> AcquireResult:
        """A refusal, with how long until the earliest current lease ends."""
        held = self.cache.get_many([self._slot_key(group, slot) for slot in range(concurrency)])
        deadlines = [value["deadline"] for value in held.values() if isinstance(value, dict)]
        retry_after = max(min(deadlines) - time.time(), 0.0) if deadlines else 0.0
        return AcquireResult(False, retry_after=retry_after)

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        key = self._slot_key(group, slot)
        value = self.cache.get(key)
        if not isinstance(value, dict) or value.get("token") != token:
            return False
        self.cache.delete(key)
        return True

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        key = self._slot_key(group, slot)
        value = self.cache.get(key)
        if not isinstance(value, dict) or value.get("token") != token:
            return False
        self.cache.set(key, {**value, "deadline": time.time() + ttl}, timeout=ttl)
        self._register(group, value)
        return True

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> bool:
        # No wake-up channel in a generic cache: poll.
        time.sleep(max(0.0, min(timeout, self.poll_interval)))
        return False

    def _register(self, group: SlotGroup, metadata: dict[str, Any]) -> None:
        """Record the group so operators can list it (a cache cannot be scanned).

        Read-modify-write: a concurrent registration may be lost, but holders register
        again on every renewal, so a lost entry comes back within a third of a TTL.
        """
        registry = self.cache.get(REGISTRY_KEY) or {}
        known = registry.get(group.digest)
        if known is not None and known["concurrency"] >= metadata.get("concurrency", 1):
            return
        registry[group.digest] = {
            "task_name": group.task_name,
            "key": group.key,
            "concurrency": metadata.get("concurrency", 1),
        }
        self.cache.set(REGISTRY_KEY, registry, timeout=None)

    #: Slot keys read per ``get_many`` when listing.
    LIST_BATCH = 1000

    def held_slots(self) -> list[HeldSlot]:
        registry: dict[str, dict[str, Any]] = self.cache.get(REGISTRY_KEY) or {}
        now = time.time()
        keys: dict[str, tuple[str, str]] = {}  # slot key -> (slot number, group digest)
        for digest, info in registry.items():
            group = SlotGroup(info["task_name"], info.get("key"))
            for number in range(int(info.get("concurrency", 1))):
                keys[self._slot_key(group, number)] = (str(number), digest)
        names = list(keys)
        found: dict[str, Any] = {}
        for start in range(0, len(names), self.LIST_BATCH):
            found.update(self.cache.get_many(names[start : start + self.LIST_BATCH]))
        slots = [
            held_slot_from_metadata(value["token"], keys[key][0], value, value["deadline"], now)
            for key, value in found.items()
            if isinstance(value, dict)
        ]
        empty = set(registry) - {keys[key][1] for key in found}
        if empty:  # forget idle groups, so per-entity keys do not grow the registry forever
            current = self.cache.get(REGISTRY_KEY) or {}
            for digest in empty:
                current.pop(digest, None)
            self.cache.set(REGISTRY_KEY, current, timeout=None)
        return slots
