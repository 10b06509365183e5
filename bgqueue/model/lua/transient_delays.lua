-- Transient delays (HarmonyOS requestSuspendDelay) of one scope: grant, cancel and settle
-- them against the scope's rolling 24-hour quota, and read what is left. One script for
-- every operation (as dramatiq's dispatch.lua), so the charging rule is written once, and
-- Redis's clock is the only one that charges (the worker times its own deadline, from
-- before it asked, so that its deadline never outlasts what Redis reserved).
--
-- A run's delays keep it alive until the latest of their ends. Each run with delays holds
-- the span from its base deadline b (start + budget, or last progress + stall window) to
-- that latest end. The quota pays for the union of the spans of every run of the scope:
-- time that several runs hold at once is charged once, as HarmonyOS counts the time an
-- app's transient tasks hold together. The scope keeps a mark (the field '#t' of its runs
-- hash): the union is charged to the ledger up to the mark, and every operation first
-- charges from the mark to now and moves the mark to now. What the runs hold after now is
-- reserved: the quota left is the quota less the ledger's last 24 hours less the union of
-- what is reserved. A grant reserves at most how far it moves its run's deadline past every
-- hold already reserved (never more than the quota left); cancelling a delay, or the run's
-- end, charges up to now and drops the rest of its reservation.
-- A run missing from `running` has ended without settling (its worker died): it is charged
-- up to now and released by the next operation on its scope.
--
-- KEYS[1]  transient:delays:<scope>  HASH request id -> JSON {g: run generation (string),
--                                    s: granted ms, e: ends ms, r: reason}; live and run-out
--                                    delays, until cancelled or their run settles
-- KEYS[2]  transient:runs:<scope>    HASH generation -> JSON {b: base deadline ms}, for runs
--                                    holding delays; '#t' -> ms the scope is charged up to
-- KEYS[3]  transient:ledger:<scope>  ZSET "<ms>:<charged ms>" scored by the ms it was
--                                    charged; entries older than 24 h are dropped
-- KEYS[4]  running                   HASH generation -> running record
-- KEYS[5]  transient:seq             STRING request id counter (per app)
-- KEYS[6]  transient:scopes          ZSET scope -> ms of its latest grant: the index of scopes
--                                    with delays or charges (`bgqueue status` reads it);
--                                    a grant adds its scope and drops entries over 2 days old;
--                                    the index goes 2 days after the last grant
-- The scope's three keys expire a day after their last write: a scope that stops using
-- delays leaves nothing behind.
-- ARGV[1]  operation, then its arguments:
--   grant   generation, ms to the run's base deadline (negative if past), max concurrent,
--           max delay ms, daily quota ms, reason, scope name
--           -> {'ok', request id, actual delay ms} | {'gone'} (run not running)
--             | {'limit', live delays} | {'quota', 0}; a refusal writes nothing
--   cancel  generation, ms to the run's base deadline, request id
--           -> 1, or 0 if the run holds no such delay
--   settle  generation -> ms charged to the scope by this call (its delays are released)
--   info    daily quota ms -> {quota left ms, request id, ms left, ...} for live delays
-- Times are Redis's clock in ms.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DAY = 86400000
local DELAYS, RUNS, LEDGER, RUNNING = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local MARK = '#t'

-- The scope's runs holding delays, by generation: the run record, its delays (id -> end),
-- the latest end, how many have not ended, and whether the run has ended unsettled.
local function load()
  local all = {}
  local flat = redis.call('HGETALL', RUNS)
  for i = 1, #flat, 2 do
    if flat[i] ~= MARK then
      all[flat[i]] = {rec = cjson.decode(flat[i + 1]), delays = {}, last = 0, live = 0,
                      lost = redis.call('HEXISTS', RUNNING, flat[i]) == 0}
    end
  end
  flat = redis.call('HGETALL', DELAYS)
  for i = 1, #flat, 2 do
    local d = cjson.decode(flat[i + 1])
    local run = all[d['g']]
    if run then
      run.delays[flat[i]] = d['e']
      run.last = math.max(run.last, d['e'])
      if d['e'] > now then run.live = run.live + 1 end
    end
  end
  return all
end

-- The measure of the union of the runs' holds inside [from, to] (lost runs hold nothing
-- after now).
local function union(all, from, to)
  local spans = {}
  for _, run in pairs(all) do
    local last = run.lost and math.min(run.last, now) or run.last
    local a, b = math.max(from, run.rec['b']), math.min(to, last)
    if b > a then spans[#spans + 1] = {a, b} end
  end
  table.sort(spans, function(x, y) return x[1] < y[1] end)
  local total, reach = 0, from
  for _, span in ipairs(spans) do
    local a, b = math.max(span[1], reach), span[2]
    if b > a then total, reach = total + b - a, b end
  end
  return total
end

local function touch(key)
  if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, DAY) end
end

-- Charge the union of the holds from the scope's mark to now, and move the mark to now.
local function charge(all)
  local mark = tonumber(redis.call('HGET', RUNS, MARK)) or now
  local amount = union(all, mark, now)
  if amount > 0 then
    redis.call('ZADD', LEDGER, now, string.format('%d:%d', now, amount))
    touch(LEDGER)
  end
  return amount
end

-- Forget a run's delays and its record; the mark goes with the last run of the scope.
local function release(gen, run, all)
  for id in pairs(run.delays) do redis.call('HDEL', DELAYS, id) end
  redis.call('HDEL', RUNS, gen)
  all[gen] = nil
end

-- Every operation starts here: charge up to now, release the runs that ended unsettled,
-- forget charges older than 24 hours. Returns what it charged.
local function housekeep(all)
  local charged = charge(all)
  for gen, run in pairs(all) do
    if run.lost then release(gen, run, all) end
  end
  if next(all) then
    redis.call('HSET', RUNS, MARK, now)
  else
    redis.call('HDEL', RUNS, MARK)
  end
  redis.call('ZREMRANGEBYSCORE', LEDGER, '-inf', now - DAY)
  return charged
end

-- Quota left for new grants: the quota less the ledger's last 24 hours less the union of
-- what the live runs hold from now on.
local function left(all, quota)
  local spent = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', LEDGER, '(' .. (now - DAY), '+inf')) do
    spent = spent + tonumber(string.match(m, ':(%d+)$'))
  end
  return math.max(0, quota - spent - union(all, now, math.huge))
end

local op = ARGV[1]

if op == 'grant' then
  local gen, to_base = ARGV[2], tonumber(ARGV[3])
  local max_live, max_delay, quota = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  if redis.call('HEXISTS', RUNNING, gen) == 0 then return {'gone'} end
  local all = load()
  local live = 0
  for _, run in pairs(all) do
    if not run.lost then live = live + run.live end
  end
  if live >= max_live then return {'limit', live} end
  local available = left(all, quota)
  if available <= 0 then return {'quota', 0} end
  -- Time up to the run's current deadline costs nothing: only the extension is reserved.
  local base = now + to_base
  local run = all[gen] or {rec = {b = base}, delays = {}, last = 0}
  local deadline = math.max(base, run.last, now)
  local actual = math.min(max_delay, deadline - now + available)

  housekeep(all)
  run.rec['b'] = base
  redis.call('HSET', RUNS, gen, cjson.encode(run.rec))
  redis.call('HSETNX', RUNS, MARK, now)
  local id = redis.call('INCR', KEYS[5])
  redis.call('HSET', DELAYS, id, cjson.encode({g = gen, s = now, e = now + actual, r = ARGV[7]}))
  touch(RUNS)
  touch(DELAYS)
  -- A scope's charges fall out of the ledger a day after its last grant at the latest
  -- (a delay lasts at most the max delay): two days keeps every scope that has any.
  redis.call('ZADD', KEYS[6], now, ARGV[8])
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - 2 * DAY)
  redis.call('PEXPIRE', KEYS[6], 2 * DAY)
  return {'ok', id, actual}
end

if op == 'cancel' then
  local gen, to_base, id = ARGV[2], tonumber(ARGV[3]), ARGV[4]
  local raw = redis.call('HGET', DELAYS, id)
  if not raw or cjson.decode(raw)['g'] ~= gen then return 0 end
  local all = load()
  local run = all[gen]
  housekeep(all)  -- charged up to now with the delay still counted
  if not run or not all[gen] then  -- its run record is gone: nothing left to charge
    redis.call('HDEL', DELAYS, id)
    return 1
  end
  -- From now on it holds nothing; the run's deadline falls back to its base.
  run.rec['b'] = now + to_base
  run.delays[id] = nil
  redis.call('HDEL', DELAYS, id)
  if next(run.delays) == nil then
    release(gen, run, all)
    if not next(all) then redis.call('HDEL', RUNS, MARK) end
  else
    redis.call('HSET', RUNS, gen, cjson.encode(run.rec))
  end
  return 1
end

if op == 'settle' then
  local gen = ARGV[2]
  local all = load()
  local charged = housekeep(all)
  if all[gen] then
    release(gen, all[gen], all)
    if not next(all) then redis.call('HDEL', RUNS, MARK) end
  end
  return charged
end

if op == 'info' then
  local all = load()
  housekeep(all)
  local out = {left(all, tonumber(ARGV[2]))}
  for _, run in pairs(all) do
    for id, ends in pairs(run.delays) do
      if ends > now then
        out[#out + 1] = id
        out[#out + 1] = ends - now
      end
    end
  end
  return out
end

return redis.error_reply('transient_delays.lua: unknown operation ' .. tostring(op))
