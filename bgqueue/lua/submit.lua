-- Submit a batch of requests of one scope, replacing any not-yet-started request with the
-- same identifier. All or nothing: limits are checked for the whole batch before the
-- first write.
--
-- KEYS[1..16]  due:<profile> sorted sets, profiles 0..15 in order
-- KEYS[17]     leases (a replaced dispatched request leaves it)
-- KEYS[18]     counts: "<kind>:<profile>" pending, "<kind>:dispatched" (keys.py)
-- KEYS[19]     req:<scope>, the scope's hash
-- KEYS[20]     deadletter (bgqueue/deadletter.py)
-- ARGV[1]      max pending refresh requests per scope
-- ARGV[2]      max pending processing requests per scope
-- ARGV[3]      member prefix "<scope>\31" (a request's member is prefix .. identifier)
-- ARGV[4], [5] beat's wake channel and the message to publish there once accepted
--              (from here, it costs the producer no second command)
-- ARGV[6..]    five values per request: identifier, record JSON (requests.py, ending
--              in '}'), profile, earliest-begin ms (the due score), kind
-- Returns {'ok', replaced}, {'limit', index (0-based), class}, or {'foreign', key, type}
-- when a key it would write holds another type (nothing is written then: a script that
-- fails half-way keeps its first writes). A stored record that is not a request's is
-- moved to the dead letter and replaced.
-- A record whose earliest-begin date has passed gains t, when it became pending (ms):
-- beat's dispatch lateness counts from max(e, t). The record is stored as given
-- otherwise (no decoding: a million may come in one batch).
-- A scope's counts are kept only while non-zero (an idle scope costs nothing).

-- include: deadletter

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, prefix = KEYS[19], ARGV[3]
local limit = {refresh = tonumber(ARGV[1]), processing = tonumber(ARGV[2])}
local n = (#ARGV - 5) / 5

local function class_of(kind)
  if kind == 'refresh' then return 'refresh' end
  return 'processing'
end

-- Calls with many arguments go in chunks: Lua's unpack has a stack limit.
local CHUNK = 1000
local function in_chunks(command, target, args, width)
  local out = {}
  for first = 1, #args, CHUNK * width do
    local last = math.min(first + CHUNK * width - 1, #args)
    local reply = redis.call(command, target, unpack(args, first, last))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do out[#out + 1] = value end
    end
  end
  return out
end

-- Read the scope's counts and what is stored under each identifier (false: nothing), in
-- as few calls as the batch allows: each redis.call costs microseconds.
local stored, ids = {}, {'#refresh', '#processing'}
for i = 0, n - 1 do
  local id = ARGV[6 + i * 5]
  if stored[id] == nil then
    stored[id] = true
    ids[#ids + 1] = id
  end
end
local found = in_chunks('HMGET', key, ids, 1)
for i = 3, #ids do stored[ids[i]] = found[i] end

-- Pass 1: simulate the batch on the scope's counts only.
local counts = {refresh = tonumber(found[1]) or 0, processing = tonumber(found[2]) or 0}
local current, foreign = {}, {}
for id, raw in pairs(stored) do
  local rec, why = false, nil
  if raw then rec, why = request_record(raw) end
  if raw and not rec then foreign[#foreign + 1] = {id, why, raw} end
  stored[id] = rec or false
  current[id] = rec and class_of(rec['k'])
end
for i = 0, n - 1 do
  local a = 6 + i * 5
  local id, class = ARGV[a], class_of(ARGV[a + 4])
  local old = current[id]
  if old then counts[old] = counts[old] - 1 end
  counts[class] = counts[class] + 1
  current[id] = class
  if counts[class] > limit[class] and old ~= class then
    return {'limit', i, class}
  end
end

-- Every key pass 2 writes must be of its type (or absent).
local wanted = {[KEYS[18]] = 'hash'}
for i = 0, n - 1 do wanted[KEYS[tonumber(ARGV[6 + i * 5 + 2]) + 1]] = 'zset' end
for _, old in pairs(stored) do
  if old then
    wanted[KEYS[old['r'] + 1]] = 'zset'
    wanted[KEYS[17]] = 'zset'
  end
end
local wrong, found_type = wrong_type(wanted)
if wrong then return {'foreign', wrong, found_type} end
for _, entry in ipairs(foreign) do
  dead_letter(KEYS[20], key .. ' ' .. entry[1], entry[2] .. '; replaced by a submit', entry[3])
end

-- Pass 2: write. A record met in Redis is replaced (once: a later duplicate in the batch
-- replaces its own batch-mate, which this pass has just accounted for).
local replaced, tally, records, due = 0, {}, {}, {}
local function count(field, by) tally[field] = (tally[field] or 0) + by end
for i = 0, n - 1 do
  local a = 6 + i * 5
  local id, m = ARGV[a], prefix .. ARGV[a]
  local profile, begin, kind = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  local old = stored[id]
  if old and not old.at then  -- a record read from Redis
    redis.call('ZREM', KEYS[old['r'] + 1], m)
    redis.call('ZREM', KEYS[17], m)
    count(old['k'] .. ':' .. (old['s'] == 'pending' and old['r'] or 'dispatched'), -1)
    replaced = replaced + 1
  elseif old then  -- a batch-mate: it was never written, only counted
    due[old.r][old.at] = false
    count(old.k .. ':' .. old.r, -1)
  end
  local rec = ARGV[a + 1]
  if begin < now then rec = string.sub(rec, 1, -2) .. ',"t":' .. now .. '}' end
  records[#records + 1] = id
  records[#records + 1] = rec
  due[profile] = due[profile] or {}
  local list = due[profile]
  list[#list + 1] = {ARGV[a + 3], m}  -- the score as given: a Lua number prints as %.14g
  stored[id] = {k = kind, r = profile, at = #list}
  count(kind .. ':' .. profile, 1)
end
for class, c in pairs(counts) do
  if c > 0 then
    records[#records + 1] = '#' .. class
    records[#records + 1] = c
  elseif found[class == 'refresh' and 1 or 2] then
    redis.call('HDEL', key, '#' .. class)
  end
end
-- HSET keeps the last value of a field given twice: the batch's last word stands.
in_chunks('HSET', key, records, 2)
for profile, entries in pairs(due) do
  local args = {}
  for _, entry in ipairs(entries) do
    if entry then
      args[#args + 1] = entry[1]
      args[#args + 1] = entry[2]
    end
  end
  in_chunks('ZADD', KEYS[profile + 1], args, 2)
end
for field, by in pairs(tally) do
  if by ~= 0 then redis.call('HINCRBY', KEYS[18], field, by) end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', replaced}
