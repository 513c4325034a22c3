-- A worker tries to take a job: create the record if a message came without the producer,
-- pass the fleet gate (429 pause, circuit breaker, rate limit), then hold it under a lease.
-- Re-run after a lost reply (same owner, lease still held): answers what the first run did.
-- A job with a staged final (see transition.lua) is held as 'staged', past every gate.
-- Returns {status, record, wait_ms, reason, circuit_change}; status is a ClaimStatus.
local record_key = KEYS[1]
local provider_key = KEYS[2]
local stats_key = KEYS[3]
local due_key = KEYS[4]
local copy_key = KEYS[5]
local owner = ARGV[1]
local fingerprint = ARGV[2]
local gated = ARGV[3] == '1'  -- 0: no provider call will follow (an invalid message)
local due_member = ARGV[4]
local task_kwargs = ARGV[5]  -- kept only with a record created here; '' for none
local new_fields = field_list(cjson.decode(ARGV[6]))  -- fields_json()
local lease_ms = CONF.lease_ms
local max_crashes = CONF.max_crashes
local ttl_s = CONF.ttl_s
local interval_ms = CONF.interval_ms  -- fleet rate limit; 0 = off
local burst = CONF.burst
local threshold = CONF.threshold  -- circuit breaker; 0 = off
local cooldown_ms = CONF.cooldown_ms
local probes = CONF.probes
local due_after_ms = CONF.due_after_ms
local max_wait_ms = CONF.max_wait_ms  -- longest countdown (below the broker's redelivery)

local now = now_ms()
if not gated then interval_ms, threshold = 0, 0 end

-- The circuit breaker: {wait_ms, change, probe}.
local function circuit_gate()
  local circuit = redis.call('HGET', provider_key, 'circuit') or 'closed'
  local change = ''
  if circuit == 'open' then
    local open_until = tonumber(redis.call('HGET', provider_key, 'open_until') or '0')
    if now < open_until then return open_until - now, change, false end
    circuit, change = 'half_open', 'half_open'
    redis.call('HSET', provider_key, 'circuit', 'half_open', 'probes_left', probes,
      'half_open_until', now + cooldown_ms)
  end
  if circuit ~= 'half_open' then return 0, change, false end
  local half_until = tonumber(redis.call('HGET', provider_key, 'half_open_until') or '0')
  if now > half_until then  -- the probes never reported back: hand out new ones
    redis.call('HSET', provider_key, 'probes_left', probes, 'half_open_until', now + cooldown_ms)
    half_until = now + cooldown_ms
  end
  if tonumber(redis.call('HGET', provider_key, 'probes_left') or '0') > 0 then
    return 0, change, true
  end
  return math.min(half_until - now, 2000), change, false
end

-- The rate limit (GCRA). A job turned away keeps a reserved slot, so deferred jobs come back
-- one interval apart, and a job back before its slot waits for it without taking another.
local function rate_gate()
  local slot = tonumber(redis.call('HGET', record_key, 'slot_ms') or '0')
  if slot > now + 20 then return slot - now end
  if slot > 0 and now <= slot + interval_ms then return 0 end
  local tat = math.max(tonumber(redis.call('HGET', provider_key, 'tat') or '0'), now)
  local at = tat - (burst - 1) * interval_ms
  redis.call('HSET', provider_key, 'tat', tat + interval_ms)
  if at <= now then return 0 end
  redis.call('HSET', record_key, 'slot_ms', at)
  return at - now
end

-- The fleet gate: {wait_ms, reason, circuit_change, probe}.
local function fleet_gate()
  local pause = tonumber(redis.call('HGET', provider_key, 'pause_until') or '0')
  if gated and pause > now then return pause - now, 'provider_paused', '', false end
  local change, probe = '', false
  if threshold > 0 then
    local wait
    wait, change, probe = circuit_gate()
    if wait > 0 then return wait, 'circuit_open', change, false end
  end
  if interval_ms > 0 then
    local wait = rate_gate()
    if wait > 0 then return wait, 'rate_limited', change, false end
  end
  return 0, '', change, probe
end

-- What a claimed attempt reads (ATTEMPT_FIELDS, from scripts.py): not the whole record.
local function attempt_fields()
  local values = redis.call('HMGET', record_key, unpack(ATTEMPT_FIELDS))
  local out = {}
  for i, name in ipairs(ATTEMPT_FIELDS) do
    if values[i] then
      out[#out + 1] = name
      out[#out + 1] = values[i]
    end
  end
  return out
end

local function defer(state, wait, reason, change)
  wait = math.min(wait, max_wait_ms)
  redis.call('HSET', record_key, 'state', 'retrying', 'updated_at', now / 1000,
    'deferred', reason, 'next_attempt_ms', now + wait, 'next_attempt_at', (now + wait) / 1000)
  redis.call('HINCRBY', stats_key, 'deferrals:' .. reason, 1)
  redis.call('ZADD', due_key, now + wait + due_after_ms, due_member)
  move(stats_key, state, 'retrying')
  return {'deferred', {}, wait, reason, change}
end

local function hold(state, status, reason, change)
  -- A staged final is published, not attempted: it uses no attempt.
  if status ~= 'staged' then redis.call('HINCRBY', record_key, 'attempts', 1) end
  redis.call('HSET', record_key, 'state', 'processing', 'lease_owner', owner,
    'lease_until', now + lease_ms, 'updated_at', now / 1000, 'claim_status', status)
  redis.call('HDEL', record_key, 'next_attempt_ms', 'next_attempt_at', 'slot_ms', 'deferred')
  redis.call('ZADD', due_key, now + lease_ms + due_after_ms, due_member)
  move(stats_key, state, 'processing')
  return {status, attempt_fields(), 0, reason, change}
end

local state = redis.call('HGET', record_key, 'state')
if not state then
  -- A message sent without the producer: the caller must bring its kwargs to keep a copy.
  if gated and task_kwargs == '' then return {'missing', {}, 0, '', ''} end
  redis.call('HSET', record_key, 'fingerprint', fingerprint, 'state', 'queued', 'attempts', 0,
    'created_at', now / 1000, 'enqueued_ms', now, unpack(new_fields))
  if task_kwargs ~= '' then redis.call('SET', copy_key, task_kwargs, 'EX', ttl_s) end
  move(stats_key, nil, 'queued')
  state = 'queued'
elseif redis.call('HGET', record_key, 'fingerprint') ~= fingerprint then
  return {'conflict', {}, 0, '', ''}
end
if FINAL[state] then return {'done', redis.call('HGETALL', record_key), 0, '', ''} end
-- Every step keeps a live job's memory (above all of an ambiguous attempt) for a full TTL.
redis.call('EXPIRE', record_key, ttl_s)
redis.call('EXPIRE', copy_key, ttl_s)
local lease = redis.call('HMGET', record_key, 'lease_owner', 'lease_until', 'claim_status')
if tonumber(lease[2] or '0') > now then
  if lease[1] == owner then  -- a re-run after a lost reply
    return {lease[3] or 'claimed', attempt_fields(), 0, '', ''}
  end
  return {'busy', {}, tonumber(lease[2]) - now, '', ''}
end
-- An outcome staged by a holder that then vanished (or could not make it durable): publish
-- it as it is. Not a crash: the outcome is known, and the provider must not be called again.
if redis.call('HEXISTS', record_key, 'staged') == 1 then return hold(state, 'staged', '', '') end
local next_at = tonumber(redis.call('HGET', record_key, 'next_attempt_ms') or '0')
if state == 'retrying' and next_at > now + 1000 then
  return {'early', {}, next_at - now, '', ''}
end

local wait, reason, change, probe = fleet_gate()
local status = 'claimed'
if state == 'processing' then
  -- The last holder vanished mid-attempt: its call may have reached the provider.
  local crashes = redis.call('HINCRBY', record_key, 'crashes', 1)
  redis.call('HSET', record_key, 'ambiguous', 1)
  if crashes > max_crashes then status = 'poison' end
end
if wait > 0 and status ~= 'poison' then
  local deadline = tonumber(redis.call('HGET', record_key, 'deadline') or '')
  if not deadline or (now + wait) / 1000 < deadline then
    return defer(state, wait, reason, change)
  end
  status = 'expire'
elseif probe then
  redis.call('HINCRBY', provider_key, 'probes_left', -1)
end
return hold(state, status, reason, change)
