-- Undo an enqueue whose message could not be sent (only while still queued by that task).
local record_key = KEYS[1]
local stats_key = KEYS[2]
local due_key = KEYS[3]
local copy_key = KEYS[4]
local task_id = ARGV[1]
local due_member = ARGV[2]

local state, owner_task = unpack(redis.call('HMGET', record_key, 'state', 'task_id'))
if state ~= 'queued' or owner_task ~= task_id then return 0 end
redis.call('HINCRBY', stats_key, 'jobs:queued', -1)
redis.call('ZREM', due_key, due_member)
redis.call('DEL', copy_key)
return redis.call('DEL', record_key)
