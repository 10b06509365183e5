-- Apply for efficiency resources: one grant per resource type, merged with a grant already
-- held the way HarmonyOS merges them (the reason is replaced, persistence is sticky, the
-- end is the later of the two). A timed grant's key expires at its end on this server's
-- clock, which is the automatic release: no reader can see an expired grant.
--
-- KEYS[1]     alive (sorted set worker name → ms its heartbeat lapses)
-- KEYS[2..n]  the grant of each requested type at the requested level (string, JSON:
--             r reason, t time_out ms, p 1 if persistent, x end ms or 0, g granted at ms)
-- ARGV[1]     time_out, ms (ignored when persistent)
-- ARGV[2]     1 if persistent
-- ARGV[3]     1 if process-level: refused unless a worker of the app is alive
-- ARGV[4]     reason
-- Returns 1, or 0 if refused (then nothing was written).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' and redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf') == 0 then
  return 0
end
local time_out = tonumber(ARGV[1])
for i = 2, #KEYS do
  local persist = ARGV[2] == '1'
  local ends = now + time_out
  local old = redis.call('GET', KEYS[i])
  if old then
    old = cjson.decode(old)
    persist = persist or old.p == 1
    if not persist then ends = math.max(ends, old.x) end
  end
  local grant = {r = ARGV[4], t = time_out, p = persist and 1 or 0, x = persist and 0 or ends, g = now}
  redis.call('SET', KEYS[i], cjson.encode(grant))
  if not persist then
    redis.call('PEXPIREAT', KEYS[i], string.format('%d', ends))
  end
end
return 1
