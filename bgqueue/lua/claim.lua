-- Claim due pending requests of one requirement profile for dispatch. Each claim
-- gets a new generation (request id) and a short lease: if the publisher dies
-- before publishing, the lease lapses and a sweep publishes again.
--
-- KEYS[1]   due:<profile>
-- KEYS[2]   leases
-- KEYS[3]   seq (generation counter)
-- KEYS[4]   counts: "<kind>:<profile>" pending, "<kind>:dispatched" (keys.py)
-- KEYS[5..] req:<scope> of each candidate, in ARGV order
-- ARGV[1]   claim lease, ms
-- ARGV[2..] candidate members "<scope>\31<identifier>", as read by ZRANGEBYSCORE
-- Returns a flat list: member, generation, record JSON for each claimed request.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #ARGV do
  local m, key = ARGV[i], KEYS[i + 3]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) <= now then
    local id = string.sub(m, string.find(m, '\31', 1, true) + 1)
    local raw = redis.call('HGET', key, id)
    redis.call('ZREM', KEYS[1], m)
    if raw then
      local rec = cjson.decode(raw)
      if rec['s'] == 'pending' then
        rec['s'] = 'dispatched'
        rec['g'] = redis.call('INCR', KEYS[3])
        redis.call('HINCRBY', KEYS[4], rec['k'] .. ':' .. rec['r'], -1)
        redis.call('HINCRBY', KEYS[4], rec['k'] .. ':dispatched', 1)
        raw = cjson.encode(rec)
        redis.call('HSET', key, id, raw)
        redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), m)
        out[#out + 1] = m
        out[#out + 1] = rec['g']
        out[#out + 1] = raw
      end
    end
  end
end
return out
