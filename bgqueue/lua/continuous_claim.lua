-- Beat claims waiting continuous tasks (it calls this only while a continuous worker is
-- live). Each claim gets a new generation, so a message with any other generation is
-- stale, and a short claim lease: if beat dies before publishing, the sweep publishes.
--
-- KEYS[1]   ct
-- KEYS[2]   ct:pending
-- KEYS[3]   ct:leases (ability → ms its dispatch or run is presumed lost)
-- KEYS[4]   seq
-- ARGV[1]   claim lease, ms
-- ARGV[2..] abilities, as read from ct:pending
-- Returns a flat list: ability, generation for each claimed task.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #ARGV do
  local ability = ARGV[i]
  redis.call('ZREM', KEYS[2], ability)
  local raw = redis.call('HGET', KEYS[1], ability)
  local rec = raw and cjson.decode(raw)
  if rec and rec['s'] == 'pending' then
    rec['s'], rec['g'] = 'dispatched', redis.call('INCR', KEYS[4])
    redis.call('HSET', KEYS[1], ability, cjson.encode(rec))
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ability)
    out[#out + 1] = ability
    out[#out + 1] = rec['g']
  end
end
return out
