-- Start a continuous task (start_background_running). One per (app, ability): a second
-- start while the ability has one, in any state, is refused and changes nothing. The
-- task waits in ct:pending until beat sees a live continuous worker.
--
-- KEYS[1]  ct          HASH ability → JSON record of the continuous task
-- KEYS[2]  ct:pending  ZSET ability → ms it began waiting for a continuous worker
-- KEYS[3]  seq         generation counter; also numbers continuous tasks
-- ARGV[1]  ability
-- ARGV[2]  modes, a JSON array of BackgroundMode values
-- ARGV[3]  payload as JSON text (kept a string: cjson would round its numbers)
-- Returns the new record JSON, or false if the ability already has a continuous task.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ability = ARGV[1]
if redis.call('HEXISTS', KEYS[1], ability) == 1 then return false end
local rec = {
  ab = ability, id = redis.call('INCR', KEYS[3]), m = cjson.decode(ARGV[2]), pl = ARGV[3],
  s = 'pending', g = 0, r = 0, ca = now, why = 0, ho = 0}
local raw = cjson.encode(rec)
redis.call('HSET', KEYS[1], ability, raw)
redis.call('ZADD', KEYS[2], now, ability)
return raw
