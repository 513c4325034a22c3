-- Record a job as queued unless its foreign_id exists; with a broker message, push it onto
-- the broker list in the same step (no crash can leave one without the other).
-- Re-run after a lost reply (same task_id): answers 'new' again, writes nothing.
-- Returns {'new', record} | {'exists', record, stale} | {'conflict'}.
local record_key = KEYS[1]
local queue_key = KEYS[2]  -- the broker list ('' argument: the caller sends through Celery)
local stats_key = KEYS[3]
local due_key = KEYS[4]
local copy_key = KEYS[5]
local fingerprint = ARGV[1]
local task_id = ARGV[2]
local broker_message = ARGV[3]
local task_kwargs = ARGV[4]
local due_member = ARGV[5]
local new_fields = field_list(cjson.decode(ARGV[6]))  -- fields_json()
local ttl_s = CONF.ttl_s
local due_after_ms = CONF.due_after_ms

local now = now_ms()
local known = redis.call('HMGET', record_key,
  'fingerprint', 'task_id', 'state', 'enqueued_ms', 'resent_by')
if known[1] then
  if known[1] ~= fingerprint then return {'conflict'} end
  if known[2] == task_id then return {'new', redis.call('HGETALL', record_key)} end
  -- Still queued long after it was sent: its message may be lost; the caller sends again
  -- (and a re-run of this same call, after a lost reply, is told so again).
  local stale = 0
  if known[5] == task_id then
    stale = 1
  elseif known[3] == 'queued' and now - tonumber(known[4] or '0') > due_after_ms then
    redis.call('HSET', record_key, 'enqueued_ms', now, 'resent_by', task_id)
    stale = 1
  end
  return {'exists', redis.call('HGETALL', record_key), stale}
end
redis.call('HSET', record_key, 'fingerprint', fingerprint, 'task_id', task_id, 'state', 'queued',
  'attempts', 0, 'created_at', now / 1000, 'updated_at', now / 1000, 'enqueued_ms', now,
  unpack(new_fields))
redis.call('EXPIRE', record_key, ttl_s)
redis.call('SET', copy_key, task_kwargs, 'EX', ttl_s)
redis.call('ZADD', due_key, now + due_after_ms, due_member)
move(stats_key, nil, 'queued')
if broker_message ~= '' then redis.call('LPUSH', queue_key, broker_message) end
return {'new', redis.call('HGETALL', record_key)}
