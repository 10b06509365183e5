-- Record the end of a run and drop it from the running set.
--
-- KEYS[1]  running
-- KEYS[2]  runleases
-- KEYS[3]  history:<scope>
-- KEYS[4]  expire
-- ARGV[1]  generation
-- ARGV[2]  end state: completed | failed | expired
-- ARGV[3]  success, 1 or 0
-- ARGV[4]  history length cap
-- ARGV[5]  reason (free text, may be empty)
-- Returns 1, or 0 if the run had already been given up as lost and requeued
-- (the request then runs twice: at-least-once).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gen = ARGV[1]
local raw = redis.call('HGET', KEYS[1], gen)
if not raw then return 0 end
local rec = cjson.decode(raw)
redis.call('HDEL', KEYS[1], gen)
redis.call('ZREM', KEYS[2], gen)
redis.call('SREM', KEYS[4], gen)
redis.call('LPUSH', KEYS[3], cjson.encode({
  i = rec['i'], sc = rec['sc'], k = rec['k'], s = ARGV[2], ok = ARGV[3] == '1',
  sa = rec['sa'], fa = now, w = rec['w'], g = rec['g'], a = rec['a'], why = ARGV[5]}))
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
return 1
