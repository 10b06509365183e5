-- A worker announces itself: its heartbeat (conditions, slots, class), alive until the
-- timeout; or it leaves. A name belongs to one live worker at a time: a second worker
-- started with the same name is refused until the first one's heartbeat lapses.
--
-- KEYS[1]  workers    HASH name -> heartbeat JSON (its `token` names the process)
-- KEYS[2]  alive      ZSET name -> ms its heartbeat lapses
-- KEYS[3]  classes    HASH class id -> JSON {m: profile mask, h: request identifiers,
--                     c: continuous abilities, w: work abilities}
-- KEYS[4]  classlive  ZSET class id -> ms the longest-lived heartbeat of its workers lapses
-- ARGV[1]  worker name
-- ARGV[2]  heartbeat JSON, with `token` and `class`
-- ARGV[3]  heartbeat timeout, ms; 0 means the worker is leaving
-- ARGV[4]  the worker's token (unique per process)
-- ARGV[5]  class id, ARGV[6] class JSON
-- Returns {'ok', server ms}, or {'taken', the holder's heartbeat JSON} when another live
-- worker holds the name.

local WORKERS, ALIVE, CLASSES, CLASSLIVE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local name, token, class = ARGV[1], ARGV[4], ARGV[5]

local function token_of(raw)
  local ok, beat = pcall(cjson.decode, raw or 'null')
  if ok and type(beat) == 'table' then return beat['token'], beat['class'] end
  return nil, nil
end

local holder = redis.call('HGET', WORKERS, name)
local lapses = tonumber(redis.call('ZSCORE', ALIVE, name) or 0)
if holder and lapses > now and token_of(holder) ~= token then
  return {'taken', holder}
end

if tonumber(ARGV[3]) == 0 then
  redis.call('HDEL', WORKERS, name)
  redis.call('ZREM', ALIVE, name)
  -- The class stays live only while another live worker has it.
  local latest = nil
  local members = redis.call('ZRANGEBYSCORE', ALIVE, '(' .. now, '+inf', 'WITHSCORES')
  for i = 1, #members, 2 do
    local _, other = token_of(redis.call('HGET', WORKERS, members[i]))
    if other == class then latest = math.max(latest or 0, tonumber(members[i + 1])) end
  end
  if latest then
    redis.call('ZADD', CLASSLIVE, latest, class)
  else
    redis.call('ZREM', CLASSLIVE, class)
  end
  return {'ok', now}
end

redis.call('HSET', WORKERS, name, ARGV[2])
redis.call('ZADD', ALIVE, now + tonumber(ARGV[3]), name)
redis.call('HSETNX', CLASSES, class, ARGV[6])
redis.call('ZADD', CLASSLIVE, 'GT', now + tonumber(ARGV[3]), class)
return {'ok', now}
