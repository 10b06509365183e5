-- A scope's history (spliced in by bgqueue/scripts.py where a script says
-- `-- include: history`, after the requests include, which defines `now`).
--
-- remember(key, entry, cap, retention): push one TaskRecord entry (a table) onto the
-- scope's history list, newest first, and keep the list bounded in size and lifetime: at
-- most `cap` entries, none finished more than `retention` ms ago, and the whole key gone
-- `retention` ms after its newest entry (an idle scope leaves nothing behind).

local HISTORY_TRIM_STEP = 10  -- old entries dropped per push at most: bounded work per call

local function remember(key, entry, cap, retention)
  redis.call('LPUSH', key, cjson.encode(entry))
  redis.call('LTRIM', key, 0, tonumber(cap) - 1)
  local oldest = now - tonumber(retention)
  for _ = 1, HISTORY_TRIM_STEP do
    local ok, last = pcall(cjson.decode, redis.call('LINDEX', key, -1) or 'null')
    if not ok or type(last) ~= 'table' or (tonumber(last['fa']) or 0) >= oldest then break end
    redis.call('RPOP', key)
  end
  redis.call('PEXPIRE', key, retention)
end
