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
- ``…:{digest}:handed`` hash, token → fencing token of a handoff its waiter has not
  confirmed yet;
- ``…:{digest}:wake`` the group's wake list, ``"<waiter token> <fencing token>"`` per
  handoff not yet taken, and ``…:{digest}:wake:<token>`` a waiter's own list; a waiter
  ``BLPOP``s both.

The scripts are files of the package, ``scripts/<name>.lua``, each with a header of its
``KEYS``, ``ARGV``, reply and the invariants it keeps; ``scripts/prelude.lua`` (the key
layout, the protocol's constants, shared functions) is put in front of each, since Redis
has no include. Every key a script touches is passed to it in ``KEYS``, as Redis Cluster
and proxies require: the group's eight keys and the own wake list of the token the call is
about. A release learns who is first in line only inside its script, so it cannot have
been given that waiter's own list: it announces the handoff on the group's list, which
every waiter blocks on besides its own. The waiter named there holds the slot when its
``BLPOP`` returns (a handoff costs the release's round trip and the wake-up, no second
acquire); a waiter that pops another's announcement passes it on to that waiter's own
list (``announce.lua``), which checks that it is still owed (docs/design/throttle-protocol.md,
"Waking a waiter on Redis"). Acquire and release are one round trip each. Keys expire on
their own when nobody renews, so a crashed fleet leaves nothing behind. The scripts write
after ``TIME``, which needs Redis >= 5 (effects replication).

The scripts are called through redis-py's ``Script`` objects (``EVALSHA``, loading the
script again when the server answers ``NOSCRIPT``) on the client the backend is given
(:func:`~task_workflow.throttle.factory.throttle_client` builds one with its own pool and
socket timeout), so redis-py's retries, health checks and instrumentation of
``execute_command`` apply to them, and its pool makes them thread- and fork-safe. Each
script is idempotent for its token, so a call that redis-py retries after a lost reply
does no harm: an acquire that was granted finds its own slot, a release that went
through finds nothing.

In the durable mode (``replicas`` > 0, ``TASK_WORKFLOW['THROTTLE_REPLICAS']``) a script call
that grants, renews, hands over or releases a slot is sent as ``EVALSHA`` followed by
``WAIT`` in one non-transactional pipeline, so the acknowledgement is of that call's own
writes (same connection) at the cost of no extra round trip; fewer acknowledgements than
``replicas`` raise ``task_workflow.throttle.errors.ReplicationNotAcknowledged``.

The scripts are the protocol. Their invariants (docs/design/throttle-protocol.md):

- ``ZCARD holders <= concurrency``: a grant adds a holder only below the limit (after
  dropping expired leases), a handoff replaces the holder that released;
- a holder's score is written only by its own acquire or renewal (``ZADD NX`` for a
  handoff, ``ZADD XX`` for a renewal of a live lease);
- a grant (any path) removes the caller from the line; a handoff skips anyone already
  holding a slot;
- a handoff is announced (its waiter and fencing token) only while the claim it announces
  is still the waiter's, live and unconfirmed: the script that ends the claim early (a
  release of the waiter's slot: a force release before it woke) or confirms it (its
  acquire finding the slot, its renewal, its cancel) withdraws it from both lists,
  ``announce.lua`` passes it on only while it is still owed and the claim live, and the
  lists expire no later than the millisecond before the claim does; so no waiter is
  granted a slot it no longer holds, nor a fencing token twice;
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
import logging
import math
from collections.abc import Callable, Iterator
from importlib.resources import files
from typing import Any, cast

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisError

from .base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend, WaitingCall
from .errors import ReplicationNotAcknowledged

logger = logging.getLogger(__name__)

#: Where the scripts are: ``task_workflow/throttle/scripts/`` (shipped as package data).
SCRIPTS_DIR = files("task_workflow.throttle") / "scripts"


def load_script(name: str) -> str:
    """The text of ``scripts/<name>.lua`` as Redis runs it: ``prelude.lua`` in front.

    Redis has no include, so the shared part is concatenated here; Redis's line numbers
    in a script's errors count the prelude's lines too.
    """
    prelude = (SCRIPTS_DIR / "prelude.lua").read_text(encoding="utf-8")
    return prelude + "\n" + (SCRIPTS_DIR / f"{name}.lua").read_text(encoding="utf-8")


ACQUIRE_SCRIPT = load_script("acquire")
RELEASE_SCRIPT = load_script("release")
ANNOUNCE_SCRIPT = load_script("announce")
RENEW_SCRIPT = load_script("renew")
CANCEL_WAIT_SCRIPT = load_script("cancel_wait")

HOLDERS_SUFFIX = ":holders"
LINE_SUFFIX = ":line"
#: The group's keys, in the order of the scripts' ``KEYS`` (``scripts/prelude.lua``).
KEY_SUFFIXES = (HOLDERS_SUFFIX, ":meta", ":line", ":alive", ":waiter_meta", ":seq", ":handed", ":wake")

#: ``AcquireResult.reason`` of a refusal, by the tag the acquire script gives it.
REFUSAL_REASONS = {b"grace": "restart grace"}

#: Characters with a meaning in a ``SCAN MATCH`` pattern.
GLOB_CHARACTERS = "\\*?[]"


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis ``MATCH`` pattern."""
    return "".join(f"\\{char}" if char in GLOB_CHARACTERS else char for char in text)


class RedisThrottleBackend(ThrottleBackend):
    """Slots in Redis, reached through a redis-py client (the factory gives it a client of
    the cache's server with a pool and socket timeout of its own).

    ``restart_grace`` (seconds): a server that has been up for less than this when a
    group's counter is missing grants nothing in that group until it has; it must be at
    least the longest lease anyone holds (default ``TASK_WORKFLOW['LOCK_TTL']``).

    ``replicas`` (``TASK_WORKFLOW['THROTTLE_REPLICAS']``): with N > 0, a grant, renewal,
    release or handed slot counts only once N replicas acknowledged it: each such script
    call is followed, in the same non-transactional pipeline on the same connection, by
    ``WAIT N <replicas_timeout>``, and fewer acknowledgements raise
    ``task_workflow.throttle.errors.ReplicationNotAcknowledged`` (a store failure:
    the caller gives a grant back, the backend does not). 0 sends no ``WAIT``.

    ``primary_check``: called before each script call and ``BLPOP`` (Sentinel's primary
    watch: it makes the pool reconnect to a new primary); ``None``, nothing is called.
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

    def __init__(
        self,
        client: Redis,
        key_prefix: str,
        *,
        restart_grace: float = 60.0,
        replicas: int = 0,
        replicas_timeout: float = 0.5,
        primary_check: Callable[[], None] | None = None,
    ) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, not {replicas}")
        if replicas and not 0 < replicas_timeout < math.inf:
            raise ValueError(f"replicas_timeout must be finite and > 0 seconds, not {replicas_timeout}")
        self.client = client
        self.key_prefix = key_prefix
        self.restart_grace = restart_grace
        self.replicas = replicas
        self.replicas_timeout = replicas_timeout
        # WAIT takes whole milliseconds, and 0 would block for ever.
        self._wait_ms = max(1, math.ceil(replicas_timeout * 1000))
        self.primary_check = primary_check
        # A handed slot is replicated by its new holder's renewal (acknowledged), so in the
        # durable mode the holder renews before it uses it.
        self.confirms_handoffs = replicas > 0
        # The protocol's constants, ARGV 1-4 of every script (scripts/prelude.lua): read
        # here, so a subclass or a setting changes them without another script text.
        self._constants = tuple(
            b"%d" % value
            for value in (math.ceil(restart_grace * 1000), self.SEQ_MS, self.WAITER_MS, self.CLAIM_MS)
        )
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._announce = client.register_script(ANNOUNCE_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._cancel_wait = client.register_script(CANCEL_WAIT_SCRIPT)
        self._key_cache: dict[SlotGroup, list[bytes]] = {}
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block = self.MAX_BLOCK if not timeout else min(self.MAX_BLOCK, timeout / 2)

    def _keys(self, group: SlotGroup) -> list[bytes]:
        """The group's eight keys: one hash tag, so one Redis Cluster slot.

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
        """``token``'s own wake list: the group's wake list's key with ``:<token>`` added."""
        return self._keys(group)[7] + b":" + token.encode()

    def _run(self, script: Script, group: SlotGroup, token: str, *args: bytes) -> Any:
        """Run ``script`` about ``token``: KEYS the group's keys and ``token``'s wake list,
        ARGV the protocol's constants, ``token`` and ``args`` (scripts/prelude.lua)."""
        if self.primary_check is not None:
            self.primary_check()
        return script(
            keys=[*self._keys(group), self._wake_key(group, token)],
            args=[*self._constants, token.encode(), *args],
        )

    def _run_replicated(self, script: Script, group: SlotGroup, token: str, *args: bytes) -> tuple[Any, int]:
        """Run ``script`` as :meth:`_run` does, then ``WAIT`` for the replicas; return the
        script's reply and how many replicas acknowledged (every write of the connection
        so far, so the script's own).

        Both commands go in one non-transactional pipeline: one round trip, and ``WAIT``
        runs on the connection that wrote. The script is sent as ``EVALSHA`` (a redis-py
        ``Script`` queued in a pipeline would ask ``SCRIPT EXISTS`` first, a round trip per
        call); a server that does not know it (restarted, failed over) answers
        ``NOSCRIPT``, and it is loaded and the pipeline sent again, as ``Script`` does.
        """
        if self.primary_check is not None:
            self.primary_check()
        keys = [*self._keys(group), self._wake_key(group, token)]
        argv = [*self._constants, token.encode(), *args]
        for attempt in range(2):
            pipeline = self.client.pipeline(transaction=False)
            pipeline.evalsha(script.sha, len(keys), *keys, *argv)
            pipeline.wait(self.replicas, self._wait_ms)
            reply, acknowledged = pipeline.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 0:
                self.client.script_load(script.script)
                continue
            for answer in (reply, acknowledged):
                if isinstance(answer, Exception):
                    raise answer
            break
        return reply, int(acknowledged)

    def _not_acknowledged(self, operation: str, acknowledged: int) -> ReplicationNotAcknowledged:
        return ReplicationNotAcknowledged(operation, acknowledged, self.replicas, self.replicas_timeout)

    def acquire(
        self,
        group: SlotGroup,
        token: str,
        concurrency: int,
        ttl: float,
        metadata: dict[str, Any],
    ) -> AcquireResult:
        args = (b"%d" % concurrency, b"%d" % math.ceil(ttl * 1000), json.dumps(metadata).encode())
        if not self.replicas:
            return acquire_result(self._run(self._acquire, group, token, *args))
        reply, acknowledged = self._run_replicated(self._acquire, group, token, *args)
        result = acquire_result(reply)
        # A refusal only registered a waiter: nothing a failover could turn into a second
        # holder, so its acknowledgements do not matter.
        if result.acquired and acknowledged < self.replicas:
            raise self._not_acknowledged("grant", acknowledged)
        return result

    def release(self, group: SlotGroup, token: str, slot: str = "") -> bool:
        if not self.replicas:
            return bool(self._run(self._release, group, token))
        reply, acknowledged = self._run_replicated(self._release, group, token)
        # Raised even when nothing was removed: an earlier attempt (a give-back retried,
        # redis-py's retry after a lost reply) may have removed it unacknowledged, and a
        # replica promoted now would still hold the slot.
        if acknowledged < self.replicas:
            raise self._not_acknowledged("release", acknowledged)
        return bool(reply)

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        args = (b"%d" % math.ceil(ttl * 1000),)
        if not self.replicas:
            return bool(self._run(self._renew, group, token, *args))
        reply, acknowledged = self._run_replicated(self._renew, group, token, *args)
        if reply and acknowledged < self.replicas:
            raise self._not_acknowledged("renewal", acknowledged)
        return bool(reply)

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> AcquireResult | None:
        # BLPOP takes fractional seconds; 0 would block forever, so keep a floor. Capped
        # below the socket timeout, so a wait is never taken for a dead connection.
        own, shared = self._wake_key(group, token), self._keys(group)[7]
        if self.primary_check is not None:
            self.primary_check()
        popped = self.client.blpop([own, shared], timeout=min(max(timeout, 0.001), self._max_block))
        if popped is None:
            return None
        value = popped[1] if isinstance(popped[1], bytes) else str(popped[1]).encode()
        waiter, _, fence = value.rpartition(b" ")
        # Either list announces a handoff only while the claim is still its waiter's, live
        # and unconfirmed (the scripts withdraw or expire it first), so one that names us
        # (the group's) or is ours (our own list: a fencing token alone) is a slot we hold.
        if not waiter or waiter == token.encode():
            return AcquireResult(True, handed_over=True, fencing_token=int(fence))
        # Another waiter's handoff, taken off the group's list because we blocked on it
        # longer: pass it on to that waiter's own list, then attempt again.
        self._pass_on(group, waiter.decode(), fence)
        return None

    def _pass_on(self, group: SlotGroup, waiter: str, fence: bytes) -> None:
        """Put a handoff announcement for ``waiter`` on its own wake list (announce.lua).

        The slot is the waiter's already: if this fails, it finds the slot at its next
        attempt (within a second), so the failure is only logged.
        """
        try:
            self._run(self._announce, group, waiter, fence)
        except (RedisError, OSError) as exc:
            logger.warning(
                "Throttle %s: could not pass a handoff on to its waiter (%s); "
                "it finds the slot at its next attempt",
                group,
                exc,
            )

    def cancel_wait(self, group: SlotGroup, token: str) -> AcquireResult | None:
        if not self.replicas:
            fence = self._run(self._cancel_wait, group, token)
        else:
            fence, acknowledged = self._run_replicated(self._cancel_wait, group, token)
            if fence and acknowledged < self.replicas:
                raise self._not_acknowledged("handed slot", acknowledged)
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

    def waiting_calls(self) -> list[WaitingCall]:
        """Every live waiter, read from each group's line (order of first arrival), its
        liveness and its metadata; "since" is when it first asked (its host's clock)."""
        seconds, micros = self.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        pattern = f"{glob_escape(self.key_prefix)}{{*}}{LINE_SUFFIX}"
        calls: list[WaitingCall] = []
        batch: list[str] = []
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= self.LIST_BATCH:
                calls.extend(self._read_lines(batch, now_ms))
                batch = []
        if batch:
            calls.extend(self._read_lines(batch, now_ms))
        return calls

    def _read_lines(self, line_keys: list[str], now_ms: int) -> list[WaitingCall]:
        pipe = self.client.pipeline(transaction=False)
        for line_key in line_keys:
            base = line_key[: -len(LINE_SUFFIX)]
            pipe.zrange(line_key, 0, -1)
            pipe.zrange(f"{base}:alive", 0, -1, withscores=True)
            pipe.hgetall(f"{base}:waiter_meta")
        replies = pipe.execute()
        calls: list[WaitingCall] = []
        for line, alive, metas in zip(replies[::3], replies[1::3], replies[2::3], strict=True):
            live = {bytes(member) for member, until in alive if until > now_ms}
            place = 0
            for raw_token in line:
                raw_token = bytes(raw_token)
                entry = metas.get(raw_token)
                if raw_token not in live or entry is None:
                    continue  # stopped attempting (dropped at the group's next script)
                place += 1
                _, _, meta_text = bytes(entry).partition(b" ")
                try:
                    meta = json.loads(meta_text)
                except ValueError:
                    meta = {}
                calls.append(waiting_call_from_metadata(raw_token.decode(), place, meta, now_ms / 1000))
        return calls

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


def waiting_call_from_metadata(token: str, place: int, meta: dict[str, Any], now: float) -> WaitingCall:
    """Build a :class:`WaitingCall` from the metadata a throttle sends with its attempts
    (``waiting_since``, else the attempt's own ``acquired_at``, is when it first asked)."""
    since = meta.get("waiting_since", meta.get("acquired_at"))
    concurrency = meta.get("concurrency")
    return WaitingCall(
        group=SlotGroup(meta.get("task_name", "?"), meta.get("key")),
        token=token,
        place=place,
        since=float(since) if isinstance(since, int | float) else None,
        now=now,
        concurrency=int(concurrency) if isinstance(concurrency, int) else None,
        task_id=meta.get("task_id"),
        hostname=meta.get("hostname"),
        pid=meta.get("pid"),
    )


def acquire_result(reply: Any) -> AcquireResult:
    """The acquire script's reply as an :class:`AcquireResult`: a fencing token (> 0) for a
    grant; ``-1 - ms`` for a refusal, ``ms`` the wait until the earliest lease may end; or
    ``[-1 - ms, tag]`` for a refusal with a reason (``b"grace"``: the restart grace)."""
    if isinstance(reply, list):
        code, tag = reply
        tag = tag if isinstance(tag, bytes) else str(tag).encode()
        return AcquireResult(False, (-1 - int(code)) / 1000, reason=REFUSAL_REASONS.get(tag, tag.decode()))
    if reply > 0:
        return AcquireResult(True, fencing_token=reply)
    return AcquireResult(False, (-1 - reply) / 1000)
