-- Move a job its caller holds: renew the lease (and fence the next provider call), release it
-- until a retry, or make it final (with its one event and announcement). Also records what
-- the attempt said about the provider, for the whole fleet.
-- A final can be made in two steps, so that no reader sees an outcome a Redis failover could
-- take back: 'stage' keeps it in the record's ``staged`` field (the job stays processing and
-- held; the caller waits for replicas), then 'publish' applies it. 'final' is both at once.
-- Re-run after a lost reply (same op): answers what the first run did, writes nothing.
-- Returns {1, final record or {}, circuit_change}, {0} when the caller no longer holds the
-- job (or 'publish' finds nothing staged), or {2} for a ``created`` final past the record's
-- deadline (nothing is written then).
local record_key = KEYS[1]
local stream_key = KEYS[2]
local provider_key = KEYS[3]
local stats_key = KEYS[4]
local due_key = KEYS[5]
local copy_key = KEYS[6]
local cleanup_key = KEYS[7]
local owner = ARGV[1]
local op = ARGV[2]  -- unique per call: tells a re-run from a new transition
local new_state = ARGV[3]
-- renew | release | defer | stage | final | publish | republish (defer: a release because a
-- write was not durable, so no call was made: not counted as a retry)
local mode = ARGV[4]
local delay_ms = tonumber(ARGV[5])  -- -1: none
local done_channel = ARGV[6]
local report = ARGV[7]  -- a CallReport: ok | failure | rate_limited | ''
local pause_ms = tonumber(ARGV[8])
local latency_bucket = ARGV[9]  -- '' when no call was made
local latency_ms = tonumber(ARGV[10])
local due_member = ARGV[11]
local cleanup_in_ms = tonumber(ARGV[12])  -- -1: none; else retry a cancel after this long
local foreign_id = ARGV[13]  -- as the job's event names it
local values = cjson.decode(ARGV[14])  -- fields_json(): field -> value, strings
local fields = field_list(values)
local event = {}  -- a final's one stream entry: its state and its own EVENT_FIELDS, in order
if FINAL[new_state] then
  event = {'kind', JOB_EVENT, 'foreign_id', foreign_id, 'state', new_state}
  for _, name in ipairs(EVENT_FIELDS) do
    if values[name] then
      event[#event + 1] = name
      event[#event + 1] = values[name]
    end
  end
end
local lease_ms = CONF.lease_ms
local ttl_s = CONF.ttl_s
local stream_maxlen = CONF.stream_maxlen
local threshold = CONF.threshold
local window_ms = CONF.window_ms
local cooldown_ms = CONF.cooldown_ms
local due_after_ms = CONF.due_after_ms

local now = now_ms()

-- What this attempt says about the provider: the circuit's change, if any.
local function report_to_fleet()
  if report == 'ok' then
    local circuit = redis.call('HGET', provider_key, 'circuit')
    if circuit and circuit ~= 'closed' then
      redis.call('HSET', provider_key, 'circuit', 'closed', 'failures', 0)
      return 'closed'
    elseif tonumber(redis.call('HGET', provider_key, 'failures') or '0') > 0 then
      redis.call('HSET', provider_key, 'failures', 0)
    end
  elseif report == 'failure' and threshold > 0 then
    local circuit = redis.call('HGET', provider_key, 'circuit') or 'closed'
    local failures = threshold
    if circuit == 'closed' then
      local first = tonumber(redis.call('HGET', provider_key, 'first_failure_ms') or '0')
      if now - first > window_ms then
        redis.call('HSET', provider_key, 'first_failure_ms', now, 'failures', 1)
        failures = 1
      else
        failures = redis.call('HINCRBY', provider_key, 'failures', 1)
      end
    end
    if circuit == 'half_open' or (circuit == 'closed' and failures >= threshold) then
      redis.call('HSET', provider_key, 'circuit', 'open', 'open_until', now + cooldown_ms,
        'failures', 0)
      redis.call('HINCRBY', stats_key, 'circuit_opened', 1)
      return 'open'
    end
  elseif report == 'rate_limited' then
    local until_ms = now + pause_ms
    if until_ms > tonumber(redis.call('HGET', provider_key, 'pause_until') or '0') then
      redis.call('HSET', provider_key, 'pause_until', until_ms)
    end
  end
  return ''
end

local function record_latency()
  if latency_bucket == '' then return end
  redis.call('HINCRBY', stats_key, 'latency_bucket:' .. latency_bucket, 1)
  redis.call('HINCRBY', stats_key, 'latency_count', 1)
  redis.call('HINCRBYFLOAT', stats_key, 'latency_sum', latency_ms / 1000)
end

local function finalize()
  redis.call('XADD', stream_key, 'MAXLEN', '~', stream_maxlen, '*', unpack(event))
  redis.call('ZREM', due_key, due_member)
  if new_state == 'created' then
    -- Kept with the record: a re-issue after the invoice fails sends the same request again
    -- (a confirmed invoice deletes it, see callback.lua).
    redis.call('EXPIRE', copy_key, ttl_s)
  else
    redis.call('DEL', copy_key)
  end
  if cleanup_in_ms >= 0 then
    redis.call('ZADD', cleanup_key, now + cleanup_in_ms, due_member)
    -- The record must outlive the cleanup's tries: it holds the id to cancel.
    redis.call('EXPIRE', record_key, math.max(ttl_s, CONF.cleanup_horizon_s))
  end
  redis.call('PUBLISH', done_channel, new_state)
end

local held = redis.call('HMGET', record_key, 'lease_owner', 'state', 'last_op', 'lease_until')
if held[3] == op and held[1] == owner then  -- a re-run after a lost reply
  if FINAL[held[2]] then return {1, redis.call('HGETALL', record_key), ''} end
  return {1, {}, ''}
end
if held[1] ~= owner or not held[2] or FINAL[held[2]] then return {0} end
-- A released lease (lease_until 0) keeps its owner recorded, but no longer lets it write.
if tonumber(held[4] or '0') == 0 then return {0} end
-- A job never reports ``created`` past its deadline: checked here, atomically, on Redis' clock;
-- except when a staged outcome is published again ('republish', by the next claim): its first
-- publication may have been read, then taken back by a failover, and a URL a shop showed must
-- not be cancelled now. Only a stage whose holder handed it back unconfirmed (staged_unseen)
-- is known never to have been published.
local deadline_applies = true
if mode == 'publish' or mode == 'republish' then
  local staged = redis.call('HGET', record_key, 'staged')
  if not staged then return {0} end
  staged = cjson.decode(staged)
  new_state, fields, event, cleanup_in_ms = staged[1], staged[2], staged[3], staged[4]
  deadline_applies = mode == 'publish' or redis.call('HEXISTS', record_key, 'staged_unseen') == 1
  mode = 'final'
end
if new_state == 'created' and deadline_applies then
  local deadline = tonumber(redis.call('HGET', record_key, 'deadline') or '')
  if deadline and now >= deadline * 1000 then return {2} end
end
if mode == 'stage' then
  -- Kept as one JSON value: readers see the job still processing until it is published.
  redis.call('HSET', record_key, 'staged', cjson.encode({new_state, fields, event, cleanup_in_ms}),
    'updated_at', now / 1000, 'last_op', op, 'lease_until', now + lease_ms)
  redis.call('ZADD', due_key, now + lease_ms + due_after_ms, due_member)
  record_latency()
  local change = report_to_fleet()
  redis.call('EXPIRE', record_key, ttl_s)
  redis.call('EXPIRE', copy_key, ttl_s)
  return {1, {}, change}
end

redis.call('HSET', record_key, 'state', new_state, 'updated_at', now / 1000, 'last_op', op)
if #fields > 0 then redis.call('HSET', record_key, unpack(fields)) end
move(stats_key, held[2], new_state)
if mode == 'renew' then
  redis.call('HSET', record_key, 'lease_until', now + lease_ms)
  redis.call('ZADD', due_key, now + lease_ms + due_after_ms, due_member)
else
  -- The owner stays recorded (a re-run must recognise itself); the lease itself ends.
  redis.call('HSET', record_key, 'lease_until', 0)
end
if delay_ms >= 0 then
  redis.call('HSET', record_key, 'next_attempt_ms', now + delay_ms,
    'next_attempt_at', (now + delay_ms) / 1000)
  if mode ~= 'defer' then redis.call('HINCRBY', stats_key, 'retries', 1) end
  redis.call('ZADD', due_key, now + delay_ms + due_after_ms, due_member)
end
record_latency()
local change = report_to_fleet()
redis.call('EXPIRE', record_key, ttl_s)
if mode ~= 'final' then
  redis.call('EXPIRE', copy_key, ttl_s)
  return {1, {}, change}
end
redis.call('HDEL', record_key, 'staged', 'staged_unseen')
finalize()
return {1, redis.call('HGETALL', record_key), change}
