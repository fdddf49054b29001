"""Lua scripts run server-side so that each write is all-or-nothing.

Redis runs a script atomically: no other command interleaves, so concurrent retries of the same
utterance see the idempotency field set by whichever got there first, and a client crash between
commands cannot leave a half-written record. Times come from the server's TIME so that replicas
on different machines agree on ordering (scripts are replicated by effects since Redis 5).
"""

from __future__ import annotations

# Format a double so that tonumber() gives it back exactly, preferring the shortest form.
_FMT = """
local function fmt(x)
  for _, p in ipairs({'%.15g', '%.16g', '%.17g'}) do
    local s = string.format(p, x)
    if tonumber(s) == x then return s end
  end
  return string.format('%.17g', x)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: 1 ids, 2 stream, 3 meta, 4 speakers, 5 conversations, 6 spk counts, 7 spk recent,
#       8 spk state, 9 seq
# ARGV: 1 idempotency field, 2 is_final (1/0), 3 stream maxlen, 4 ttl s, 5 recent n, 6 alpha,
#       7 speaker, 8 label, 9 score, 10 conversation id, 11 label set, 12 has seq (1/0),
#       13.. stream field/value pairs
# Returns {1, entry_id} when stored now, {0, entry_id of the first copy} for a duplicate.
APPEND = (
    _FMT
    + """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, existing} end

local final = ARGV[2] == '1'
local ttl = tonumber(ARGV[4])
local now = now_ms()
local nows = string.format('%d', now)

local fields = {}
for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[12] ~= '1' then
  fields[#fields + 1] = 'seq'
  fields[#fields + 1] = tostring(redis.call('INCR', KEYS[9]))
  redis.call('EXPIRE', KEYS[9], ttl)
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('HSET', KEYS[1], ARGV[1], id)

redis.call('HSETNX', KEYS[3], 'created_at', nows)
redis.call('HSETNX', KEYS[3], 'label_set', ARGV[11])
redis.call('HSET', KEYS[3], 'updated_at', nows, 'status', 'live', 'last_entry_id', id)
redis.call('HINCRBY', KEYS[3], 'n_entries', 1)
if final then
  redis.call('HINCRBY', KEYS[3], 'n_final', 1)
else
  redis.call('HSETNX', KEYS[3], 'n_final', '0')
end
redis.call('SADD', KEYS[4], ARGV[7])
redis.call('ZADD', KEYS[5], now, ARGV[10])
-- forget conversations whose keys have expired (nothing was appended for a whole TTL)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. string.format('%d', now - ttl * 1000))
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end

if final then
  redis.call('HINCRBY', KEYS[6], ARGV[8], 1)
  redis.call('LPUSH', KEYS[7], ARGV[8])
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[5]) - 1)
  local alpha = tonumber(ARGV[6])
  local score = tonumber(ARGV[9])
  local old = redis.call('HGET', KEYS[8], 'trend')
  local trend = score
  if old then trend = alpha * score + (1 - alpha) * tonumber(old) end
  redis.call('HSET', KEYS[8], 'trend', fmt(trend), 'last_label', ARGV[8], 'last_score', ARGV[9],
             'updated_at', nows)
  redis.call('HINCRBY', KEYS[8], 'n_final', 1)
  for i = 6, 8 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return {1, id}
"""
)

# KEYS: 1 meta, 2 conversations. ARGV: 1 conversation id. Returns 1, or 0 if unknown.
# TTLs are left alone: the conversation expires a TTL after its last utterance, as a whole.
END = (
    _FMT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = now_ms()
local nows = string.format('%d', now)
redis.call('HSET', KEYS[1], 'status', 'ended', 'ended_at', nows, 'updated_at', nows)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
"""
)

# KEYS: 1 seq. ARGV: 1 ttl s. INCR and refresh the TTL together.
NEXT_SEQ = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return n
"""

SCRIPTS: dict[str, str] = {"append": APPEND, "end": END, "next_seq": NEXT_SEQ}
