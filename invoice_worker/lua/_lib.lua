-- Shared by every script: the store prepends this (after a header that defines FINAL, the
-- table of final states, and the key suffixes JOB_KEY and COPY_KEY, from constants.py).
-- luacheck: no unused

-- Milliseconds on Redis' own clock, so workers on different hosts agree on leases and slots.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- Keep the jobs-by-state gauges: the old state loses one, the new one gains one.
local function move(stats, old, new)
  if old == new then return end
  if old and not FINAL[old] then redis.call('HINCRBY', stats, 'jobs:' .. old, -1) end
  if FINAL[new] then
    redis.call('HINCRBY', stats, 'final:' .. new, 1)
  else
    redis.call('HINCRBY', stats, 'jobs:' .. new, 1)
  end
end

-- ARGV[first..] as a list (field/value pairs), without unpack's stack limit surprises.
local function tail(first, last)
  local out = {}
  for i = first, last or #ARGV do out[#out + 1] = ARGV[i] end
  return out
end

-- A decoded fields_json() argument (field -> value, strings) as a field/value list.
local function field_list(values)
  local out = {}
  for name, value in pairs(values) do
    out[#out + 1] = name
    out[#out + 1] = value
  end
  return out
end

-- A script's answer kept under batch_key for ttl_ms, so a re-run after a lost reply (redis-py
-- re-sends the script) answers the same: replayed() gives it back, or nil on a first run.
local function replayed(batch_key)
  if redis.call('EXISTS', batch_key) == 0 then return nil end
  return redis.call('LRANGE', batch_key, 0, -1)
end

local function remember(batch_key, out, ttl_ms)
  if #out > 0 then
    redis.call('RPUSH', batch_key, unpack(out))
    redis.call('PEXPIRE', batch_key, ttl_ms)
  end
  return out
end
