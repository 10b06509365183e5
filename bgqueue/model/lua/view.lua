-- Beat's view of an app's live worker classes, read on every dispatch pass: a fleet of a
-- thousand workers of a few kinds costs a few entries, not a thousand heartbeats.
--
-- KEYS[1]  classlive  ZSET class id -> ms its last worker's heartbeat lapses
-- KEYS[2]  classes    HASH class id -> class JSON (heartbeat.lua)
-- ARGV[..] class ids beat does not know yet (their definitions are returned)
-- Returns {server ms, live class ids (a list), then class id, class JSON for each asked}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')}
for _, class in ipairs(ARGV) do
  out[#out + 1] = class
  out[#out + 1] = redis.call('HGET', KEYS[2], class) or ''
end
return out
