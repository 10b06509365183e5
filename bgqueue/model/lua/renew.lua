-- A running task's watchdog proves it is alive and collects a simulated expiration. The
-- run is alive while its running record is: beat's recover.lua removes it when it gives the
-- run up. (So a lost or foreign run-lease entry costs a run nothing: it is written again.)
--
-- KEYS[1]  runleases
-- KEYS[2]  expire (set of generations whose expiration was simulated)
-- KEYS[3]  running
-- KEYS[4]  deadletter
-- ARGV[1]  generation
-- ARGV[2]  run lease, ms
-- Returns {alive (1|0), expire requested (1|0)}; alive is 0 if the run was given up.

-- include: deadletter

-- Foreign data here must not stop a live run's lease: move it aside first.
dead_letter_key(KEYS[4], KEYS[1], 'zset', 'renew met a key')
dead_letter_key(KEYS[4], KEYS[2], 'set', 'renew met a key')
dead_letter_key(KEYS[4], KEYS[3], 'hash', 'renew met a key')
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return {0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {1, redis.call('SREM', KEYS[2], ARGV[1])}
