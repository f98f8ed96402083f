"""Redis backend: a sorted set of leases per slot group, driven by Lua scripts.

Per group (one Redis Cluster hash tag, so all keys land on one shard):

- ``…:{digest}:holders`` sorted set, member = owner token, score = lease deadline in
  milliseconds of the *server's* clock (``redis.call('TIME')``);
- ``…:{digest}:meta`` hash, token → ``"<fencing token> <JSON metadata>"``;
- ``…:{digest}:line`` sorted set of waiting callers scored by order of first arrival,
  ``…:{digest}:alive`` the same callers scored by until when they count as waiting (each
  attempt pushes it), and ``…:{digest}:waiter_meta`` their lease length and metadata;
  place in line and liveness are kept apart, so attempting again never moves a waiter back;
- ``…:{digest}:seq`` the group's counter: fencing tokens and places in line;
- ``…:{digest}:wake:<token>`` a waiter's own list, which it ``BLPOP``s.

A release hands the freed slot straight to the first live waiter in line and wakes it, so
the waiter holds the slot when its ``BLPOP`` returns: a handoff costs the release's round
trip and the wake-up, no second acquire. Acquire and release are one round trip each
(``EVALSHA``). Keys expire on their own when nobody renews, so a crashed fleet leaves
nothing behind. The scripts write after ``TIME``, which needs Redis >= 5 (effects
replication).

The scripts are the protocol. Their invariants (docs/design/throttle-protocol.md):

- ``ZCARD holders <= concurrency``: a grant adds a holder only below the limit (after
  dropping expired leases), a handoff replaces the holder that released;
- a holder's score is written only by its own acquire or renewal (``ZADD NX`` for a
  handoff, ``ZADD XX`` for a renewal of a live lease);
- a grant (any path) removes the caller from the line; a handoff skips anyone already
  holding a slot;
- a waiter's wake list announces a handoff (its fencing token) only while the claim it
  announces is still the waiter's and live: the script that ends the claim early (a release
  of the waiter's slot: a force release before it woke) or confirms it (its acquire finding
  the slot) deletes it, and it expires the millisecond before the claim does; so no waiter
  is granted a slot it no longer holds, nor a fencing token twice;
- whoever sets a deadline extends the group's keys past it;
- a caller may take a free slot only if fewer than ``concurrency - holders`` live waiters
  are ahead of it in line;
- the counter behind fencing tokens never goes back: it restarts (after expiry or a server
  restart) from the server's clock in microseconds, above every number handed out before;
- after a server restart (the counter is gone and the server's uptime is below the
  restart grace) nothing is granted until a whole grace has passed, so leases the server
  forgot cannot overlap new ones.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any, cast

from redis import Redis
from redis.commands.core import Script
from redis.connection import Connection
from redis.exceptions import NoScriptError, ResponseError

from .base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend

# Shared by every script that reads the clock or writes the group. KEYS (every script):
# holders, meta, line, alive, waiter_meta, seq.
PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Integers as Redis arguments: Lua's own number formatting would round large ones.
local function int(n)
  return string.format('%d', n)
end

-- Keep the holders and their metadata past a deadline ttl ms from now (never shorten).
local function extend(ttl)
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], 2 * ttl)
    redis.call('PEXPIRE', KEYS[2], 2 * ttl)
  end
end

-- The group's next number (fencing tokens, places in line): counts up from the server's
-- clock in microseconds, so a counter that expired or died with the server restarts above
-- every number it gave out (fewer than one per microsecond). Returns nil while a restarted
-- server is within its restart grace, and sets grace_left (ms).
local grace_left = 0
local function next_number()
  local n = redis.call('INCR', KEYS[6])
  if n == 1 then
    -- Whole seconds between the start's and now's whole seconds: up to 1 s more than
    -- has really passed, so count one second less.
    local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) - 1
    if uptime * 1000 < {grace_ms} then
      grace_left = {grace_ms} - uptime * 1000
      redis.call('DEL', KEYS[6])
      return nil
    end
    n = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('SET', KEYS[6], int(n))
  end
  redis.call('PEXPIRE', KEYS[6], {seq_ms})
  return n
end

-- Forget waiters that stopped attempting (gave up without a word, or died).
local function drop_dead_waiters()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
    redis.call('ZREM', KEYS[3], unpack(dead))
    redis.call('HDEL', KEYS[5], unpack(dead))
  end
end

local function leave_line(token)
  redis.call('ZREM', KEYS[3], token)
  redis.call('ZREM', KEYS[4], token)
  redis.call('HDEL', KEYS[5], token)
end

-- A waiter's wake list (same hash tag): KEYS[1] minus its holders suffix is the base key.
local function wake_key(token)
  return string.sub(KEYS[1], 1, {base_end}) .. ':wake:' .. token
end

-- "<fencing token> <metadata>" as stored in meta: the fencing token.
local function fence_of(entry)
  return tonumber(string.sub(entry, 1, string.find(entry, ' ', 1, true) - 1))
end
"""

# ARGV: token, concurrency, ttl_ms, metadata JSON. One integer reply: a grant's fencing
# token (> 0), or -1 - the milliseconds until the earliest lease runs out (a refusal; the
# caller is then in line). A refused caller is registered as a waiter with its lease
# length and metadata, so that a release can hand it the slot directly.
ACQUIRE_SCRIPT = (
    PRELUDE
    + """
local ttl = tonumber(ARGV[3])
local limit = tonumber(ARGV[2])
-- A release handed this caller a slot since its last attempt: it holds it; extend it.
local own = redis.call('ZSCORE', KEYS[1], ARGV[1])
if own and tonumber(own) > now then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
  extend(ttl)
  leave_line(ARGV[1])
  redis.call('DEL', wake_key(ARGV[1]))  -- the handoff is confirmed: no announcement left
  return fence_of(redis.call('HGET', KEYS[2], ARGV[1]))
end
-- Live waiters ahead of this caller (all of them for a newcomer) are served first.
local ahead, place = 0, false
if redis.call('EXISTS', KEYS[3]) == 1 then
  drop_dead_waiters()
  place = redis.call('ZRANK', KEYS[3], ARGV[1])
  ahead = place or redis.call('ZCARD', KEYS[3])
end
local count = redis.call('ZCARD', KEYS[1])
if count + ahead >= limit then
  -- Looks full: drop expired leases (only then, to keep the common path short).
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    redis.call('HDEL', KEYS[2], unpack(expired))
    count = count - #expired
  end
end
local fence = false
if count + ahead < limit then
  fence = next_number()
end
if fence then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], int(fence) .. ' ' .. ARGV[4])
  if place then
    leave_line(ARGV[1])
  end
  extend(ttl)
  return fence
end
-- Refused: join the line at the back on the first refusal; stay in place after that.
if not place then
  redis.call('ZADD', KEYS[3], int(next_number() or (now * 1000)), ARGV[1])
end
redis.call('ZADD', KEYS[4], now + {waiter_ms}, ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3] .. ' ' .. ARGV[4])
for i = 3, 5 do
  redis.call('PEXPIRE', KEYS[i], 2 * {waiter_ms})
end
if grace_left > 0 then
  return -1 - grace_left
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
  return -1
end
return -1 - math.max(tonumber(first[2]) - now, 0)
"""
)

# ARGV: token. Returns 1 when the token held a live lease. The freed slot goes straight to the
# first live waiter in line that holds no slot: it is added as a holder (``ZADD NX``) with
# its own metadata under a claim of at most ``CLAIM_MS``, and woken on its personal list
# ``<group>:wake:<token>`` (same hash tag) with its fencing token, so it holds the slot
# when BLPOP returns. Nothing else's lease changes. The releaser's own wake list goes too:
# a slot handed to a waiter and force-released before it woke is no longer announced.
RELEASE_SCRIPT = (
    PRELUDE
    + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline then
  return 0  -- not ours (expired and taken, or force-released): free nothing, hand nothing
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', wake_key(ARGV[1]))
-- 1 for a live lease; an expired one was free already (its slot is still handed on).
local released = tonumber(deadline) > now and 1 or 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  return released
end
drop_dead_waiters()
while true do
  local next = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #next == 0 then
    return released
  end
  local waiter = next[1]
  local entry = redis.call('HGET', KEYS[5], waiter)
  if entry and not redis.call('ZSCORE', KEYS[1], waiter) then
    local fence = next_number()
    if not fence then
      return released  -- a restarted server within its grace: the waiter takes it when it may
    end
    leave_line(waiter)
    local space = string.find(entry, ' ', 1, true)
    -- A short claim: the woken waiter extends it to its own lease at once, and a waiter
    -- that died while blocked does not sit on the slot for a whole lease.
    local claim = math.min(tonumber(string.sub(entry, 1, space - 1)), {claim_ms})
    redis.call('ZADD', KEYS[1], 'NX', now + claim, waiter)
    redis.call('HSET', KEYS[2], waiter, int(fence) .. ' ' .. string.sub(entry, space + 1))
    extend(claim)
    -- Empty before: a waiter holding no slot has no announcement. A key lives through the
    -- millisecond of its expiry, a claim does not: end the announcement one before.
    local wake = wake_key(waiter)
    redis.call('RPUSH', wake, int(fence))
    redis.call('PEXPIREAT', wake, int(now + claim - 1))
    return released
  end
  leave_line(waiter)  -- no entry, or it holds a slot already: not a waiter
end
"""
)

# KEYS: the six group keys and the caller's wake list. ARGV: token. A waiter giving up:
# returns the fencing token of a slot a release handed it meanwhile (it holds it), else
# takes it out of line and returns 0.
CANCEL_WAIT_SCRIPT = (
    PRELUDE
    + """
redis.call('DEL', KEYS[7])
leave_line(ARGV[1])
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) > now then
  return fence_of(redis.call('HGET', KEYS[2], ARGV[1]))
end
return 0
"""
)

# ARGV: token, ttl_ms. Returns 1 when renewed, 0 when the slot is lost (gone, or expired:
# then it is dropped, since another caller may take it any moment).
RENEW_SCRIPT = (
    PRELUDE
    + """
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
extend(ttl)
return 1
"""
)

HOLDERS_SUFFIX = ":holders"
KEY_SUFFIXES = (HOLDERS_SUFFIX, ":meta", ":line", ":alive", ":waiter_meta", ":seq")

#: Characters with a meaning in a ``SCAN MATCH`` pattern.
GLOB_CHARACTERS = "\\*?[]"


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis ``MATCH`` pattern."""
    return "".join(f"\\{char}" if char in GLOB_CHARACTERS else char for char in text)


class RedisThrottleBackend(ThrottleBackend):
    """Slots in Redis, reached through the raw client of a django-redis cache.

    ``restart_grace`` (seconds): a server that has been up for less than this when a
    group's counter is missing grants nothing in that group until it has; it must be at
    least the longest lease anyone holds (default ``TASK_WORKFLOW['LOCK_TTL']``).
    """

    wakes_waiters = True

    #: Milliseconds a refused caller counts as waiting after an attempt; waiters attempt
    #: again at least once a second (the longest single BLPOP).
    WAITER_MS = 3000

    #: Milliseconds a handed-over slot is held before its new holder extends the lease.
    CLAIM_MS = 5000

    #: Milliseconds a group's counter outlives its last use: a counter that restarts
    #: makes the server check its uptime (``INFO``) once.
    SEQ_MS = 24 * 3600 * 1000

    #: Longest single BLPOP, seconds; kept below the client's socket timeout.
    MAX_BLOCK = 1.0

    @property
    def handoff_claim(self) -> float:  # type: ignore[override]
        return self.CLAIM_MS / 1000

    #: Groups whose key names are kept (per-entity keys make many groups; cleared when full).
    KEY_CACHE_SIZE = 4096

    def __init__(self, client: Redis, key_prefix: str, *, restart_grace: float = 60.0) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.restart_grace = restart_grace
        # Constants go into the scripts' text (read here, at construction): fewer arguments
        # to pack on every call.
        constants = {
            "{waiter_ms}": str(self.WAITER_MS),
            "{claim_ms}": str(self.CLAIM_MS),
            "{seq_ms}": str(self.SEQ_MS),
            "{grace_ms}": str(math.ceil(restart_grace * 1000)),
            "{base_end}": str(-len(HOLDERS_SUFFIX) - 1),
        }

        def register(text: str) -> Script:
            for name, value in constants.items():
                text = text.replace(name, value)
            return client.register_script(text)

        self._acquire = register(ACQUIRE_SCRIPT)
        self._release = register(RELEASE_SCRIPT)
        self._renew = register(RENEW_SCRIPT)
        self._cancel_wait = register(CANCEL_WAIT_SCRIPT)
        self._key_cache: dict[SlotGroup, list[bytes]] = {}
        self._idle: list[Connection] = []
        self._pid = os.getpid()
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block = self.MAX_BLOCK if not timeout else min(self.MAX_BLOCK, timeout / 2)

    def _keys(self, group: SlotGroup) -> list[bytes]:
        """The group's six keys: one hash tag, so one Redis Cluster slot.

        Encoded once and cached: acquire and release are sent many times per group.
        """
        keys = self._key_cache.get(group)
        if keys is None:
            base = self._base_key(group)
            keys = [f"{base}{suffix}".encode() for suffix in KEY_SUFFIXES]
            if len(self._key_cache) >= self.KEY_CACHE_SIZE:
                self._key_cache.clear()
            self._key_cache[group] = keys
        return keys

    def _base_key(self, group: SlotGroup) -> str:
        return f"{self.key_prefix}{{{group.digest}}}"

    def _wake_key(self, group: SlotGroup, token: str) -> bytes:
        return f"{self._base_key(group)}:wake:{token}".encode()

    def _run(self, script: Script, keys: list[bytes], *args: bytes) -> Any:
        """``EVALSHA`` of ``script`` on an idle connection of the backend's own, packed by
        hand.

        The throttle's calls are few and fixed in shape, so they skip redis-py's generic
        command path (pool checkout with its health check, argument encoding, reply
        callbacks): about half of a call's client-side cost. A connection whose call failed
        midway (timeout, lost server, an exception raised into this thread) is dropped,
        since a reply may still be on its way; a script the server forgot is loaded again.
        """
        packed = b"".join(
            [
                b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args), script.sha.encode()),
                b"$%d\r\n%d\r\n" % (len(str(len(keys))), len(keys)),
                *[b"$%d\r\n%s\r\n" % (len(part), part) for part in (*keys, *args)],
            ]
        )
        connection = self._connection()
        try:
            connection.send_packed_command([packed], check_health=False)
            reply = connection.read_response()
        except NoScriptError:
            self._idle.append(connection)
            script.sha = self.client.script_load(script.script)
            return self._run(script, keys, *args)
        except ResponseError:
            self._idle.append(connection)
            raise
        except BaseException:
            connection.disconnect()
            raise
        self._idle.append(connection)
        return reply

    def _connection(self) -> Connection:
        """An idle connection, or a new one with the throttle client's settings.

        A list of idle connections rather than redis-py's pool: ``pop`` and ``append`` are
        atomic, so threads and greenlets alike each take their own; it grows to the most
        calls ever in flight at once. After ``fork`` the parent's connections are left
        alone (redis-py closes none of another process's sockets).
        """
        if self._pid != os.getpid():
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            pool = self.client.connection_pool
            return cast(Connection, pool.connection_class(**pool.connection_kwargs))

    def acquire(
        self,
        group: SlotGroup,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
    ) -> AcquireResult:
        reply = self._run(
            self._acquire,
            self._keys(group),
            token.encode(),
            b"%d" % concurrency,
            b"%d" % math.ceil(ttl * 1000),
            json.dumps(metadata).encode(),
        )
        if reply > 0:
            return AcquireResult(True, fencing_token=reply)
        return AcquireResult(False, (-1 - reply) / 1000)

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        return bool(self._run(self._release, self._keys(group), token.encode()))

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        return bool(self._run(self._renew, self._keys(group), token.encode(), b"%d" % math.ceil(ttl * 1000)))

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> AcquireResult | None:
        # BLPOP takes fractional seconds; 0 would block forever, so keep a floor. Capped
        # below the socket timeout, so a wait is never taken for a dead connection.
        popped = self.client.blpop(
            [self._wake_key(group, token)], timeout=min(max(timeout, 0.001), self._max_block)
        )
        if popped is None:
            return None
        # The list announces a handoff only while the claim is still ours and live (the
        # scripts delete or expire it first), so a popped one is a slot we hold.
        return AcquireResult(True, handed_over=True, fencing_token=int(popped[1]))

    def cancel_wait(self, group: SlotGroup, token: str) -> AcquireResult | None:
        keys = [*self._keys(group), self._wake_key(group, token)]
        fence = self._run(self._cancel_wait, keys, token.encode())
        return AcquireResult(True, handed_over=True, fencing_token=fence) if fence else None

    def waiting(self, group: SlotGroup) -> list[str]:
        _, _, line, alive, *_ = self._keys(group)
        seconds, micros = self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        live = {
            bytes(member)
            for member, until in cast(Any, self.client.zrange(alive, 0, -1, withscores=True))
            if until > now_ms
        }
        return [
            bytes(member).decode()
            for member in cast(Any, self.client.zrange(line, 0, -1))
            if bytes(member) in live
        ]

    def _holder_keys(self) -> Iterator[str]:
        pattern = f"{glob_escape(self.key_prefix)}{{*}}{HOLDERS_SUFFIX}"
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
                fence, meta = parse_meta_entry(metas.get(raw_token))
                slots.append(
                    held_slot_from_metadata(
                        token, token[:8], meta, deadline_ms / 1000, now, fencing_token=fence
                    )
                )
        return slots


def parse_meta_entry(raw: bytes | str | None) -> tuple[int | None, dict[str, Any]]:
    """``(fencing token, metadata)`` of a ``meta`` hash value (``"<token> <JSON>"``)."""
    if not raw:
        return None, {}
    text = raw.decode() if isinstance(raw, bytes) else raw
    fence, _, meta = text.partition(" ")
    try:
        return int(fence), json.loads(meta)
    except ValueError:
        return None, {}


def held_slot_from_metadata(
    token: str,
    slot: str,
    meta: dict[str, Any],
    lease_deadline: float,
    now: float,
    *,
    fencing_token: int | None = None,
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
        fencing_token=fencing_token if fencing_token is not None else meta.get("fencing_token"),
    )
