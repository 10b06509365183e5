-- Beat's sweep of continuous tasks whose lease lapsed:
--   dispatched  not started within the dispatch lease: if its worker is live, the lease is
--               renewed and the task returned, for beat to publish again (same generation)
--               once the worker's queue is empty: then the message was lost, or a worker
--               about to start it skips the copy; if its worker is gone, it waits again.
--   running     its worker or pool process died: the task waits again (restarts + 1) and is
--               dispatched with a new generation; if the old run still lives (a stalled
--               worker), its next renewal finds the generation gone and it stops.
--   stopping    it died while being stopped: the stop is complete and the record goes.
--
-- KEYS[1]   ct
-- KEYS[2]   ct:pending
-- KEYS[3]   ct:leases
-- ARGV[1]   dispatch lease, ms
-- ARGV[2]   the app's live workers, space-separated
-- ARGV[3..] abilities, as read by ZRANGEBYSCORE
-- Returns a flat list: ability, generation, 'publish' | 'requeue' | 'restart' | 'gone',
-- worker ('' unless publish) for each.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = {}
for name in string.gmatch(ARGV[2], '%S+') do live[name] = true end
local out = {}
for i = 3, #ARGV do
  local ability = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[3], ability)
  if score and tonumber(score) <= now then
    local raw = redis.call('HGET', KEYS[1], ability)
    local ok, rec = pcall(cjson.decode, raw or 'null')
    if not ok or type(rec) ~= 'table' then rec = nil end
    local what = nil
    if rec and rec['s'] == 'dispatched' and live[rec['w'] or ''] then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ability)
      what = 'publish'
    elseif rec and rec['s'] == 'dispatched' then
      redis.call('ZREM', KEYS[3], ability)
      rec['s'], rec['g'], rec['w'] = 'pending', nil, nil
      redis.call('HSET', KEYS[1], ability, cjson.encode(rec))
      redis.call('ZADD', KEYS[2], now, ability)
      what = 'requeue'
    elseif rec and rec['s'] == 'running' then
      redis.call('ZREM', KEYS[3], ability)
      for _, field in ipairs({'w', 'pid', 'sa'}) do rec[field] = nil end
      rec['s'], rec['r'], rec['ho'] = 'pending', rec['r'] + 1, 0
      redis.call('HSET', KEYS[1], ability, cjson.encode(rec))
      redis.call('ZADD', KEYS[2], now, ability)
      what = 'restart'
    elseif rec and rec['s'] == 'stopping' then
      redis.call('ZREM', KEYS[3], ability)
      redis.call('HDEL', KEYS[1], ability)
      what = 'gone'
    else
      redis.call('ZREM', KEYS[3], ability)
    end
    if what then
      out[#out + 1] = ability
      out[#out + 1] = rec['g'] or 0
      out[#out + 1] = what
      out[#out + 1] = what == 'publish' and rec['w'] or ''
    end
  end
end
return out
