-- Pending cleanups: invoices that an ambiguous attempt may have created and whose cancel has
-- not succeeded yet, although their job is final. ``take`` hands the due ones to one sweeper
-- (pushing their time back by retry_ms, a lease); ``settle`` records how a cancel went.
-- take returns {foreign_id, provider_foreign_id, tries, ...}; settle returns the new orphan value.
local cleanup_key = KEYS[1]
local stats_key = KEYS[2]
local action = ARGV[1]  -- take | settle
local retry_ms = tonumber(ARGV[2])
local prefix = CONF.prefix

local now = now_ms()
if action == 'take' then
  local limit = ARGV[3]
  local out = {}
  local due = redis.call('ZRANGEBYSCORE', cleanup_key, '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(due) do
    local record_key = prefix .. JOB_KEY .. member
    local foreign_id, provider_id, tries = unpack(redis.call('HMGET', record_key,
      'foreign_id', 'provider_foreign_id', 'cleanup_tries'))
    if not foreign_id then
      redis.call('ZREM', cleanup_key, member)  -- the record expired: nothing left to settle
    else
      redis.call('ZADD', cleanup_key, now + retry_ms, member)
      out[#out + 1] = foreign_id
      out[#out + 1] = provider_id or foreign_id
      out[#out + 1] = tries or '0'
    end
  end
  return out
end

local member = ARGV[3]
local outcome = ARGV[4]  -- cancelled | final | pending (the cancel failed again)
local max_tries = tonumber(ARGV[5])
local record_key = prefix .. JOB_KEY .. member
local tries = redis.call('HINCRBY', record_key, 'cleanup_tries', 1)
if outcome == 'pending' and tries >= max_tries then outcome = 'may_remain' end
redis.call('HSET', record_key, 'orphan', outcome)
if outcome == 'pending' then
  redis.call('ZADD', cleanup_key, now + retry_ms, member)
else
  redis.call('ZREM', cleanup_key, member)
  redis.call('HINCRBY', stats_key, 'cleanups:' .. outcome, 1)
end
return outcome
