-- Shared dead-letter writers (spliced in by bgqueue/scripts.py where a script says
-- `-- include: deadletter`). See bgqueue/deadletter.py.
--
-- dead_letter(dl, source, why, raw): push one entry, newest first, onto the app's
-- dead-letter list `dl`, and cap the list in the same step; the list goes a week after
-- its newest entry. An entry is JSON: t (ms,
-- server clock), src (where it was met: a key or a queue), why (the reason), raw (the
-- data met, its first DEAD_LETTER_RAW bytes).
-- dead_letter_key(dl, key, wanted, why): if `key` holds another type than `wanted`, keep a
-- sample of it in an entry and delete it, so the scripts touching it work again; returns
-- true if it did.
-- request_record(raw): a request record (lua/submit.lua's layout) decoded, or nil and
-- why it is not one.
-- wrong_type(wanted): for a table key -> type, the first key holding another type (and
-- that type), or nil: a script checks what it will write before its first write, since
-- one that fails half-way keeps what it wrote.
-- read(kind, command, key, ...): a read that also proves `key` holds a `kind` (or nothing),
-- for the price of the read: on an error (another type) it notes the key in `foreign` and
-- returns nil, which callers take as "missing"; probe(kind, key) is the cheapest such read,
-- for a key a script writes without reading. move_foreign(dl, why) then moves every
-- noted key aside before the script's first write, so no write can meet another type. A
-- script that reads every key it writes this way needs no TYPE call when all is well.

local DEAD_LETTER_CAP, DEAD_LETTER_RAW = 1000, 4096
local DEAD_LETTER_TTL = 7 * 86400000  -- ms after its newest entry the list goes

local function dead_letter(dl, source, why, raw)
  local clock = redis.call('TIME')
  local ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('LPUSH', dl, cjson.encode({
    t = ms, src = source, why = why, raw = string.sub(tostring(raw), 1, DEAD_LETTER_RAW)}))
  redis.call('LTRIM', dl, 0, DEAD_LETTER_CAP - 1)
  redis.call('PEXPIRE', dl, DEAD_LETTER_TTL)
end

local function dead_letter_key(dl, key, wanted, why)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' or kind == wanted then return false end
  local sample
  if kind == 'string' then
    sample = redis.call('GETRANGE', key, 0, DEAD_LETTER_RAW - 1)
  elseif kind == 'list' then
    sample = cjson.encode(redis.call('LRANGE', key, 0, 99))
  elseif kind == 'hash' then
    sample = cjson.encode(redis.call('HRANDFIELD', key, 100, 'WITHVALUES'))
  elseif kind == 'set' then
    sample = cjson.encode(redis.call('SRANDMEMBER', key, 100))
  elseif kind == 'zset' then
    sample = cjson.encode(redis.call('ZRANGE', key, 0, 99, 'WITHSCORES'))
  else
    sample = kind
  end
  redis.call('DEL', key)
  dead_letter(dl, key, why .. ': a ' .. kind .. ' where a ' .. wanted .. ' belongs; removed',
    sample)
  return true
end

local REQUEST_KINDS = {
  refresh = true, processing = true, health_research = true, continued_processing = true}
local REQUEST_STATES = {pending = true, parked = true, dispatched = true}

local function whole(value)
  return type(value) == 'number' and value % 1 == 0 and value >= 0
end

-- `payload`: also check that the payload is JSON text (only where a run is about to get it:
-- decoding every payload on every move would cost a 64 KB parse each).
local function request_record(raw, payload)
  local ok, rec = pcall(cjson.decode, raw)
  if not ok then return nil, 'request record is not JSON' end
  if type(rec) ~= 'table' then return nil, 'request record is not a JSON object' end
  -- A pending record leaves out fields at their defaults (requests.py: BGTaskRequest.record).
  rec['a'], rec['pl'] = rec['a'] or 0, rec['pl'] or 'null'
  local r = rec['r']
  if not REQUEST_KINDS[rec['k']] or not REQUEST_STATES[rec['s']]
      or not whole(r) or r > 15 or not whole(rec['e']) or type(rec['pl']) ~= 'string'
      or not whole(rec['a']) or (rec['s'] == 'dispatched' and not whole(rec['g'])) then
    return nil, 'request record has the wrong shape (k, s, r, e, pl, a, g)'
  end
  if payload and not pcall(cjson.decode, rec['pl']) then
    return nil, 'request payload (pl) is not JSON'
  end
  return rec
end

local function wrong_type(wanted)
  for k, kind in pairs(wanted) do
    local found = redis.call('TYPE', k)['ok']
    if found ~= 'none' and found ~= kind then return k, found end
  end
  return nil
end

local foreign = {}

local function read(kind, command, key, ...)
  local reply = redis.pcall(command, key, ...)
  if type(reply) == 'table' and reply['err'] then
    foreign[key] = kind
    return nil
  end
  return reply
end

-- A read that only proves a key's type (O(1)), for a key written but not otherwise read.
local PROBES = {hash = 'HLEN', zset = 'ZCARD', list = 'LLEN', set = 'SCARD', string = 'STRLEN'}

local function probe(kind, key)
  return read(kind, PROBES[kind], key)
end

local function move_foreign(dl, why)
  for key, kind in pairs(foreign) do dead_letter_key(dl, key, kind, why) end
  foreign = {}
end
