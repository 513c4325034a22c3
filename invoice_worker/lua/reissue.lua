-- Replace a job's failed invoice with a fresh one for the same order: the failed invoice (with
-- what its callbacks said) goes into the record's history under its generation, the job moves to
-- the next generation's derived provider id and is queued again (its message pushed in the same
-- step when the broker is this Redis), so the ordinary claim and attempt create the invoice.
-- Refused unless the job is created and its invoice failed. The caller names the generation
-- whose failed invoice it saw: once that one is replaced, every other call naming it (a
-- concurrent one, or a re-run after a lost reply) is answered the record as it is: 'done'.
-- Returns {'reissued', record} | {'done', record} | {'refused', reason, record}.
local record_key = KEYS[1]
local queue_key = KEYS[2]  -- the broker list ('' message: the caller sends through Celery)
local stats_key = KEYS[3]
local due_key = KEYS[4]
local copy_key = KEYS[5]
local replaces = tonumber(ARGV[1])
local provider_id = ARGV[2]
local task_id = ARGV[3]
local broker_message = ARGV[4]
local task_kwargs = ARGV[5]
local due_member = ARGV[6]
local deadline = ARGV[7]  -- '' for none
local ttl_s = CONF.ttl_s
local due_after_ms = CONF.due_after_ms

-- The replaced invoice's fields: kept in its history entry, cleared from the record.
local INVOICE = {'provider_foreign_id', 'invoice_id', 'url', 'address', 'amount', 'currency',
  'fixed_at', 'release_at', 'status_at', 'sent_amount', 'sent_currency', 'received_amount',
  'received_currency', 'orphan'}
-- What the finished run left behind: the next run starts without it.
local RUN = {'status', 'invoice_status', 'invoice_error', 'transactions', 'status_notified',
  'callback_sent', 'error_code', 'error', 'http_status', 'errors', 'last_error',
  'last_error_code', 'next_attempt_at', 'next_attempt_ms', 'deferred', 'ambiguous', 'crashes',
  'lease_owner', 'lease_until', 'last_op', 'claim_status', 'slot_ms', 'staged', 'resent_by',
  'deadline'}

local now = now_ms()
local known = redis.call('HMGET', record_key, 'state', 'generation', 'invoice_status', 'status',
  'invoice_error', 'transactions', 'history')
if not known[1] then return {'refused', 'not_found', {}} end
local generation = tonumber(known[2] or '0')
if generation > replaces then return {'done', redis.call('HGETALL', record_key)} end
if generation < replaces then
  return {'refused', 'no_such_generation', redis.call('HGETALL', record_key)}
end
if known[1] ~= 'created' then
  return {'refused', 'not_created', redis.call('HGETALL', record_key)}
end
local status = known[3] or known[4]
if status ~= 'failed' then
  local reason = status == 'confirmed' and 'paid' or 'payable'
  return {'refused', reason, redis.call('HGETALL', record_key)}
end

local entry = {generation = generation, status = status, reissued_at = now / 1000,
  transactions = known[6] and cjson.decode(known[6]) or {}}
if known[5] then entry.error = known[5] end
local values = redis.call('HMGET', record_key, unpack(INVOICE))
for i, name in ipairs(INVOICE) do
  if values[i] then entry[name] = values[i] end
end
local history = known[7] and cjson.decode(known[7]) or {}
history[tostring(generation)] = entry

redis.call('HDEL', record_key, unpack(INVOICE))
redis.call('HDEL', record_key, unpack(RUN))
redis.call('HSET', record_key, 'state', 'queued', 'task_id', task_id, 'attempts', 0,
  'generation', generation + 1, 'provider_foreign_id', provider_id,
  'history', cjson.encode(history), 'updated_at', now / 1000, 'enqueued_ms', now)
if deadline ~= '' then redis.call('HSET', record_key, 'deadline', deadline) end
redis.call('EXPIRE', record_key, ttl_s)
redis.call('SET', copy_key, task_kwargs, 'EX', ttl_s)
redis.call('ZADD', due_key, now + due_after_ms, due_member)
move(stats_key, 'created', 'queued')
redis.call('HINCRBY', stats_key, 'reissued', 1)
if broker_message ~= '' then redis.call('LPUSH', queue_key, broker_message) end
return {'reissued', redis.call('HGETALL', record_key)}
