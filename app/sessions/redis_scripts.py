"""The Lua scripts of `RedisSessionStore` (app/sessions/redis.py). Each runs atomically in Redis, so a write
that touches several keys of a session is whole or absent, and a turn's start and end are one round trip each.
All of a session's keys share its `{id}` hash tag, so every script stays in one cluster slot."""

# KEYS: meta. ARGV: ttl_ms, then field, value pairs. A script (not MULTI) so a WAIT can follow it in one pipeline.
CREATE_LUA = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: meta, turns. ARGV: ttl_ms, first index (0, or -N for the last N). Returns nil for an unknown session,
# else the turns (oldest first).
HISTORY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('LRANGE', KEYS[2], ARGV[2], -1)
"""

# KEYS: meta, turns. ARGV: turn json, max_turns, ttl_ms. Returns -1 for an unknown session, else turn_count.
# Idempotent: when the client re-sends after a connection dropped before the reply, the turn is not doubled.
APPEND_FUNCTION = """
local function append()
  if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  if redis.call('LINDEX', KEYS[2], -1) == ARGV[1] then return tonumber(redis.call('HGET', KEYS[1], 'turn_count')) end
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  local turn_count = redis.call('HINCRBY', KEYS[1], 'turn_count', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return turn_count
end
"""
APPEND_LUA = APPEND_FUNCTION + "return append()"

# KEYS: meta, turns. ARGV: turn id, substring prefilter ('' = none), feedback json, ttl_ms.
# Returns -1 unknown session, 0 unknown turn, 1 updated, -2 stored turn not in our encoding.
# The turn is patched as a string instead of decode/encode with cjson, which would round floats
# (created_at) and turn empty JSON arrays into objects. `_encode_turn` guarantees "feedback" comes last.
SET_FEEDBACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local turns = redis.call('LRANGE', KEYS[2], 0, -1)
for index, raw in ipairs(turns) do
  if string.find(raw, ARGV[2], 1, true) then
    local ok, turn = pcall(cjson.decode, raw)
    if ok and turn['id'] == ARGV[1] then
      local patched, replaced = string.gsub(raw, ',"feedback":[%-%w]*}$', ',"feedback":' .. ARGV[3] .. '}')
      if replaced ~= 1 then return -2 end
      redis.call('LSET', KEYS[2], index - 1, patched)
      redis.call('PEXPIRE', KEYS[1], ARGV[4])
      redis.call('PEXPIRE', KEYS[2], ARGV[4])
      return 1
    end
  end
end
return 0
"""

# A fair (FIFO) lock. KEYS: lock, queue (zset token -> arrival number), beats (zset token -> deadline ms),
# arrival counter. ARGV: token, lock_ttl_ms, waiter_ttl_ms. Each poll enqueues the caller once, refreshes its
# heartbeat, drops waiters whose heartbeat ran out, and takes the lock only for the head of the queue.
# Runs `{acquired}` when the caller now holds the lock; returns 0 otherwise.
LOCK_ACQUIRE_BODY = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, waiter in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], waiter)
  redis.call('ZREM', KEYS[3], waiter)
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] == ARGV[1] and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  {acquired}
end
return 0
"""
# Returns 1 when the caller now holds the lock.
LOCK_ACQUIRE_LUA = LOCK_ACQUIRE_BODY.replace("{acquired}", "return 1")

# A turn's start in one round trip: the session check, the lock, and the history read.
# KEYS: lock, queue, beats, arrival counter, meta, turns. ARGV: token, lock_ttl_ms, waiter_ttl_ms, ttl_ms,
# first index (as HISTORY_LUA), owner ('' = none), check owner ('1'). Returns -1 (unknown session, or not
# the owner's: nothing is queued then), 0 (lock busy: poll again), or {1, turns oldest first}.
OPEN_TURN_LUA = """
if redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
if ARGV[7] == '1' and (redis.call('HGET', KEYS[5], 'owner') or '') ~= ARGV[6] then return -1 end
""" + LOCK_ACQUIRE_BODY.replace(
    "{acquired}",
    """redis.call('PEXPIRE', KEYS[5], ARGV[4])
  redis.call('PEXPIRE', KEYS[6], ARGV[4])
  return {1, redis.call('LRANGE', KEYS[6], ARGV[5], -1)}""",
)

# KEYS: lock. ARGV: token, lock_ttl_ms. Returns 1 while the caller still holds the lock.
LOCK_RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Leaves the queue and releases the lock if the caller holds it (the keys and the token are filled in).
LOCK_RELEASE_TEMPLATE = """
redis.call('ZREM', {queue}, {token})
redis.call('ZREM', {beats}, {token})
if redis.call('GET', {lock}) == {token} then redis.call('DEL', {lock}) end
"""
# KEYS: lock, queue, beats. ARGV: token.
LOCK_RELEASE_LUA = (
    LOCK_RELEASE_TEMPLATE.format(lock="KEYS[1]", queue="KEYS[2]", beats="KEYS[3]", token="ARGV[1]") + "return 1"
)

# A turn's end in one round trip: append (as APPEND_LUA), then release (as LOCK_RELEASE_LUA).
# KEYS: meta, turns, lock, queue, beats. ARGV: turn json, max_turns, ttl_ms, token. Returns as APPEND_LUA.
COMMIT_TURN_LUA = (
    APPEND_FUNCTION
    + "local turn_count = append()\n"
    + LOCK_RELEASE_TEMPLATE.format(lock="KEYS[3]", queue="KEYS[4]", beats="KEYS[5]", token="ARGV[4]")
    + "return turn_count"
)
