-- A worker hands a dispatched request back to pending because its requirements no
-- longer hold on this worker (its conditions changed after the dispatch).
--
-- KEYS[1]  req:<scope>
-- KEYS[2]  leases
-- KEYS[3]  due:<profile> of the request
-- KEYS[4]  counts: "<kind>:<profile>" pending, "<kind>:dispatched" (keys.py)
-- ARGV[1]  scope
-- ARGV[2]  identifier
-- ARGV[3]  generation from the message
-- Returns 1 if released, 0 if the message was stale.

local id, gen = ARGV[2], ARGV[3]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= gen then return 0 end
local m = ARGV[1] .. '\31' .. id
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
rec['s'], rec['g'], rec['t'] = 'pending', nil, now  -- t: pending again since now
redis.call('HSET', KEYS[1], id, cjson.encode(rec))
redis.call('ZREM', KEYS[2], m)
redis.call('ZADD', KEYS[3], rec['e'], m)
redis.call('HINCRBY', KEYS[4], rec['k'] .. ':dispatched', -1)
redis.call('HINCRBY', KEYS[4], rec['k'] .. ':' .. rec['r'], 1)
return 1
