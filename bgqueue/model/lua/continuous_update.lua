-- Change the modes of a continuous task (update_background_running). Its run's
-- watchdog hands the new modes to the handler at its next renewal.
--
-- KEYS[1]  ct
-- ARGV[1]  ability
-- ARGV[2]  modes, a JSON array of BackgroundMode values
-- Returns the updated record JSON, or false if the ability has no continuous task
-- (or only one being stopped).

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local rec = cjson.decode(raw)
if rec['s'] == 'stopping' then return false end
rec['m'] = cjson.decode(ARGV[2])
raw = cjson.encode(rec)
redis.call('HSET', KEYS[1], ARGV[1], raw)
return raw
