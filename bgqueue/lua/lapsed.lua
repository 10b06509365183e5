-- Renew the lease of dispatched requests whose lease lapsed (the claim was never
-- published, the message waits behind a backlog, or it was lost) and return them;
-- beat publishes again those whose queue has drained. The generation stays the
-- same, so if the first message does arrive, only one of the two starts.
--
-- KEYS[1]   leases
-- KEYS[2..] req:<scope> of each candidate, in ARGV order
-- ARGV[1]   new lease, ms
-- ARGV[2..] candidate members, as read by ZRANGEBYSCORE
-- Returns a flat list: member, generation, record JSON for each renewed request.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #ARGV do
  local m, key = ARGV[i], KEYS[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) <= now then
    local id = string.sub(m, string.find(m, '\31', 1, true) + 1)
    local raw = redis.call('HGET', key, id)
    local rec = raw and cjson.decode(raw)
    if rec and rec['s'] == 'dispatched' then
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), m)
      out[#out + 1] = m
      out[#out + 1] = rec['g']
      out[#out + 1] = raw
    else
      redis.call('ZREM', KEYS[1], m)
    end
  end
end
return out
