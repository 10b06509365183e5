-- Make a pending request due now, ignoring its earliest-begin date (Apple's
-- _simulateLaunchForTaskWithIdentifier): its record keeps its date but waives it (x), so
-- that no later check (the ETA, start.lua's not-before) holds it back. Requirements and
-- handlers still apply.
--
-- KEYS[1]  req:<scope>
-- KEYS[2]  sched:<profile>:<scope> of the request
-- KEYS[3]  due:<profile> of the request
-- ARGV[1]  scope
-- ARGV[2]  identifier
-- ARGV[3]  profile (as read from the record by the caller; checked again here)
-- Returns 1 if the request is due now (or already dispatched), 0 if there is no such
-- pending request; an error, before any write, if a key holds another type.

for i, kind in ipairs({'hash', 'zset', 'zset'}) do
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= 'none' and found ~= kind then
    return redis.error_reply('launch.lua: ' .. KEYS[i] .. ' holds a ' .. found)
  end
end
local raw = redis.call('HGET', KEYS[1], ARGV[2])
if not raw then return 0 end
local ok, rec = pcall(cjson.decode, raw)
if not ok or type(rec) ~= 'table' then return 0 end
if rec['s'] == 'dispatched' then return 1 end
if rec['s'] ~= 'pending' or tostring(rec['r']) ~= ARGV[3] then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
local t = redis.call('TIME')
rec['x'], rec['t'] = 1, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(rec))
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('ZADD', KEYS[3], 'LT', 0, ARGV[1])
return 1
