-- announce.lua: pass a handoff announcement that another waiter popped from the group's
-- wake list on to the waiter it names, on that waiter's own list.
--
-- KEYS: the prelude's 1-9 (9: the named waiter's own wake list).
-- ARGV: the prelude's constants 1-4, then
--   5 waiter  the token the announcement names
--   6 fence   the fencing token it announces
-- Reply: 1 when the waiter's own list now holds the fencing token, 0 when the handoff is
-- no longer owed to it: confirmed meanwhile (its acquire found the slot, or it gave up
-- holding it), force-released, or its claim lapsed.
--
-- Invariants kept here:
-- - a waiter's own wake list announces a handoff only while the claim it announces is
--   still the waiter's, live and not yet confirmed: the handoff must still be owed
--   (handed) with this fencing token and the claim live; and the announcement expires the
--   millisecond before the claim does, so a waiter that wakes late finds none;
-- - each handoff is passed on at most once (its handed entry goes), and the group's list
--   held it once (the waiter that popped it passes it on), so no fencing token is granted
--   twice.

local waiter = ARGV[5]
local fence = ARGV[6]

if redis.call('HGET', KEYS[7], waiter) ~= fence then
  return 0
end
redis.call('HDEL', KEYS[7], waiter)
local claim_ends = redis.call('ZSCORE', KEYS[1], waiter)
if not claim_ends or tonumber(claim_ends) <= now + 1 then
  return 0
end
redis.call('RPUSH', KEYS[9], fence)
redis.call('PEXPIREAT', KEYS[9], int(tonumber(claim_ends) - 1))
return 1
