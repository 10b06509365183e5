-- Beat's singleton lease: take it if free, renew it if ours, or release it if ours.
--
-- KEYS[1]  the lease key
-- ARGV[1]  this beat's token
-- ARGV[2]  lease length, ms; 0 releases
-- Returns 1 if this beat holds the lease after the call, else 0.

local holder = redis.call('GET', KEYS[1])
if tonumber(ARGV[2]) == 0 then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
