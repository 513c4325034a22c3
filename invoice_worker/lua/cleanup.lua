-- Pending cleanups: invoices that an ambiguous attempt may have created and whose cancel has
-- not succeeded yet, although their job is final. ``take`` hands the due ones to one sweeper
-- (pushing their time back by retry_ms, a lease); ``settle`` records how a cancel went.
-- Re-run after a lost reply (same op): answers what the first run did, writes nothing.
-- take returns {foreign_id, provider_foreign_id, tries, ...}; settle returns the new orphan value.
local cleanup_key = KEYS[1]
local stats_key = KEYS[2]
local batch_key = KEYS[3]  -- take: its answer, kept for a re-run
local action = ARGV[1]  -- take | settle
local op = ARGV[2]  -- unique per call
local retry_ms = tonumber(ARGV[3])
local prefix = CONF.prefix
local ttl_s = CONF.ttl_s
local horizon_s = CONF.cleanup_horizon_s  -- how long the tries of one cleanup may take

local now = now_ms()

-- A record whose cleanup is pending must outlive it: its memory is what the cancel needs.
local function keep(record_key)
  if redis.call('TTL', record_key) < horizon_s then
    redis.call('EXPIRE', record_key, math.max(ttl_s, horizon_s))
  end
end

local function take(limit)
  local earlier = replayed(batch_key)
  if earlier then return earlier end
  local out = {}
  local due = redis.call('ZRANGEBYSCORE', cleanup_key, '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(due) do
    local record_key = prefix .. JOB_KEY .. member
    local foreign_id, provider_id, tries = unpack(redis.call('HMGET', record_key,
      'foreign_id', 'provider_foreign_id', 'cleanup_tries'))
    if not foreign_id then
      -- The record is gone, and with it which id to cancel: a human must look.
      redis.call('ZREM', cleanup_key, member)
      redis.call('HINCRBY', stats_key, 'cleanups:may_remain', 1)
    else
      redis.call('ZADD', cleanup_key, now + retry_ms, member)
      out[#out + 1] = foreign_id
      out[#out + 1] = provider_id or foreign_id
      out[#out + 1] = tries or '0'
    end
  end
  return remember(batch_key, out, retry_ms)
end

local function settle(member, outcome, max_tries)
  local record_key = prefix .. JOB_KEY .. member
  local known = redis.call('HMGET', record_key, 'state', 'cleanup_op', 'orphan')
  if known[2] == op then return known[3] end  -- a re-run after a lost reply
  if not known[1] then
    -- The record expired during the cancel: write nothing (a hash without a state would
    -- outlive it), and count what remains.
    redis.call('ZREM', cleanup_key, member)
    if outcome == 'pending' then outcome = 'may_remain' end
    redis.call('HINCRBY', stats_key, 'cleanups:' .. outcome, 1)
    return outcome
  end
  local tries = redis.call('HINCRBY', record_key, 'cleanup_tries', 1)
  if outcome == 'pending' and tries >= max_tries then outcome = 'may_remain' end
  redis.call('HSET', record_key, 'orphan', outcome, 'cleanup_op', op)
  if outcome == 'pending' then
    redis.call('ZADD', cleanup_key, now + retry_ms, member)
    keep(record_key)
  else
    redis.call('ZREM', cleanup_key, member)
    redis.call('HINCRBY', stats_key, 'cleanups:' .. outcome, 1)
  end
  return outcome
end

if action == 'take' then return take(ARGV[4]) end
return settle(ARGV[4], ARGV[5], tonumber(ARGV[6]))
