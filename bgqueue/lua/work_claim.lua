-- Beat claims due waiting works for the workers it matched them with: each claim gets a
-- new generation and a dispatch lease; a claim whose message never starts is found by
-- the sweep when the lease lapses (work_recover.lua).
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      dispatch lease, ms
-- ARGV[2..]    pairs: work id, worker name
-- Returns a flat list: work id, generation for each claimed work.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Works that are not persisted live as long as the Redis process that accepted them:
-- the first work script after a restart (a new run_id) forgets them and their last runs.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[5]) ~= run_id then
  for _, hash in ipairs({KEYS[1], KEYS[4]}) do
    local all = redis.call('HGETALL', hash)
    for i = 1, #all, 2 do
      if not cjson.decode(all[i + 1])['p'] then
        redis.call('HDEL', hash, all[i])
        if hash == KEYS[1] then
          redis.call('ZREM', KEYS[2], all[i])
          redis.call('ZREM', KEYS[3], all[i])
        end
      end
    end
  end
  redis.call('SET', KEYS[5], run_id)
end

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
