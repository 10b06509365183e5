-- Beat reads the waiting works, earliest first (at most max_works per app), to match the
-- due ones against live workers. Read only: a work a Redis restart ended may still be
-- listed; work_claim.lua forgets it instead of claiming it.
--
-- KEYS[1]  works
-- KEYS[2]  work:due
-- Returns the server time in ms, then work id, due ms, record JSON for each waiting work.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
local due = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #due, 2 do
  local raw = redis.call('HGET', KEYS[1], due[i])
  if raw then
    out[#out + 1] = due[i]
    out[#out + 1] = due[i + 1]
    out[#out + 1] = raw
  end
end
return out
