-- Renew the lease of dispatched requests whose lease lapsed (the claim was never published,
-- the message waits behind a backlog, or it was lost) and return them: beat publishes again
-- those whose class queue has drained, and hands back to pending (release.lua) those whose
-- class has no live worker left. The generation stays the same, so if the first message
-- does arrive, only one of the two starts.
--
-- KEYS[1]    leases
-- KEYS[2]    deadletter
-- KEYS[3..]  req:<scope> of each candidate, in ARGV order
-- ARGV[1]    new lease, ms
-- ARGV[2..]  candidate members "<scope>\31<identifier>", as read by ZRANGEBYSCORE
-- Returns a flat list, five values per renewed request: member, generation, class,
-- profile, earliest-begin ms. A lease naming no dispatched request is dropped; foreign
-- data met is dead-lettered first.

-- include: deadletter
-- include: requests

local LEASES, DL = KEYS[1], KEYS[2]
local wanted = {[LEASES] = 'zset'}
for i = 2, #ARGV do wanted[KEYS[i + 1]] = 'hash' end
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'lapsed met a key') end

local out = {}
for i = 2, #ARGV do
  local m, req = ARGV[i], KEYS[i + 1]
  local score = redis.call('ZSCORE', LEASES, m)
  if score and tonumber(score) <= now then
    local id = string.match(m, '^[^\31]+\31(.+)$')
    local raw = id and redis.call('HGET', req, id)
    local rec, why = nil, 'lease names no request'
    if raw then rec, why = request_record(raw) end
    if rec and rec['s'] == 'dispatched' then
      redis.call('ZADD', LEASES, now + tonumber(ARGV[1]), m)
      local date = rec['x'] and 0 or rec['e']  -- x: a simulated launch waived the date
      for _, value in ipairs({m, rec['g'], rec['q'] or '', rec['r'], date}) do
        out[#out + 1] = value
      end
    else
      redis.call('ZREM', LEASES, m)  -- started, cancelled or replaced meanwhile
      if raw and not rec then
        redis.call('HDEL', req, id)
        recount(req)
        dead_letter(DL, req .. ' ' .. id, why, raw)
      elseif not id then
        dead_letter(DL, LEASES, 'lease member names no request (no scope separator)', m)
      end
    end
  end
end
return out
