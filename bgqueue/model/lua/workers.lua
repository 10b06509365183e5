-- Read every known worker with its liveness, and forget workers and classes long dead.
--
-- KEYS[1]  workers    HASH name -> heartbeat JSON
-- KEYS[2]  alive      ZSET name -> ms its heartbeat lapses
-- KEYS[3]  classes    HASH class id -> class JSON
-- KEYS[4]  classlive  ZSET class id -> ms its last worker's heartbeat lapses
-- KEYS[5]  deadletter (a heartbeat that is not JSON is moved there and forgotten)
-- ARGV[1]  forget what lapsed this many ms ago; 0 forgets nothing
-- Returns {server ms, forgotten workers (name, heartbeat JSON, ...), forgotten class ids,
-- then name, lapse ms, heartbeat JSON for each worker still known}. Beat deletes the
-- forgotten workers' own queues and the forgotten classes' queues (their keys are not the
-- app's).

-- include: deadletter

local WORKERS, ALIVE, CLASSES, CLASSLIVE, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wanted = {[WORKERS] = 'hash', [ALIVE] = 'zset', [CLASSES] = 'hash', [CLASSLIVE] = 'zset'}
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'workers met a key') end
local gone_workers, gone_classes = {}, {}
if tonumber(ARGV[1]) > 0 then
  local before = now - tonumber(ARGV[1])
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', ALIVE, '-inf', before)) do
    gone_workers[#gone_workers + 1] = name
    gone_workers[#gone_workers + 1] = redis.call('HGET', WORKERS, name) or '{}'
    redis.call('HDEL', WORKERS, name)
    redis.call('ZREM', ALIVE, name)
  end
  for _, class in ipairs(redis.call('ZRANGEBYSCORE', CLASSLIVE, '-inf', before)) do
    redis.call('HDEL', CLASSES, class)
    redis.call('ZREM', CLASSLIVE, class)
    gone_classes[#gone_classes + 1] = class
  end
end
local out = {now, gone_workers, gone_classes}
local entries = redis.call('ZRANGE', ALIVE, 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local raw = redis.call('HGET', WORKERS, entries[i])
  local ok, beat = pcall(cjson.decode, raw or 'null')
  if raw and not (ok and type(beat) == 'table' and type(beat['conditions']) == 'table') then
    dead_letter(DL, WORKERS .. ' ' .. entries[i], 'worker heartbeat is not bgqueue JSON', raw)
    redis.call('HDEL', WORKERS, entries[i])
    redis.call('ZREM', ALIVE, entries[i])
    raw = nil
  end
  if raw then
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
    out[#out + 1] = raw
  end
end
return out
