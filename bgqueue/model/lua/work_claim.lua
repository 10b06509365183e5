-- Beat claims due waiting works for the workers it matched them with: each claim gets a
-- new generation and a dispatch lease; a claim whose message never starts is found by
-- the sweep when the lease lapses (work_recover.lua).
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      dispatch lease, ms
-- ARGV[2..]    pairs: work id, worker name
-- Returns a flat list: work id, generation for each claimed work.

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local out = {}
for i = 2, #ARGV, 2 do
  local id, worker = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', KEYS[2], id)
  local raw = redis.call('HGET', KEYS[1], id)
  if score and tonumber(score) <= now and raw then
    local rec = cjson.decode(raw)
    if rec['s'] == 'waiting' then
      rec['s'], rec['g'], rec['w'] = 'dispatched', redis.call('INCR', KEYS[7]), worker
      redis.call('HSET', KEYS[1], id, cjson.encode(rec))
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), id)
      out[#out + 1] = id
      out[#out + 1] = rec['g']
    end
  end
end
return out
