-- acquire.lua: take a slot of the group, or stand in its line.
--
-- KEYS: the prelude's 1-9 (9: the caller's own wake list).
-- ARGV: the prelude's constants 1-4, then
--   5 token        the caller's owner token
--   6 concurrency  the group's limit
--   7 ttl_ms       the lease asked for
--   8 metadata     JSON, stored with the lease (and with the waiter, for a handoff)
-- Reply: a grant's fencing token (an integer > 0); or a refusal: -1 - the milliseconds
-- until the earliest lease runs out, or, inside the restart grace, the array
-- {-1 - the milliseconds until the grace ends, "grace"}; the caller then stands in line,
-- registered with its lease length and metadata so that a release can hand it the slot
-- directly. An error (NOPERM ...) when the grace needs INFO and the user may not run it:
-- then the caller is not registered and no number is taken.
--
-- Invariants kept here:
-- - ZCARD holders <= concurrency: a new holder is added only below the limit, after
--   expired leases were dropped;
-- - a caller may take a free slot only if fewer than concurrency - holders live waiters
--   are ahead of it in line (a newcomer counts them all): FIFO by first arrival;
-- - a grant (any path) takes the caller out of the line;
-- - a holder's deadline is written only by its own acquire (ZADD XX for a handed slot);
-- - the acquire that finds a handed slot confirms the handoff: its announcement goes;
-- - whoever sets a deadline extends the group's keys past it;
-- - fencing tokens strictly increase per group and start above every earlier one after a
--   restart or a failover (the prelude's next_number).

local token = ARGV[5]
local limit = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local metadata = ARGV[8]

-- A release handed this caller a slot since its last attempt: it holds it; extend it.
local own = redis.call('ZSCORE', KEYS[1], token)
if own and tonumber(own) > now then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, token)
  extend(ttl)
  leave_line(token)
  withdraw_announcement(token)  -- the handoff is confirmed: nothing left to tell
  return fence_of(redis.call('HGET', KEYS[2], token))
end
-- Live waiters ahead of this caller (all of them for a newcomer) are served first.
local ahead, place = 0, false
if redis.call('EXISTS', KEYS[3]) == 1 then
  drop_dead_waiters()
  place = redis.call('ZRANK', KEYS[3], token)
  ahead = place or redis.call('ZCARD', KEYS[3])
end
local count = redis.call('ZCARD', KEYS[1])
if count + ahead >= limit then
  -- Looks full: drop expired leases (only then, to keep the common path short).
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    forget_holders(expired)
    count = count - #expired
  end
end
local fence = false
if count + ahead < limit then
  fence = next_number()
  if info_refused then
    return info_refused_reply()  -- nothing written but the sweep of expired entries
  end
end
if fence then
  redis.call('ZADD', KEYS[1], now + ttl, token)
  redis.call('HSET', KEYS[2], token, int(fence) .. ' ' .. metadata)
  if place then
    leave_line(token)
  end
  extend(ttl)
  return fence
end
-- Refused: join the line at the back on the first refusal; stay in place after that.
if not place then
  -- Inside the grace the number was refused just now: no second INFO for the same answer.
  local number = nil
  if grace_left == 0 then
    number = next_number()
  end
  if info_refused then
    return info_refused_reply()
  end
  redis.call('ZADD', KEYS[3], int(number or (now * 1000)), token)
end
redis.call('ZADD', KEYS[4], now + WAITER_MS, token)
redis.call('HSET', KEYS[5], token, ARGV[7] .. ' ' .. metadata)
for i = 3, 5 do
  redis.call('PEXPIRE', KEYS[i], 2 * WAITER_MS)
end
-- A waiter behind others took no number: if nobody holds a slot, say whether the grace is
-- what keeps the line waiting (the waiters ahead are refused for it too).
if grace_left == 0 and count == 0 and GRACE_MS > 0 and redis.call('EXISTS', KEYS[6]) == 0 then
  within_restart_grace()
end
if grace_left > 0 then
  return {-1 - grace_left, 'grace'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
  return -1
end
return -1 - math.max(tonumber(first[2]) - now, 0)
