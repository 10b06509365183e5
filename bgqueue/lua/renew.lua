-- A running task's watchdog proves it is alive and collects a simulated expiration.
--
-- KEYS[1]  runleases
-- KEYS[2]  expire (set of generations whose expiration was simulated)
-- ARGV[1]  generation
-- ARGV[2]  run lease, ms
-- Returns {alive (1|0), expire requested (1|0)}; alive is 0 if the run was given up.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
local live = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
return {live, redis.call('SREM', KEYS[2], ARGV[1])}
