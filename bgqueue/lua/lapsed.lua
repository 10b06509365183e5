-- Renew the lease of dispatched requests whose lease lapsed (the claim was never
-- published, the message waits behind a backlog, or it was lost) and return them;
-- beat publishes again those whose queue has drained. The generation stays the
-- same, so if the first message does arrive, only one of the two starts.
--
-- KEYS[1]   leases
-- KEYS[2..] req:<scope> of each candidate, in ARGV order
-- KEYS[last] deadletter (bgqueue/deadletter.py)
-- ARGV[1]   new lease, ms
-- ARGV[2..] candidate members, as read by ZRANGEBYSCORE
-- Returns a flat list: member, generation, record JSON for each renewed request.
-- A member naming no request, a record that is not a request's JSON or a req:<scope> that
-- is not a hash goes to the dead letter (and the lease with it) instead of failing.

-- include: deadletter

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dl = KEYS[#KEYS]
local out = {}

-- The record of a lapsed member, or nil (anything foreign met is dead-lettered).
local function record(m, key)
  local sep = string.find(m, '\31', 1, true)
  if not sep then
    dead_letter(dl, KEYS[1], 'lease member names no request (no scope separator)', m)
    return nil
  end
  local id = string.sub(m, sep + 1)
  local raw = redis.pcall('HGET', key, id)
  if type(raw) == 'table' and raw['err'] then
    dead_letter_key(dl, key, 'hash', 'request hash unreadable')
    return nil
  end
  if not raw or string.sub(id, 1, 1) == '#' then return nil end  -- started or cancelled
  local rec, why = request_record(raw)
  if not rec then
    redis.call('HDEL', key, id)
    dead_letter(dl, key .. ' ' .. id, why, raw)
  end
  return rec
end

for i = 2, #ARGV do
  local m, key = ARGV[i], KEYS[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) <= now then
    local rec = record(m, key)
    if rec and rec['s'] == 'dispatched' and type(rec['g']) == 'number' then
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), m)
      out[#out + 1] = m
      out[#out + 1] = rec['g']
      out[#out + 1] = cjson.encode(rec)
    else
      redis.call('ZREM', KEYS[1], m)
    end
  end
end
return out
