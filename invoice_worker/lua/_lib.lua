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
