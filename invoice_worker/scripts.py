"""The Lua scripts behind the job store: each transition is one atomic round trip.

Keys: a job record is the hash ``<prefix>job:<foreign_id>``; the fleet's shared view of the
provider (rate-limit cursor, 429 pause, circuit breaker) is the hash ``<prefix>provider``;
counters for metrics live in ``<prefix>stats``. Times come from Redis' own clock (``TIME``), so
workers on different hosts agree on leases, pauses and slots.
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local final = {created=true, failed=true, expired=true}
local function move(stats, old, new)
  if old == new then return end
  if old and not final[old] then redis.call('HINCRBY', stats, 'jobs:' .. old, -1) end
  if final[new] then
    redis.call('HINCRBY', stats, 'final:' .. new, 1)
  else
    redis.call('HINCRBY', stats, 'jobs:' .. new, 1)
  end
end
"""

# KEYS: record, broker queue, stats, due, message copy. ARGV: fingerprint, ttl_s, due_after_ms,
# broker message ('' when the caller sends it through Celery), task kwargs (JSON), foreign_id,
# then field/value pairs of a new record.
# Returns {'new'} | {'conflict'} | {'exists', record, stale}. A new record and its message are
# written together: no crash can leave one without the other.
ENQUEUE = (
    _PRELUDE
    + """
local rec, queue, stats, due, copy = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local due_after, fid = tonumber(ARGV[3]), ARGV[6]
local fp = redis.call('HGET', rec, 'fingerprint')
if fp then
  if fp ~= ARGV[1] then return {'conflict'} end
  local stale = 0
  local at = tonumber(redis.call('HGET', rec, 'enqueued_ms') or '0')
  if redis.call('HGET', rec, 'state') == 'queued' and now - at > due_after then
    redis.call('HSET', rec, 'enqueued_ms', now)
    stale = 1
  end
  return {'exists', redis.call('HGETALL', rec), stale}
end
redis.call('HSET', rec, 'fingerprint', ARGV[1], 'state', 'queued', 'attempts', 0,
  'created_at', now / 1000, 'updated_at', now / 1000, 'enqueued_ms', now, unpack(ARGV, 7))
redis.call('EXPIRE', rec, ARGV[2])
redis.call('SET', copy, ARGV[5], 'EX', ARGV[2])
redis.call('ZADD', due, now + due_after, fid)
move(stats, nil, 'queued')
if ARGV[4] ~= '' then redis.call('LPUSH', queue, ARGV[4]) end
return {'new'}
"""
)

# KEYS: record, provider, stats, due, message copy. ARGV: owner, lease_ms, fingerprint,
# max_crashes, ttl_s, gated (1: pass the fleet gate; 0: no provider call will follow),
# interval_ms (fleet rate limit; 0 = off), burst, breaker threshold (0 = off), cooldown_ms,
# probes, due_after_ms, foreign_id, task kwargs (JSON, kept only with a record created here;
# '' for none), then field/value pairs for a record the producer never wrote.
# Returns {status, record, wait_ms, reason, circuit_change}; status is one of
# claimed | poison | expire (claimed, but the deadline passes before the provider may be called)
# | done | busy | early | deferred (by the fleet gate: no attempt used) | conflict | missing (no
# record yet and no kwargs given: call again with them).
CLAIM = (
    _PRELUDE
    + """
local rec, provider, stats, due, copy = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local due_after, fid = tonumber(ARGV[12]), ARGV[13]
local state = redis.call('HGET', rec, 'state')
if not state then
  -- A message sent without the producer: the caller must bring its kwargs to keep a copy.
  if ARGV[6] == '1' and ARGV[14] == '' then return {'missing', {}, 0, '', ''} end
  redis.call('HSET', rec, 'fingerprint', ARGV[3], 'state', 'queued', 'attempts', 0,
    'created_at', now / 1000, 'enqueued_ms', now, unpack(ARGV, 15))
  redis.call('EXPIRE', rec, ARGV[5])
  if ARGV[14] ~= '' then redis.call('SET', copy, ARGV[14], 'EX', ARGV[5]) end
  move(stats, nil, 'queued')
  state = 'queued'
elseif redis.call('HGET', rec, 'fingerprint') ~= ARGV[3] then
  return {'conflict', {}, 0, '', ''}
end
if final[state] then return {'done', redis.call('HGETALL', rec), 0, '', ''} end
local lease_until = tonumber(redis.call('HGET', rec, 'lease_until') or '0')
if lease_until > now then
  if redis.call('HGET', rec, 'lease_owner') == ARGV[1] then
    return {'claimed', redis.call('HGETALL', rec), 0, '', ''}  -- a retried call that already ran
  end
  return {'busy', {}, lease_until - now, '', ''}
end
local next_at = tonumber(redis.call('HGET', rec, 'next_attempt_ms') or '0')
if state == 'retrying' and next_at > now + 1000 then return {'early', {}, next_at - now, '', ''} end

-- The fleet gate: a 429 pause, the circuit breaker, then the rate limit (GCRA). A job the rate
-- limit turns away gets a reserved slot, so deferred jobs come back one interval apart
-- instead of all at once.
local gated, interval, burst = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local threshold, cooldown, probes = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
if not gated then interval, threshold = 0, 0 end
local wait, reason, change, probe = 0, '', '', false
local pause = tonumber(redis.call('HGET', provider, 'pause_until') or '0')
if gated and pause > now then wait, reason = pause - now, 'provider_paused' end
if wait == 0 and threshold > 0 then
  local circuit = redis.call('HGET', provider, 'circuit') or 'closed'
  if circuit == 'open' then
    local open_until = tonumber(redis.call('HGET', provider, 'open_until') or '0')
    if now < open_until then
      wait, reason = open_until - now, 'circuit_open'
    else
      circuit, change = 'half_open', 'half_open'
      redis.call('HSET', provider, 'circuit', 'half_open', 'probes_left', probes,
        'half_open_until', now + cooldown)
    end
  end
  if circuit == 'half_open' then
    local half_until = tonumber(redis.call('HGET', provider, 'half_open_until') or '0')
    if now > half_until then  -- the probes never reported back: hand out new ones
      redis.call('HSET', provider, 'probes_left', probes, 'half_open_until', now + cooldown)
      half_until = now + cooldown
    end
    if tonumber(redis.call('HGET', provider, 'probes_left') or '0') > 0 then
      probe = true
    else
      wait, reason = math.min(half_until - now, 2000), 'circuit_open'
    end
  end
end
local slot = tonumber(redis.call('HGET', rec, 'slot_ms') or '0')
local reserved = slot > 0 and now >= slot - 20 and now <= slot + interval
if wait == 0 and interval > 0 and not reserved then
  local tat = math.max(tonumber(redis.call('HGET', provider, 'tat') or '0'), now)
  local at = tat - (burst - 1) * interval
  redis.call('HSET', provider, 'tat', tat + interval)
  if at > now then
    redis.call('HSET', rec, 'slot_ms', at)
    wait, reason = at - now, 'rate_limited'
  end
end
local status = 'claimed'
if state == 'processing' then
  -- the last holder vanished mid-attempt: its call may have reached the provider
  local crashes = redis.call('HINCRBY', rec, 'crashes', 1)
  redis.call('HSET', rec, 'ambiguous', 1)
  if crashes > tonumber(ARGV[4]) then status = 'poison' end
end
if wait > 0 and status ~= 'poison' then
  local deadline = tonumber(redis.call('HGET', rec, 'deadline') or '')
  if not deadline or (now + wait) / 1000 < deadline then
    redis.call('HSET', rec, 'state', 'retrying', 'updated_at', now / 1000, 'deferred', reason,
      'next_attempt_ms', now + wait, 'next_attempt_at', (now + wait) / 1000)
    redis.call('HINCRBY', stats, 'deferrals:' .. reason, 1)
    redis.call('ZADD', due, now + wait + due_after, fid)
    move(stats, state, 'retrying')
    return {'deferred', {}, wait, reason, change}
  end
  status = 'expire'
elseif probe then
  redis.call('HINCRBY', provider, 'probes_left', -1)
end
redis.call('HINCRBY', rec, 'attempts', 1)
redis.call('HSET', rec, 'state', 'processing', 'lease_owner', ARGV[1],
  'lease_until', now + tonumber(ARGV[2]), 'updated_at', now / 1000)
redis.call('HDEL', rec, 'next_attempt_ms', 'next_attempt_at', 'slot_ms', 'deferred')
redis.call('ZADD', due, now + tonumber(ARGV[2]) + due_after, fid)
move(stats, state, 'processing')
return {status, redis.call('HGETALL', rec), 0, reason, change}
"""
)

# KEYS: record, events stream, provider, stats, due, message copy. ARGV: owner, state, mode
# (renew|release|final), lease_ms, delay_ms (-1: none), ttl_s, maxlen, done channel, report
# (ok|failure|rate_limited|''), pause_ms, breaker threshold, window_ms, cooldown_ms, latency
# bucket ('' = no call), latency_ms, due_after_ms, foreign_id, n_fields, field/value pairs, then
# event field/value pairs.
# Returns {1, final record or {}, circuit_change}, or {0} when the caller no longer owns the
# job (nothing is written then).
TRANSITION = (
    _PRELUDE
    + """
local rec, stream, provider, stats, due, copy = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('HGET', rec, 'lease_owner') ~= ARGV[1] then return {0} end
local old = redis.call('HGET', rec, 'state')
if final[old] then return {0} end
local due_after, fid = tonumber(ARGV[16]), ARGV[17]
local n = tonumber(ARGV[18])
local fields = {}
for i = 19, 18 + n * 2 do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', rec, 'state', ARGV[2], 'updated_at', now / 1000, unpack(fields))
move(stats, old, ARGV[2])
local mode = ARGV[3]
if mode == 'renew' then
  redis.call('HSET', rec, 'lease_until', now + tonumber(ARGV[4]))
  redis.call('ZADD', due, now + tonumber(ARGV[4]) + due_after, fid)
else
  redis.call('HDEL', rec, 'lease_owner', 'lease_until')
end
local delay = tonumber(ARGV[5])
if delay >= 0 then
  redis.call('HSET', rec, 'next_attempt_ms', now + delay, 'next_attempt_at', (now + delay) / 1000)
  redis.call('HINCRBY', stats, 'retries', 1)
  redis.call('ZADD', due, now + delay + due_after, fid)
end
if ARGV[14] ~= '' then
  redis.call('HINCRBY', stats, 'latency_bucket:' .. ARGV[14], 1)
  redis.call('HINCRBY', stats, 'latency_count', 1)
  redis.call('HINCRBYFLOAT', stats, 'latency_sum', tonumber(ARGV[15]) / 1000)
end

-- What this attempt says about the provider, for the whole fleet.
local report, threshold, change = ARGV[9], tonumber(ARGV[11]), ''
if report == 'ok' then
  local circuit = redis.call('HGET', provider, 'circuit')
  if circuit and circuit ~= 'closed' then
    redis.call('HSET', provider, 'circuit', 'closed', 'failures', 0)
    change = 'closed'
  elseif tonumber(redis.call('HGET', provider, 'failures') or '0') > 0 then
    redis.call('HSET', provider, 'failures', 0)
  end
elseif report == 'failure' and threshold > 0 then
  local circuit = redis.call('HGET', provider, 'circuit') or 'closed'
  local failures = threshold
  if circuit == 'closed' then
    local first = tonumber(redis.call('HGET', provider, 'first_failure_ms') or '0')
    if now - first > tonumber(ARGV[12]) then
      redis.call('HSET', provider, 'first_failure_ms', now, 'failures', 1)
      failures = 1
    else
      failures = redis.call('HINCRBY', provider, 'failures', 1)
    end
  end
  if circuit == 'half_open' or (circuit == 'closed' and failures >= threshold) then
    redis.call('HSET', provider, 'circuit', 'open', 'open_until', now + tonumber(ARGV[13]),
      'failures', 0)
    redis.call('HINCRBY', stats, 'circuit_opened', 1)
    change = 'open'
  end
elseif report == 'rate_limited' then
  local until_ms = now + tonumber(ARGV[10])
  if until_ms > tonumber(redis.call('HGET', provider, 'pause_until') or '0') then
    redis.call('HSET', provider, 'pause_until', until_ms)
  end
end

if mode == 'final' then
  local event = {}
  for i = 19 + n * 2, #ARGV do event[#event + 1] = ARGV[i] end
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[7], '*', unpack(event))
  redis.call('ZREM', due, fid)
  redis.call('DEL', copy)
  redis.call('EXPIRE', rec, ARGV[6])
  redis.call('PUBLISH', ARGV[8], ARGV[2])
  return {1, redis.call('HGETALL', rec), change}
end
return {1, {}, change}
"""
)

# KEYS: record, stats, due, message copy. ARGV: task_id, foreign_id. Undoes an enqueue whose
# message could not be sent.
DISCARD = """
local state, task = unpack(redis.call('HMGET', KEYS[1], 'state', 'task_id'))
if state == 'queued' and task == ARGV[1] then
  redis.call('HINCRBY', KEYS[2], 'jobs:queued', -1)
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('DEL', KEYS[4])
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: due, stats, broker queue. ARGV: key prefix, limit, due_after_ms.
# Every job that is not final has a due time in the sorted set ``due``: when it must have
# moved on if its message still exists (last step + the broker's redelivery delay). Past it,
# with no live lease and an empty queue (a backlog may still hold the message: messages wait in
# line, so only a drained queue proves it gone), the message was lost: a worker killed between
# the broker's pop and its bookkeeping, a Redis that lost writes. Returns {foreign_id, task_id,
# kwargs, ...} to send again. Record and copy keys are derived from the prefix, so this script
# needs a single Redis, not a cluster.
SWEEP = (
    _PRELUDE
    + """
local due, stats, prefix, due_after = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[3])
local out = {}
if redis.call('LLEN', KEYS[3]) > 0 then return out end
for _, fid in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, ARGV[2])) do
  local rec = prefix .. 'job:' .. fid
  local fields = redis.call('HMGET', rec, 'state', 'lease_until', 'task_id')
  local state, lease_until, task = fields[1], fields[2], fields[3]
  local body = redis.call('GET', prefix .. 'msg:' .. fid)
  if not state or final[state] or not body then
    redis.call('ZREM', due, fid)
  elseif tonumber(lease_until or '0') > now then
    redis.call('ZADD', due, tonumber(lease_until) + due_after, fid)
  else
    redis.call('ZADD', due, now + due_after, fid)
    redis.call('HINCRBY', stats, 'resent', 1)
    out[#out + 1] = fid
    out[#out + 1] = task or ''
    out[#out + 1] = body
  end
end
return out
"""
)
