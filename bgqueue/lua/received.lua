-- A worker has received a dispatched request's message and is about to start it.
-- Its dispatch lease shrinks to the heartbeat timeout: if the worker dies before the
-- start, the sweep publishes the request again within seconds instead of after the
-- long dispatch lease. A start removes the lease; a duplicate message is harmless.
--
-- KEYS[1]  leases
-- ARGV[1]  member "<scope>\31<identifier>"
-- ARGV[2]  new lease, ms (shortens only)
-- Returns 1 if the lease was shortened.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local until_ms = now + tonumber(ARGV[2])
if score and tonumber(score) > until_ms then
  redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[1])
  return 1
end
return 0
