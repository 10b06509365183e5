-- Transient delays (HarmonyOS requestSuspendDelay) of one scope: grant, cancel and settle
-- them against the scope's rolling 24-hour quota, and read what is left. One script for
-- every operation (as dramatiq's dispatch.lua), so the charging rule is written once.
--
-- A run's delays keep it alive until the latest of their ends. The quota pays only for the
-- time they hold the run past its base deadline b (start + budget, or last progress + stall
-- window), counted once however many delays overlap. Each run keeps a mark t up to which
-- that time has been charged to the ledger; from t on, the run reserves
--     held = max(0, latest end - max(t, b))
-- so a grant reserves exactly how far it moves the deadline, and two grants racing for the
-- last of the quota see each other's reservation. Cancelling a delay or ending the run
-- charges the time held up to now and refunds the rest by dropping the reservation.
-- A run missing from `running` has ended without settling (its worker died): it is settled
-- here, charged up to now, by the next operation on its scope.
--
-- KEYS[1]  transient:delays:<scope>  HASH request id → JSON {g: run generation (string),
--                                    s: granted ms, e: ends ms, r: reason}; live and run-out
--                                    delays, until cancelled or their run settles
-- KEYS[2]  transient:runs:<scope>    HASH generation → JSON {b: base deadline ms,
--                                    t: charged up to ms}, for runs holding delays
-- KEYS[3]  transient:ledger:<scope>  ZSET "<generation>:<ms>:<charged ms>" scored by the ms
--                                    it was charged; entries older than 24 h are dropped
-- KEYS[4]  running                   HASH generation → running record
-- KEYS[5]  transient:seq             STRING request id counter (per app)
-- KEYS[6]  transient:scopes          ZSET scope → ms of its latest grant: the index of scopes
--                                    with delays or charges (`bgqueue status` reads it);
--                                    a grant adds its scope and drops entries over 2 days old
-- ARGV[1]  operation, then its arguments:
--   grant   generation, ms to the run's base deadline (negative if past), max concurrent,
--           max delay ms, daily quota ms, reason, scope name
--           → {'ok', request id, actual delay ms} | {'gone'} (run not running)
--             | {'limit', live delays} | {'quota', 0}; a refusal writes nothing
--   cancel  generation, ms to the run's base deadline, request id
--           → 1, or 0 if the run holds no such delay
--   settle  generation → ms charged for the run (its delays are released)
--   info    daily quota ms → {quota left ms, request id, ms left, ...} for live delays
-- Times are Redis's clock in ms.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DAY = 86400000
local DELAYS, RUNS, LEDGER, RUNNING = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

-- The scope's runs holding delays, by generation: the run record, its delays (id → end),
-- the latest end, how many have not ended, and whether the run has ended unsettled.
local function load()
  local all = {}
  local flat = redis.call('HGETALL', RUNS)
  for i = 1, #flat, 2 do
    all[flat[i]] = {rec = cjson.decode(flat[i + 1]), delays = {}, last = 0, live = 0,
                    lost = redis.call('HEXISTS', RUNNING, flat[i]) == 0}
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

-- Time the run's delays held (or will hold, up to `upto`) it past its base deadline,
-- from its charged mark on.
local function held(run, upto)
  return math.max(0, math.min(upto, run.last) - math.max(run.rec['t'], run.rec['b']))
end

-- Charge the run up to now: the time held goes to the ledger, the mark moves to now.
local function charge(gen, run)
  local amount = held(run, now)
  if amount > 0 then
    redis.call('ZADD', LEDGER, now, string.format('%s:%d:%d', gen, now, amount))
  end
  run.rec['t'] = math.max(run.rec['t'], now)
  return amount
end

-- End every delay of a run: charge what they held, refund the rest.
local function release(gen, run)
  local amount = charge(gen, run)
  for id in pairs(run.delays) do redis.call('HDEL', DELAYS, id) end
  redis.call('HDEL', RUNS, gen)
  return amount
end

-- Settle runs that ended unsettled and forget charges older than 24 hours.
local function housekeep(all)
  for gen, run in pairs(all) do
    if run.lost then
      release(gen, run)
      all[gen] = nil
    end
  end
  redis.call('ZREMRANGEBYSCORE', LEDGER, '-inf', now - DAY)
end

-- Quota left for new grants: the quota less the charges of the last 24 hours and what
-- every run still reserves (a run that ended unsettled holds nothing after now).
local function left(all, quota)
  local spent = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', LEDGER, '(' .. (now - DAY), '+inf')) do
    spent = spent + tonumber(string.match(m, ':(%d+)$'))
  end
  for _, run in pairs(all) do
    spent = spent + held(run, run.lost and now or math.huge)
  end
  return math.max(0, quota - spent)
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
  local run = all[gen] or {rec = {t = now}, delays = {}, last = 0}
  local base = now + to_base
  local deadline = math.max(base, run.last, now)
  local actual = math.min(max_delay, deadline - now + available)

  housekeep(all)
  if all[gen] then charge(gen, run) end
  run.rec['b'] = base
  redis.call('HSET', RUNS, gen, cjson.encode(run.rec))
  local id = redis.call('INCR', KEYS[5])
  redis.call('HSET', DELAYS, id, cjson.encode({g = gen, s = now, e = now + actual, r = ARGV[7]}))
  -- A scope's charges fall out of the ledger a day after its last grant at the latest
  -- (a delay lasts at most the max delay): two days keeps every scope that has any.
  redis.call('ZADD', KEYS[6], now, ARGV[8])
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - 2 * DAY)
  return {'ok', id, actual}
end

if op == 'cancel' then
  local gen, to_base, id = ARGV[2], tonumber(ARGV[3]), ARGV[4]
  local raw = redis.call('HGET', DELAYS, id)
  if not raw or cjson.decode(raw)['g'] ~= gen then return 0 end
  local all = load()
  local run = all[gen]
  if not run then  -- its run record is gone: nothing left to charge
    redis.call('HDEL', DELAYS, id)
    return 1
  end
  -- Charged up to now with the delay still counted; from now on it holds nothing.
  charge(gen, run)
  run.rec['b'] = now + to_base
  run.delays[id] = nil
  redis.call('HDEL', DELAYS, id)
  if next(run.delays) == nil then
    redis.call('HDEL', RUNS, gen)
  else
    redis.call('HSET', RUNS, gen, cjson.encode(run.rec))
  end
  all[gen] = nil
  housekeep(all)
  return 1
end

if op == 'settle' then
  local gen = ARGV[2]
  local all = load()
  local charged = 0
  if all[gen] then
    charged = release(gen, all[gen])
    all[gen] = nil
  end
  housekeep(all)
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
