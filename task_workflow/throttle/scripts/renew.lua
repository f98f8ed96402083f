-- renew.lua: push a held lease's deadline to now + ttl.
--
-- KEYS: the prelude's 1-9 (9: the holder's own wake list).
-- ARGV: the prelude's constants 1-4, then
--   5 token   the holder's owner token
--   6 ttl_ms  the new lease length
-- Reply: 1 when renewed; 0 when the slot is lost: gone, or expired (then it is dropped,
-- since another caller may take it any moment).
--
-- Invariants kept here:
-- - a holder's deadline is written only by its own renewal (ZADD XX, of a live lease);
-- - a renewal confirms a handoff (the woken waiter renews at once): nothing about it is
--   left to announce;
-- - whoever sets a deadline extends the group's keys past it.

local token = ARGV[5]
local ttl = tonumber(ARGV[6])

local deadline = redis.call('ZSCORE', KEYS[1], token)
if not deadline then
  return 0
end
if tonumber(deadline) <= now then
  withdraw_announcement(token)
  redis.call('ZREM', KEYS[1], token)
  forget_holders({token})
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + ttl, token)
extend(ttl)
withdraw_announcement(token)
return 1
