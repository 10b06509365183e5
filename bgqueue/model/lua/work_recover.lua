-- Beat's sweep recovers works whose lease lapsed. A dispatched work (its message lost,
-- or its worker gone before starting it) waits again, due now. A running work lost its
-- worker: it waits again, due now, unless max_attempts runs in a row were lost; then the
-- run counts as ended (next cycle, or removal) so one poisonous work cannot loop forever.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      maximum lost runs in a row
-- ARGV[2..]    work ids whose lease lapsed, as read by ZRANGEBYSCORE
-- Returns a flat list: work id, outcome ('redispatch', 'rerun' or 'given up').

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[3], id)
  if score and tonumber(score) <= now then
    redis.call('ZREM', KEYS[3], id)
    local raw = redis.call('HGET', KEYS[1], id)
    local rec = raw and cjson.decode(raw)
    if rec and (rec['s'] == 'dispatched' or rec['s'] == 'running') then
      local outcome, due = 'redispatch', now
      if rec['s'] == 'running' then
        redis.call('SREM', KEYS[6], id .. ':' .. rec['g'])
        rec['a'] = rec['a'] + 1
        redis.call('HSET', KEYS[4], id, cjson.encode({
          to = false, sa = rec['sa'], fa = now, w = rec['w'], n = rec['n'], p = rec['p'],
          why = 'worker lost (run lease lapsed)'}))
        outcome = 'rerun'
        if rec['a'] >= tonumber(ARGV[1]) then
          outcome, rec['n'], rec['a'] = 'given up', rec['n'] + 1, 0
          due = math.max(rec['sa'] + rec['cy'], now)
        end
      end
      rec['s'], rec['g'], rec['w'], rec['sa'] = 'waiting', nil, nil, nil
      if rec['cnt'] > 0 and rec['n'] >= rec['cnt'] then
        redis.call('HDEL', KEYS[1], id)
      else
        redis.call('HSET', KEYS[1], id, cjson.encode(rec))
        redis.call('ZADD', KEYS[2], due, id)
      end
      out[#out + 1] = id
      out[#out + 1] = outcome
    end
  end
end
return out
