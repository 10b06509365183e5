-- Claim due pending requests of one requirement profile for dispatch. Each claim
-- gets a new generation (request id) and a short lease: if the publisher dies
-- before publishing, the lease lapses and a sweep publishes again.
--
-- KEYS[1]   due:<profile>
-- KEYS[2]   leases
-- KEYS[3]   seq (generation counter)
-- KEYS[4]   counts: "<kind>:<profile>" pending, "<kind>:dispatched" (keys.py)
-- KEYS[5..] req:<scope> of each candidate, in ARGV order
-- KEYS[last] deadletter (bgqueue/deadletter.py)
-- ARGV[1]   claim lease, ms
-- ARGV[2..] candidate members "<scope>\31<identifier>", as read by ZRANGEBYSCORE
-- Returns a flat list: member, generation, record JSON for each claimed request.
-- What cannot be claimed because it is not bgqueue's (a member naming no request, a record
-- that is not a request's JSON, a req:<scope> that is not a hash) goes to the dead letter
-- instead of failing the batch: a Lua error would fail every later claim too.

-- include: deadletter

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dl = KEYS[#KEYS]
local out = {}

-- The pending record of a due member, or nil (anything foreign met is dead-lettered).
local function pending_record(m, key)
  local sep = string.find(m, '\31', 1, true)
  if not sep then
    dead_letter(dl, KEYS[1], 'due member names no request (no scope separator)', m)
    return nil
  end
  local id = string.sub(m, sep + 1)
  local raw = redis.pcall('HGET', key, id)
  if type(raw) == 'table' and raw['err'] then
    dead_letter_key(dl, key, 'hash', 'request hash unreadable')
    dead_letter(dl, KEYS[1], 'due member of a request hash that was not a hash', m)
    return nil
  end
  if not raw or string.sub(id, 1, 1) == '#' then
    dead_letter(dl, KEYS[1], 'due member names no request record', m)
    return nil
  end
  local rec, why = request_record(raw)
  if not rec then
    redis.call('HDEL', key, id)
    dead_letter(dl, key .. ' ' .. id, why, raw)
    return nil
  end
  if rec['s'] ~= 'pending' then
    dead_letter(dl, KEYS[1], 'due member of a request that is ' .. rec['s'] .. ', not pending', m)
    return nil
  end
  return rec, id
end

for i = 2, #ARGV do
  local m, key = ARGV[i], KEYS[i + 3]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) <= now then
    redis.call('ZREM', KEYS[1], m)
    local rec, id = pending_record(m, key)
    if rec then
      rec['s'] = 'dispatched'
      rec['g'] = redis.call('INCR', KEYS[3])
      redis.call('HINCRBY', KEYS[4], rec['k'] .. ':' .. rec['r'], -1)
      redis.call('HINCRBY', KEYS[4], rec['k'] .. ':dispatched', 1)
      local raw = cjson.encode(rec)
      redis.call('HSET', key, id, raw)
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), m)
      out[#out + 1] = m
      out[#out + 1] = rec['g']
      out[#out + 1] = raw
    end
  end
end
return out
