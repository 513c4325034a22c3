-- Apply one authenticated provider callback to the job it names, atomically: keep its raw body
-- (audit), skip one seen before (same invoice, status and transaction ids), move the current
-- invoice's status only forward, accumulate its transactions, and append one status event (and
-- announce it) per status change. An earlier invoice of the job (re-issued, or an orphan an
-- ambiguous attempt left) has its history entry updated instead; an id naming no job of ours is
-- kept and counted. A callback for the job's current provider id before the job knows that
-- invoice ('early') is kept but not marked seen: the caller answers 503 and the provider sends
-- it again.
-- Re-run after a lost reply (same op): answers what the first run did, writes nothing new.
-- Returns {outcome, changed, notify, record}: outcome a CallbackOutcome; changed 1 when the
-- job's invoice status moved; notify 1 when the job's status task is owed its current status
-- (then record is the job record, else {}).
local record_key = KEYS[1]  -- the job the provider id names (a key no job has, when none)
local stream_key = KEYS[2]
local stats_key = KEYS[3]
local callback_key = KEYS[4]  -- <prefix>callback:<invoice id>: raw bodies, seen identities
local unknown_key = KEYS[5]
local copy_key = KEYS[6]  -- the job's message copy (a confirmed invoice needs it no more)
local op = ARGV[1]  -- unique per call: tells a re-run from a duplicate
local invoice_id = ARGV[2]
local provider_id = ARGV[3]
local generation = tonumber(ARGV[4])  -- of the provider id; -1 when it is none we derive
local digest = ARGV[5]
local raw_body = ARGV[6]
local identity = ARGV[7]
local status = ARGV[8]
local error_text = ARGV[9]
local transactions = cjson.decode(ARGV[10])  -- an object by transaction id
local done_channel = ARGV[11]
local invoice_fields = tail(12)  -- sent and received amounts, field/value pairs
local callback_ttl_s = CONF.callback_ttl_s
local ttl_s = CONF.ttl_s
local stream_maxlen = CONF.stream_maxlen
local unknown_max = 1000

local now = now_ms()

local function decoded(text)
  if not text or text == '' then return {} end
  return cjson.decode(text)
end

-- Transactions by id: an instalment adds one; a later copy of one (more confirmations) wins.
local function merge(into, incoming)
  for id, tx in pairs(incoming) do
    local known = into[id]
    if not known or tonumber(tx.confirmations or 0) > tonumber(known.confirmations or 0) then
      into[id] = tx
    end
  end
  return into
end

-- The answer, with the job record when its status task has not been sent its current status.
local function answer(outcome, changed)
  local job = redis.call('HMGET', record_key, 'status_task', 'invoice_status', 'status_notified')
  if job[1] and job[2] and job[2] ~= job[3] then
    return {outcome, changed, 1, redis.call('HGETALL', record_key)}
  end
  return {outcome, changed, 0, {}}
end

local function finish(outcome, changed)
  redis.call('HSET', callback_key, 'seen:' .. identity, op .. ' ' .. outcome .. ' ' .. changed)
  redis.call('HINCRBY', stats_key, 'callbacks:' .. outcome, 1)
  return answer(outcome, changed)
end

local function unknown()
  redis.call('LPUSH', unknown_key, cjson.encode({at = now / 1000, invoice_id = invoice_id,
    foreign_id = provider_id, status = status, digest = digest}))
  redis.call('LTRIM', unknown_key, 0, unknown_max - 1)
  redis.call('EXPIRE', unknown_key, callback_ttl_s)
  return finish('unknown', 0)
end

-- An earlier invoice of the job: its entry in the record's history (an orphan's is made here).
local function to_history(job, outcome)
  local history = decoded(job[8])
  local key = tostring(generation)
  local entry = history[key]
  if entry and entry.invoice_id and tostring(entry.invoice_id) ~= invoice_id then
    return unknown()
  end
  if not entry then
    entry = {generation = generation, provider_foreign_id = provider_id, orphan = true}
  end
  if entry.orphan then outcome = 'orphan' end
  entry.invoice_id = invoice_id
  if not entry.status or INVOICE_RANK[status] > (INVOICE_RANK[entry.status] or -1) then
    entry.status = status
    if status == 'failed' then entry.error = error_text end
  end
  entry.transactions = merge(entry.transactions or {}, transactions)
  history[key] = entry
  redis.call('HSET', record_key, 'history', cjson.encode(history))
  redis.call('EXPIRE', record_key, ttl_s)
  return finish(outcome, 0)
end

-- The job's current invoice: transactions always, the status only forward.
local function to_current(job)
  local known = job[5] or job[6]
  local changes = {'transactions', cjson.encode(merge(decoded(job[7]), transactions))}
  for _, value in ipairs(invoice_fields) do changes[#changes + 1] = value end
  local moved = INVOICE_RANK[status] > (INVOICE_RANK[known] or -1)
  if moved then
    for _, value in ipairs({'invoice_status', status, 'status_at', now / 1000}) do
      changes[#changes + 1] = value
    end
    if status == 'failed' then
      changes[#changes + 1] = 'invoice_error'
      changes[#changes + 1] = error_text
    end
  end
  redis.call('HSET', record_key, unpack(changes))
  redis.call('EXPIRE', record_key, ttl_s)
  if not moved then return finish('recorded', 0) end
  local event = {'kind', 'status', 'foreign_id', job[9], 'status', status, 'previous', known or '',
    'invoice_id', invoice_id, 'provider_foreign_id', job[3] or job[9],
    'generation', job[2] or '0'}
  if status == 'failed' then
    event[#event + 1] = 'error'
    event[#event + 1] = error_text
  end
  redis.call('XADD', stream_key, 'MAXLEN', '~', stream_maxlen, '*', unpack(event))
  redis.call('PUBLISH', done_channel, status)
  -- Paid: no re-issue can follow, so the request (with the payer's e-mail) goes.
  if status == 'confirmed' then redis.call('DEL', copy_key) end
  return finish('applied', 1)
end

redis.call('HSET', callback_key, 'raw:' .. digest, raw_body)
redis.call('EXPIRE', callback_key, callback_ttl_s)
local seen = redis.call('HGET', callback_key, 'seen:' .. identity)
if seen then
  local first_op, first_outcome, first_changed = string.match(seen, '^(%S+) (%S+) (%d)$')
  if first_op == op then return answer(first_outcome, tonumber(first_changed)) end
  redis.call('HINCRBY', stats_key, 'callbacks:duplicate', 1)
  return answer('duplicate', 0)
end

local job = redis.call('HMGET', record_key, 'state', 'generation', 'provider_foreign_id',
  'invoice_id', 'invoice_status', 'status', 'transactions', 'history', 'foreign_id')
if not job[1] then return unknown() end
local current = tonumber(job[2] or '0')
if generation < 0 or generation > current then return unknown() end
if generation < current then return to_history(job, 'history') end
if string.lower(job[3] or job[9]) ~= string.lower(provider_id) then return unknown() end
if job[4] == invoice_id then return to_current(job) end
if not FINAL[job[1]] then
  redis.call('HINCRBY', stats_key, 'callbacks:early', 1)
  return {'early', 0, 0, {}}
end
-- Final without this invoice (it failed or expired after an ambiguous attempt): an orphan.
return to_history(job, 'orphan')
