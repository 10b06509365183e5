-- Read every known worker with its liveness, and forget workers long dead.
--
-- KEYS[1]  workers (hash name → JSON)
-- KEYS[2]  alive (sorted set name → ms its heartbeat lapses)
-- ARGV[1]  forget workers whose heartbeat lapsed this many ms ago
-- Returns the server time in ms, then name, lapse ms, JSON for each worker.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local forget = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
for _, name in ipairs(forget) do
  redis.call('HDEL', KEYS[1], name)
  redis.call('ZREM', KEYS[2], name)
end
local out = {now}
local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local raw = redis.call('HGET', KEYS[1], entries[i])
  if raw then
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
    out[#out + 1] = raw
  end
end
return out
