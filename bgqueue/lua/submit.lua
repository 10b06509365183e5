-- Submit a batch of requests, replacing any not-yet-started request with the same
-- identifier in the same scope. All or nothing: limits are checked for the whole
-- batch before the first write.
--
-- KEYS[1..16]  due:<profile> sorted sets, profiles 0..15 in order
-- KEYS[17]     leases (a replaced dispatched request leaves it)
-- KEYS[18]     counts: "<kind>:<profile>" pending, "<kind>:dispatched" (keys.py)
-- KEYS[19..]   req:<scope> hash of each request, in ARGV order (repeats allowed)
-- ARGV[1]      max pending refresh requests per scope
-- ARGV[2]      max pending processing requests per scope
-- ARGV[3..]    six values per request: identifier, member, record JSON,
--              profile, earliest-begin ms (the due score), class ('refresh'|'processing')
-- Returns {'ok', replaced} or {'limit', index (0-based), class}.
-- The stored record gains t, when it became pending (ms): beat's dispatch lateness
-- counts from it for a request with no earliest-begin date.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = {refresh = tonumber(ARGV[1]), processing = tonumber(ARGV[2])}
local n = (#ARGV - 2) / 6
local counts, current = {}, {}

local function class_of(kind)
  if kind == 'refresh' then return 'refresh' end
  return 'processing'
end

local function counts_of(key)
  if not counts[key] then
    local raw = redis.call('HMGET', key, '#refresh', '#processing')
    counts[key] = {refresh = tonumber(raw[1]) or 0, processing = tonumber(raw[2]) or 0}
  end
  return counts[key]
end

-- Pass 1: simulate the batch on counts only.
for i = 0, n - 1 do
  local a, key = 3 + i * 6, KEYS[19 + i]
  local id, class = ARGV[a], ARGV[a + 5]
  local slot = key .. '\0' .. id
  if current[slot] == nil then
    local raw = redis.call('HGET', key, id)
    current[slot] = raw and class_of(cjson.decode(raw)['k']) or false
  end
  local c, old = counts_of(key), current[slot]
  if old then c[old] = c[old] - 1 end
  c[class] = c[class] + 1
  current[slot] = class
  if c[class] > limit[class] and old ~= class then
    return {'limit', i, class}
  end
end

-- Pass 2: write.
local replaced = 0
for i = 0, n - 1 do
  local a, key = 3 + i * 6, KEYS[19 + i]
  local id, m = ARGV[a], ARGV[a + 1]
  local raw = redis.call('HGET', key, id)
  if raw then
    local old = cjson.decode(raw)
    redis.call('ZREM', KEYS[old['r'] + 1], m)
    redis.call('ZREM', KEYS[17], m)
    local was = old['s'] == 'pending' and old['r'] or 'dispatched'
    redis.call('HINCRBY', KEYS[18], old['k'] .. ':' .. was, -1)
    replaced = replaced + 1
  end
  local rec = cjson.decode(ARGV[a + 2])
  rec['t'] = now
  redis.call('HSET', key, id, cjson.encode(rec))
  redis.call('HINCRBY', KEYS[18], rec['k'] .. ':' .. ARGV[a + 3], 1)
  redis.call('ZADD', KEYS[tonumber(ARGV[a + 3]) + 1], ARGV[a + 4], m)
end
for key, c in pairs(counts) do
  redis.call('HSET', key, '#refresh', c.refresh, '#processing', c.processing)
end
return {'ok', replaced}
