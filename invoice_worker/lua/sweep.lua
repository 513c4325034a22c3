-- Take the jobs whose message was lost. Every job not yet final has a due time in the sorted
-- set ``due``: when it must have moved on if its message still exists (last step + the
-- broker's redelivery delay). Past it, with no live lease and an empty broker queue (a backlog
-- may still hold the message: messages wait in line, so only a drained queue proves it gone),
-- the message was lost. Record and copy keys are derived from the prefix, so this script needs
-- a single Redis, not a cluster.
-- Re-run after a lost reply (same batch key): answers what the first run did.
-- Returns {foreign_id, task_id, kwargs, ...} to send again.
local due_key = KEYS[1]
local stats_key = KEYS[2]
local batch_key = KEYS[3]  -- this call's answer, kept for a re-run after a lost reply
local limit = ARGV[1]
local queue_depth = tonumber(ARGV[2])  -- read from the broker by the caller
local prefix = CONF.prefix
local due_after_ms = CONF.due_after_ms

local out = {}
local earlier = replayed(batch_key)
if earlier then return earlier end
if queue_depth > 0 then return out end
local now = now_ms()
for _, member in ipairs(redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, limit)) do
  local record_key = prefix .. JOB_KEY .. member
  local state, lease_until, task_id, foreign_id = unpack(redis.call('HMGET', record_key,
    'state', 'lease_until', 'task_id', 'foreign_id'))
  local body = redis.call('GET', prefix .. COPY_KEY .. member)
  if not state or FINAL[state] or not body then
    redis.call('ZREM', due_key, member)
  elseif tonumber(lease_until or '0') > now then
    redis.call('ZADD', due_key, tonumber(lease_until) + due_after_ms, member)
  else
    redis.call('ZADD', due_key, now + due_after_ms, member)
    redis.call('HINCRBY', stats_key, 'resent', 1)
    out[#out + 1] = foreign_id or member
    out[#out + 1] = task_id or ''
    out[#out + 1] = body
  end
end
return remember(batch_key, out, due_after_ms)
