-- A worker announces itself: its conditions and slots, alive until the timeout.
--
-- KEYS[1]  workers (hash name → JSON)
-- KEYS[2]  alive (sorted set name → ms its heartbeat lapses)
-- ARGV[1]  worker name
-- ARGV[2]  heartbeat JSON
-- ARGV[3]  heartbeat timeout, ms; 0 means the worker is leaving
-- Returns the server time in ms.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[3]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
end
return now
