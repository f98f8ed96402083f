-- release.lua: give up a slot; hand it straight to the first live waiter in line.
--
-- KEYS: the prelude's 1-9 (9: the releasing token's own wake list).
-- ARGV: the prelude's constants 1-4, then
--   5 token  the owner token whose slot ends (its holder's, or an operator's force release)
-- Reply: 1 when the token held a live lease, 0 when it did not (expired, or not there).
--
-- The waiter is told on the group's wake list (KEYS[8]), "<waiter> <fencing token>": the
-- script learns who is first in line only here, so it cannot have been given that
-- waiter's own list. Every waiter blocks on both lists; the one named takes it (it holds
-- the slot), another passes it on to the named waiter's own list (announce.lua).
--
-- Invariants kept here:
-- - nothing but the released token's own lease changes: the waiter is added with ZADD NX
--   (a waiter that holds a slot already is skipped, its lease untouched);
-- - ZCARD holders <= concurrency: a handoff replaces the holder that released;
-- - the slot goes to the first live waiter in line (FIFO by first arrival), which leaves
--   the line;
-- - a handoff is a claim of at most claim_ms: a waiter that died while blocked does not sit
--   on the slot for a whole lease; the woken waiter extends it to its own lease at once;
-- - a waiter is told of a handoff only while the claim is still its own: releasing a slot
--   (a force release before its waiter woke) withdraws its announcement, and the group's
--   wake list expires no later than the millisecond before the earliest claim it announces
--   ends (a key lives through the millisecond of its expiry, a lease does not);
-- - whoever sets a deadline extends the group's keys past it.

local token = ARGV[5]

local deadline = redis.call('ZSCORE', KEYS[1], token)
if not deadline then
  return 0  -- not ours (expired and taken, or force-released): free nothing, hand nothing
end
withdraw_announcement(token)
redis.call('ZREM', KEYS[1], token)
forget_holders({token})
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
      -- A restarted server within its grace (or a user that may not read its uptime): the
      -- slot is free; the waiter takes it when it may.
      return released
    end
    leave_line(waiter)
    local space = string.find(entry, ' ', 1, true)
    local claim = math.min(tonumber(string.sub(entry, 1, space - 1)), CLAIM_MS)
    redis.call('ZADD', KEYS[1], 'NX', now + claim, waiter)
    redis.call('HSET', KEYS[2], waiter, int(fence) .. ' ' .. string.sub(entry, space + 1))
    extend(claim)
    -- Owed to the waiter until it confirms it (or its claim ends): what announce.lua checks
    -- before passing the announcement on.
    redis.call('HSET', KEYS[7], waiter, int(fence))
    redis.call('PEXPIRE', KEYS[7], 2 * CLAIM_MS)
    -- Announce it; the list must not outlive the earliest claim it announces.
    local left = redis.call('PTTL', KEYS[8])
    redis.call('RPUSH', KEYS[8], waiter .. ' ' .. int(fence))
    if left < 0 or left > claim - 1 then
      redis.call('PEXPIREAT', KEYS[8], int(now + claim - 1))
    end
    return released
  end
  leave_line(waiter)  -- no entry, or it holds a slot already: not a waiter
end
