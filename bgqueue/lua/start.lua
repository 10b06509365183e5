-- A worker starts a dispatched request: only if the message's generation is still
-- the record's, so duplicate or stale messages (replaced, cancelled, re-published)
-- never run twice.
--
-- KEYS[1]  req:<scope>
-- KEYS[2]  leases
-- KEYS[3]  running
-- KEYS[4]  runleases
-- KEYS[5]  counts: "<kind>:dispatched" (keys.py)
-- ARGV[1]  scope
-- ARGV[2]  identifier
-- ARGV[3]  generation from the message
-- ARGV[4]  worker name
-- ARGV[5]  run lease, ms (renewed by the task's watchdog)
-- Returns the running record JSON, or false if the message is stale.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local scope, id, gen = ARGV[1], ARGV[2], ARGV[3]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return false end
local rec = cjson.decode(raw)
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= gen then return false end

redis.call('HDEL', KEYS[1], id)
local class = rec['k'] == 'refresh' and '#refresh' or '#processing'
if redis.call('HINCRBY', KEYS[1], class, -1) <= 0 then redis.call('HDEL', KEYS[1], class) end
redis.call('ZREM', KEYS[2], scope .. '\31' .. id)
redis.call('HINCRBY', KEYS[5], rec['k'] .. ':dispatched', -1)
rec['s'], rec['sc'], rec['i'], rec['w'], rec['sa'] = 'running', scope, id, ARGV[4], now
-- The pending record leaves defaults out (requests.py); the running one is whole.
rec['a'], rec['pl'] = rec['a'] or 0, rec['pl'] or 'null'
raw = cjson.encode(rec)
redis.call('HSET', KEYS[3], gen, raw)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), gen)
return raw
