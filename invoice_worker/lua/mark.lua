-- Set bookkeeping fields that need no lease (e.g. callback_sent after a final), only on a
-- record that still exists: a write into an expired one would leave a hash without a state
-- (and without a TTL). Returns 1 when written, 0 when the record is gone.
local record_key = KEYS[1]
local pairs_ = tail(1)

if redis.call('HEXISTS', record_key, 'state') == 0 then return 0 end
redis.call('HSET', record_key, unpack(pairs_))
return 1
