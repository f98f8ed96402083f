-- cancel_wait.lua: a waiter gives up and leaves the line.
--
-- KEYS: the prelude's 1-9 (9: the waiter's own wake list).
-- ARGV: the prelude's constants 1-4, then
--   5 token  the waiter's owner token
-- Reply: the fencing token of a slot a release handed the waiter meanwhile (it holds that
-- slot now and must release or renew it), else 0.
--
-- Invariants kept here:
-- - the waiter leaves the line whatever it is told (every path ends its place in line);
-- - its announcements go (on its own list and the group's), and a handoff it is told of
--   here is confirmed (no longer owed), so the same grant is never reported twice.

local token = ARGV[5]

leave_line(token)
local deadline = redis.call('ZSCORE', KEYS[1], token)
if deadline and tonumber(deadline) > now then
  withdraw_announcement(token)
  return fence_of(redis.call('HGET', KEYS[2], token))
end
redis.call('DEL', KEYS[9])
return 0
