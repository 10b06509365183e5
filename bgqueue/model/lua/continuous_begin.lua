-- A continuous worker starts a dispatched task, only if the message's generation is
-- still the record's: duplicate or stale messages never run it twice.
--
-- KEYS[1]  ct
-- KEYS[2]  ct:leases
-- ARGV[1]  ability
-- ARGV[2]  generation from the message
-- ARGV[3]  worker name
-- ARGV[4]  pid of the pool process running it
-- ARGV[5]  run lease, ms (renewed by the run's watchdog)
-- Returns the running record JSON, or false if the message is stale.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local rec = cjson.decode(raw)
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= ARGV[2] then return false end
rec['s'], rec['w'], rec['pid'], rec['sa'] = 'running', ARGV[3], tonumber(ARGV[4]), now
raw = cjson.encode(rec)
redis.call('HSET', KEYS[1], ARGV[1], raw)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
return raw
