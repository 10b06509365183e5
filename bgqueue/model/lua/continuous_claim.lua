-- Beat claims waiting continuous tasks for the workers it picked (live continuous workers
-- with the ability's handler). Each claim gets a new generation, so a message with any
-- other generation is stale, and a dispatch lease: if beat dies before publishing, or the
-- worker before starting it, the sweep sends it again or puts it back to pending.
--
-- KEYS[1]   ct
-- KEYS[2]   ct:pending
-- KEYS[3]   ct:leases (ability -> ms its dispatch or run is presumed lost)
-- KEYS[4]   seq
-- ARGV[1]   dispatch lease, ms
-- ARGV[2..] pairs: ability (as read from ct:pending), worker name
-- Returns a flat list: ability, generation, worker for each claimed task.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #ARGV, 2 do
  local ability, worker = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', KEYS[1], ability)
  local ok, rec = pcall(cjson.decode, raw or 'null')
  if ok and type(rec) == 'table' and rec['s'] == 'pending' then
    redis.call('ZREM', KEYS[2], ability)
    rec['s'], rec['g'], rec['w'] = 'dispatched', redis.call('INCR', KEYS[4]), worker
    redis.call('HSET', KEYS[1], ability, cjson.encode(rec))
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ability)
    out[#out + 1] = ability
    out[#out + 1] = rec['g']
    out[#out + 1] = worker
  elseif not raw then
    redis.call('ZREM', KEYS[2], ability)
  end
end
return out
