-- Release an app's process-level efficiency grants once it has no live worker: the
-- processes they belonged to are gone. Checked here, not by the caller, so a worker that
-- arrived (and a grant applied through it) since the caller looked is not released.
--
-- KEYS[1]     alive (sorted set worker name → ms its heartbeat lapses)
-- KEYS[2..n]  the app's process-level grants, one per resource type
-- Returns the number of grants released.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf') > 0 then
  return 0
end
local released = 0
for i = 2, #KEYS do
  released = released + redis.call('DEL', KEYS[i])
end
return released
