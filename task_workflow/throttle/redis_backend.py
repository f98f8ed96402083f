"""Redis backend: a sorted set of leases per slot group, driven by Lua scripts.

Per group (one Redis Cluster hash tag, so all keys land on one shard):

- ``…:{digest}:holders`` sorted set, member = owner token, score = lease deadline in
  milliseconds of the *server's* clock (``redis.call('TIME')``);
- ``…:{digest}:meta`` hash, token → JSON metadata for operators;
- ``…:{digest}:waiters`` sorted set of callers waiting for a slot (score: until when
  they count as waiting) and ``…:{digest}:waiter_meta`` their lease length and metadata;
- ``…:{digest}:wake:<token>`` a waiter's own list, which it ``BLPOP``s.

A release hands the freed slot straight to a waiting caller and wakes it, so the waiter
holds the slot when its ``BLPOP`` returns: a handoff costs the release's round trip and
the wake-up, no second acquire. Acquire and release are one round trip each
(``EVALSHA``). Keys expire on their own when nobody renews, so a crashed fleet leaves
nothing behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

from .base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend

# KEYS: holders, meta, waiters, waiter_meta. ARGV: token, concurrency, ttl_ms, metadata
# JSON. Returns -1 when acquired, else the milliseconds (>= 0) until the earliest lease
# runs out. One integer reply and few arguments: on the uncontended path the client's
# packing and parsing cost as much as the script. Expired leases are swept only when the
# group looks full, so that path is ZCARD + ZADD + HSET (+ PEXPIRE when the group is
# new). A refused caller is registered as a waiter (with its lease length and metadata)
# for ``WAITER_MS``, so that a release can hand it the slot directly.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local limit = tonumber(ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    redis.call('HDEL', KEYS[2], unpack(expired))
    count = count - #expired
  end
end
if count >= limit then
  -- A release may have handed this caller a slot since its last attempt: it holds it.
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
    return -1
  end
  redis.call('ZADD', KEYS[3], now + {waiter_ms}, ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[3] .. ' ' .. ARGV[4])
  redis.call('PEXPIRE', KEYS[3], {waiter_ms})
  redis.call('PEXPIRE', KEYS[4], {waiter_ms})
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(tonumber(first[2]) - now, 0)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
-- A new group has no expiry yet; else extend only when the keys would outlive no lease.
if count == 0 or redis.call('PTTL', KEYS[1]) < ttl then
  -- Twice the lease, so the next acquires within a TTL need not extend it again.
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  redis.call('PEXPIRE', KEYS[2], 2 * ttl)
end
return -1
"""

# KEYS: holders, meta, waiters, waiter_meta. ARGV: token. Returns 1 when the token held a
# slot. The freed slot goes straight to the waiter that has waited longest among the live
# ones: it is added as a holder with its own lease and metadata (a claim of at most
# ``CLAIM_MS``), and woken on its personal list ``<group>:wake:<token>`` (same hash tag),
# so it holds the slot when BLPOP returns.
RELEASE_SCRIPT = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 0 or redis.call('EXISTS', KEYS[3]) == 0 then
  return removed
end
-- Never hand the slot back to the releasing caller.
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('HDEL', KEYS[4], unpack(gone))
end
local next = redis.call('ZRANGE', KEYS[3], 0, 0)
if #next == 0 then
  return removed
end
local waiter = next[1]
local entry = redis.call('HGET', KEYS[4], waiter)
redis.call('ZREM', KEYS[3], waiter)
redis.call('HDEL', KEYS[4], waiter)
if not entry then
  return removed
end
local space = string.find(entry, ' ', 1, true)
-- A short claim: the woken waiter extends it to its own lease at once, and a waiter that
-- died while blocked does not sit on the slot for a whole lease.
local ttl = math.min(tonumber(string.sub(entry, 1, space - 1)), {claim_ms})
redis.call('ZADD', KEYS[1], now + ttl, waiter)
redis.call('HSET', KEYS[2], waiter, string.sub(entry, space + 1))
if redis.call('PTTL', KEYS[1]) < ttl then
  -- Twice the lease, so the next acquires within a TTL need not extend it again.
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  redis.call('PEXPIRE', KEYS[2], 2 * ttl)
end
-- KEYS[1] minus its holders suffix is the group's base key.
local wake = string.sub(KEYS[1], 1, {base_end}) .. ':wake:' .. waiter
redis.call('RPUSH', wake, '1')
redis.call('PEXPIRE', wake, ttl)
return removed
"""

# KEYS: holders, waiters, waiter_meta, wake. ARGV: token.
# A waiter giving up: returns 1 if a release handed it a slot meanwhile (it holds it),
# else forgets the waiter and returns 0.
CANCEL_WAIT_SCRIPT = """
redis.call('DEL', KEYS[4])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 1
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 0
"""

# KEYS: holders, meta. ARGV: token, ttl_ms. Returns 1 when renewed, 0 when the slot is lost.
RENEW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline then
  return 0
end
if tonumber(deadline) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  -- Twice the lease, so the next acquires within a TTL need not extend it again.
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  redis.call('PEXPIRE', KEYS[2], 2 * ttl)
end
return 1
"""

HOLDERS_SUFFIX = ":holders"

#: The result of every successful acquire (immutable, so one object serves all).
ACQUIRED = AcquireResult(True)


class RedisThrottleBackend(ThrottleBackend):
    """Slots in Redis, reached through the raw client of a django-redis cache."""

    wakes_waiters = True

    #: Milliseconds a refused caller stays registered as a waiter; waiters re-register on
    #: every attempt, at least once a second (the longest single BLPOP).
    WAITER_MS = 3000

    #: Milliseconds a handed-over slot is held before its new holder extends the lease.
    CLAIM_MS = 5000

    @property
    def handoff_claim(self) -> float:  # type: ignore[override]
        return self.CLAIM_MS / 1000

    #: Groups whose key names are kept (per-entity keys make many groups; cleared when full).
    KEY_CACHE_SIZE = 4096

    def __init__(self, client: Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix
        # Constants go into the scripts' text (read here, at construction): fewer arguments
        # to pack on every call.
        self._acquire = client.register_script(ACQUIRE_SCRIPT.replace("{waiter_ms}", str(self.WAITER_MS)))
        release = RELEASE_SCRIPT.replace("{claim_ms}", str(self.CLAIM_MS))
        self._release = client.register_script(release.replace("{base_end}", str(-len(HOLDERS_SUFFIX) - 1)))
        self._renew = client.register_script(RENEW_SCRIPT)
        self._cancel_wait = client.register_script(CANCEL_WAIT_SCRIPT)
        self._key_cache: dict[SlotGroup, list[bytes]] = {}

    def _keys(self, group: SlotGroup) -> list[bytes]:
        """holders, meta, waiters, waiter_meta: one hash tag, so one Redis Cluster slot.

        Encoded once and cached: acquire and release are sent many times per group.
        """
        keys = self._key_cache.get(group)
        if keys is None:
            base = self._base_key(group)
            names = (HOLDERS_SUFFIX, ":meta", ":waiters", ":waiter_meta")
            keys = [f"{base}{suffix}".encode() for suffix in names]
            if len(self._key_cache) >= self.KEY_CACHE_SIZE:
                self._key_cache.clear()
            self._key_cache[group] = keys
        return keys

    def _base_key(self, group: SlotGroup) -> str:
        return f"{self.key_prefix}{{{group.digest}}}"

    def _run(self, script: Script, keys: list[bytes], *args: EncodableT) -> Any:
        """``EVALSHA`` straight on the client; ``Script`` itself reloads a flushed script."""
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return script(keys=keys, args=args)

    def acquire(
        self,
        group: SlotGroup,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
    ) -> AcquireResult:
        wait_ms = self._run(
            self._acquire, self._keys(group), token, concurrency, math.ceil(ttl * 1000), json.dumps(metadata)
        )
        return ACQUIRED if wait_ms < 0 else AcquireResult(False, wait_ms / 1000)

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        return bool(self._run(self._release, self._keys(group), token))

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        holders, meta = self._keys(group)[:2]
        return bool(self._renew(keys=[holders, meta], args=[token, math.ceil(ttl * 1000)]))

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> bool:
        # BLPOP takes fractional seconds; 0 would block forever, so keep a floor.
        wake = f"{self._base_key(group)}:wake:{token}"
        return self.client.blpop([wake], timeout=max(timeout, 0.001)) is not None

    def cancel_wait(self, group: SlotGroup, token: str) -> bool:
        holders, _, waiters, waiter_meta = self._keys(group)
        wake = f"{self._base_key(group)}:wake:{token}".encode()
        return bool(self._cancel_wait(keys=[holders, waiters, waiter_meta, wake], args=[token]))

    def _holder_keys(self) -> Iterator[str]:
        pattern = f"{self.key_prefix}{{*}}{HOLDERS_SUFFIX}"
        for key in self.client.scan_iter(match=pattern, count=1000):
            yield key.decode() if isinstance(key, bytes) else key

    def held_slots(self) -> list[HeldSlot]:
        seconds, micros = self.client.time()
        now = seconds + micros / 1_000_000
        slots: list[HeldSlot] = []
        batch: list[str] = []
        for holders_key in self._holder_keys():
            batch.append(holders_key)
            if len(batch) >= self.LIST_BATCH:
                slots.extend(self._read_groups(batch, now))
                batch = []
        if batch:
            slots.extend(self._read_groups(batch, now))
        return slots

    #: Groups read per pipelined round trip when listing.
    LIST_BATCH = 500

    def _read_groups(self, holder_keys: list[str], now: float) -> list[HeldSlot]:
        pipe = self.client.pipeline(transaction=False)
        for holders_key in holder_keys:
            pipe.zrange(holders_key, 0, -1, withscores=True)
            pipe.hgetall(holders_key[: -len(HOLDERS_SUFFIX)] + ":meta")
        replies = pipe.execute()
        slots: list[HeldSlot] = []
        for leases, metas in zip(replies[::2], replies[1::2], strict=True):
            for raw_token, deadline_ms in leases:
                token = raw_token.decode() if isinstance(raw_token, bytes) else raw_token
                raw_meta = metas.get(raw_token)
                meta = json.loads(raw_meta) if raw_meta else {}
                slots.append(held_slot_from_metadata(token, token[:8], meta, deadline_ms / 1000, now))
        return slots


def held_slot_from_metadata(
    token: str, slot: str, meta: dict[str, Any], lease_deadline: float, now: float
) -> HeldSlot:
    """Build a :class:`HeldSlot` from the metadata dict a throttle stores at acquire."""
    return HeldSlot(
        group=SlotGroup(meta.get("task_name", "?"), meta.get("key")),
        token=token,
        slot=slot,
        concurrency=int(meta.get("concurrency", 0)),
        task_id=meta.get("task_id"),
        hostname=meta.get("hostname"),
        pid=meta.get("pid"),
        acquired_at=meta.get("acquired_at"),
        lease_deadline=lease_deadline,
        now=now,
    )
