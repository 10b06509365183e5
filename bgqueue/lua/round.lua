-- Everything beat's dispatch pass over one app reads, in one round trip: the live worker
-- classes (as view.lua reads them), whether the app holds CPU (its requests then go in the
-- priority lane), and per requirement profile asked, the scopes with something due by the
-- end of the dispatch window (a batch at most) and the first date after it.
--
-- KEYS[1]       classlive
-- KEYS[2], [3]  the app's CPU efficiency keys (app-wide, this process): either means held
-- KEYS[4..]     due:<profile> of each profile asked, in ARGV order
-- ARGV[1]       the dispatch window, ms
-- ARGV[2]       most scopes per profile
-- ARGV[3..]     the profiles asked
-- Returns {server ms, live class ids, CPU held (1|0), then for each profile asked: the
-- scopes due by now + the window, and {scope, date} of the first one after it (or {})}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now + tonumber(ARGV[1])
local out = {now, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf'),
             redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 and 1 or 0}
for i = 3, #ARGV do
  local due = KEYS[i + 1]
  out[#out + 1] = redis.call('ZRANGEBYSCORE', due, '-inf', horizon, 'LIMIT', 0, ARGV[2])
  out[#out + 1] = redis.call('ZRANGEBYSCORE', due, '(' .. horizon, '+inf', 'LIMIT', 0, 1,
    'WITHSCORES')
end
return out
