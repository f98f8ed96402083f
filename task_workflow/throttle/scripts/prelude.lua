-- prelude.lua: shared by every throttle script. Redis has no include: the backend puts
-- this file in front of each script's own text when it loads the scripts (so Redis reports
-- a script's line N as N + this file's line count).
--
-- KEYS (every script), the group's keys, all under one hash tag (one Redis Cluster slot):
--   1 holders      sorted set: owner token -> lease deadline (ms, the server's clock)
--   2 meta         hash: owner token -> "<fencing token> <metadata JSON>"
--   3 line         sorted set: waiting token -> place in line (order of first arrival)
--   4 alive        sorted set: waiting token -> until when it counts as waiting (ms)
--   5 waiter_meta  hash: waiting token -> "<lease ms> <metadata JSON>"
--   6 seq          string: the group's last number (fencing tokens, places in line)
--   7 handed       hash: token -> fencing token of a handoff not yet confirmed by its waiter
--   8 wake         list: "<waiter token> <fencing token>" of each handoff not yet taken;
--                  every waiter of the group BLPOPs it (with its own list): the waiter it
--                  names holds the slot, another one passes it on (announce.lua)
--   9 own wake     the list of the token named by ARGV[5] (the token the script is about),
--                  where announce.lua passes a handoff on to that waiter
-- A script touches no other key: a Redis Cluster proxy, or a server that enforces it,
-- refuses a script's access to a key it was not given.
--
-- ARGV 1-4 (every script), the protocol's constants, in milliseconds; the script's own
-- arguments follow from ARGV[5]:
--   1 grace_ms   a server up for less than this grants nothing in a group whose counter is
--                gone (it may have forgotten leases: they must end first); 0: no grace,
--                and no script runs INFO
--   2 seq_ms     how long a group's counter outlives its last use
--   3 waiter_ms  how long a refused caller counts as waiting after an attempt
--   4 claim_ms   the longest claim a handoff gives a waiter before it must renew

local GRACE_MS = tonumber(ARGV[1])
local SEQ_MS = tonumber(ARGV[2])
local WAITER_MS = tonumber(ARGV[3])
local CLAIM_MS = tonumber(ARGV[4])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Integers as Redis arguments: Lua's own number formatting would round large ones.
local function int(n)
  return string.format('%d', n)
end

-- Keep the holders and their metadata past a deadline ttl ms from now (never shorten):
-- the group's records outlive every lease.
local function extend(ttl)
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], 2 * ttl)
    redis.call('PEXPIRE', KEYS[2], 2 * ttl)
  end
end

-- The restart grace. A server that lost its data (a restart without persistence, a
-- FLUSHDB) has forgotten leases that their holders still believe in: while it has been up
-- for less than GRACE_MS it grants nothing in a group whose counter is gone. Its uptime
-- comes from INFO, read with pcall: a Redis user that may not run INFO (an ACL profile
-- such as +@all -@dangerous) gets no grant and no write, and an error that says so.
local grace_left = 0
local info_refused = false
local function within_restart_grace()
  local info = redis.pcall('INFO', 'server')
  if type(info) == 'table' and info.err then
    info_refused = info.err
    return true
  end
  -- Whole seconds between the start's and now's whole seconds: up to 1 s more than has
  -- really passed, so count one second less.
  local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) - 1
  if uptime * 1000 < GRACE_MS then
    grace_left = GRACE_MS - uptime * 1000
    return true
  end
  return false
end

-- The reply of a script that needed INFO and was refused it (see above).
local function info_refused_reply()
  return redis.error_reply('NOPERM task_workflow throttle: this Redis user may not run INFO (' ..
    tostring(info_refused) .. '); the restart grace needs it: grant +info, or set ' ..
    'TASK_WORKFLOW["THROTTLE_RESTART_GRACE"] to 0 with a Redis that keeps its data')
end

-- The group's next number (fencing tokens, places in line): one above the group's last,
-- and never below the server's clock in microseconds. So numbers strictly increase on one
-- server, and a server that takes over (restarted empty, or a replica promoted with a
-- counter that missed the latest numbers) starts above every number granted before the
-- switch (the clock has moved on; fewer than one number per microsecond is ever taken,
-- each in a script of its own). Returns nil, writing nothing, when the counter is gone and
-- the server is within its restart grace (sets grace_left) or would not tell its uptime
-- (sets info_refused).
local function next_number()
  local last = redis.call('GET', KEYS[6])
  if not last and GRACE_MS > 0 and within_restart_grace() then
    return nil
  end
  local n = math.max(tonumber(last or 0) + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', KEYS[6], int(n), 'PX', SEQ_MS)
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

-- A holder's slot ends (released, lapsed, dropped): its metadata and any untold handoff go.
local function forget_holders(tokens)
  redis.call('HDEL', KEYS[2], unpack(tokens))
  redis.call('HDEL', KEYS[7], unpack(tokens))
end

-- "<fencing token> <metadata>" as stored in meta: the fencing token.
local function fence_of(entry)
  return tonumber(string.sub(entry, 1, string.find(entry, ' ', 1, true) - 1))
end

-- The token's handoff is confirmed or its slot ends: nothing about it is left to announce,
-- on the group's list or its own. An entry on the group's list is there only while the
-- handoff is owed (handed): announce.lua takes both off together.
local function withdraw_announcement(token)
  if redis.call('HDEL', KEYS[7], token) == 1 then
    local entry = redis.call('HGET', KEYS[2], token)
    if entry then
      redis.call('LREM', KEYS[8], 0, token .. ' ' .. int(fence_of(entry)))
    end
  end
  redis.call('DEL', KEYS[9])
end
