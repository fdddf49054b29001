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
# Returns {1, entry_id, seq} when stored now (seq as stored: the caller's, else assigned here),
# {0, entry_id of the first copy, its field/value list} for a duplicate (empty once trimmed away),
# so a commit learns what is stored in one round trip.
APPEND_BODY = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  local e = redis.call('XRANGE', KEYS[2], existing, existing)
  if e[1] then return {0, existing, e[1][2]} end
  return {0, existing, {}}
end

local final = ARGV[2] == '1'
local ttl = tonumber(ARGV[4])
local now = now_ms()
local nows = string.format('%d', now)

local fields = {}
for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
local seq = ''
if ARGV[12] ~= '1' then
  seq = tostring(redis.call('INCR', KEYS[9]))
  fields[#fields + 1] = 'seq'
  fields[#fields + 1] = seq
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
return {1, id, seq}
"""
APPEND = _FMT + APPEND_BODY

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

# KEYS: 1 speakers, 2 conversations index, 3.. every other key of the conversation.
# ARGV: 1 conversation id, 2 number of speakers the caller listed.
# Returns 1 deleted, 0 nothing to delete, -1 a speaker appeared meanwhile (list again and retry).
DELETE = """
if redis.call('SCARD', KEYS[1]) ~= tonumber(ARGV[2]) then return -1 end
local n = 0
for i = 3, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
n = n + redis.call('DEL', KEYS[1])
n = n + redis.call('ZREM', KEYS[2], ARGV[1])
if n > 0 then return 1 end
return 0
"""

# The escalation rule (tracker.alerts.rule, which is its reference in Python), applied to one final.
# KEYS: 1 speaker alert state, 2 conversation alerts stream, 3 outbox stream.
# ARGV: 1 seq, 2 utterance id, 3 label, 4 negative (1/0), 5 window, 6 raise at, 7 clear at, 8 ttl s,
#       9 alerts maxlen, 10 write outbox (1/0), 11 outbox maxlen, 12 tenant, 13 conversation id, 14 speaker
# Returns {0, raised} when nothing changed or the final was already applied (seq <= last_seq),
# else {1, raised, kind, alert_id, entry_id, at_ms, negative, labels_json}.
ALERT_STEP_BODY = """
local seq = tonumber(ARGV[1])
local last = redis.call('HGET', KEYS[1], 'last_seq')
local raised = redis.call('HGET', KEYS[1], 'raised') == '1'
if last and seq <= tonumber(last) then return {0, raised and 1 or 0} end

local window = tonumber(ARGV[5])
local labels, negs = {}, {}
local old_labels = redis.call('HGET', KEYS[1], 'labels')
local old_negs = redis.call('HGET', KEYS[1], 'negative')
if old_labels then labels = cjson.decode(old_labels); negs = cjson.decode(old_negs) end
labels[#labels + 1] = ARGV[3]
negs[#negs + 1] = tonumber(ARGV[4])
while #labels > window do table.remove(labels, 1); table.remove(negs, 1) end
local n = 0
for _, v in ipairs(negs) do n = n + v end

local kind = nil
if (not raised) and n >= tonumber(ARGV[6]) then kind = 'raised'; raised = true
elseif raised and n <= tonumber(ARGV[7]) then kind = 'cleared'; raised = false end

local ttl = tonumber(ARGV[8])
local labels_json = cjson.encode(labels)
-- cjson encodes an empty table as {} ; the window always holds the current label, so never empty
redis.call('HSET', KEYS[1], 'labels', labels_json, 'negative', cjson.encode(negs), 'raised', raised and '1' or '0',
           'last_seq', ARGV[1], 'last_utterance_id', ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
if not kind then return {0, raised and 1 or 0} end

local now = now_ms()
local nows = string.format('%d', now)
local alert_id = redis.sha1hex(ARGV[12] .. '\\31' .. ARGV[13] .. '\\31' .. ARGV[14] .. '\\31' .. ARGV[2] .. '\\31' .. kind)
local fields = {'alert_id', alert_id, 'kind', kind, 'speaker', ARGV[14], 'utterance_id', ARGV[2], 'seq', ARGV[1],
                'negative', tostring(n), 'window', ARGV[5], 'labels', labels_json, 'at_ms', nows}
if raised then redis.call('HSET', KEYS[1], 'since_utterance_id', ARGV[2], 'since_seq', ARGV[1], 'since_ms', nows)
else redis.call('HDEL', KEYS[1], 'since_utterance_id', 'since_seq', 'since_ms') end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', unpack(fields))
redis.call('EXPIRE', KEYS[2], ttl)
if ARGV[10] == '1' then
  fields[#fields + 1] = 'tenant'; fields[#fields + 1] = ARGV[12]
  fields[#fields + 1] = 'conversation_id'; fields[#fields + 1] = ARGV[13]
  fields[#fields + 1] = 'entry_id'; fields[#fields + 1] = id
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[11], '*', unpack(fields))
end
return {1, raised and 1 or 0, kind, alert_id, id, nows, n, labels_json}
"""
ALERT_STEP = _FMT + ALERT_STEP_BODY

# Speaker normalisation state (tracker.context.speaker_norm): add one utterance to a speaker's stats, once.
# KEYS: 1 the speaker's norm hash. ARGV: 1 utterance id, 2 the `last` the caller read ('' = none), 3 ttl s,
#       4.. (modality, stats after, stats before) triples.
# Returns 1 stored, 0 this utterance was the last added already (a retry), -1 another utterance went first.
NORM_COMMIT_BODY = """
local last = redis.call('HGET', KEYS[1], 'last') or ''
if last == ARGV[1] then return 0 end
if last ~= ARGV[2] then return -1 end
for i = 4, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], 'prev:' .. ARGV[i], ARGV[i + 2])
end
redis.call('HSET', KEYS[1], 'last', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
NORM_COMMIT = NORM_COMMIT_BODY

# A result committed in one script (one round trip, atomic): the append above, then, when it
# stored the record now, the speaker-normalisation write (norm_commit, when given) and, when ARGV[2]
# is 1, the escalation rule's step with the seq the append used. A duplicate (a retried commit)
# writes nothing more and returns the record stored first (as the append does) and the event the
# first commit caused, if any, from the alert stream.
# KEYS: 1..9 the append's, then 10..12 the alert step's (when stepping), then the norm hash (when m > 0).
# ARGV: 1 number of append args (n), 2 step (1/0), 3 number of norm args (m, 0 = none),
#       4..n+3 the append's ARGV, then the m norm_commit ARGV, then the alert step's ARGV 2.. (its
#       seq, ARGV 1, is the append's) and the record's own seq ('' if none).
# Returns {stored, entry_id, seq (stored now) or the first copy's field/value list (a duplicate),
# norm (1 written, 0 nothing to write or a retry, -1 another utterance went first), changed, raised,
# kind, alert_id, alert_entry_id, at_ms, negative, labels_json} (fields after `changed` only when it is 1).
COMMIT = (
    _FMT
    + "local function append_record(KEYS, ARGV)\n" + APPEND_BODY + "\nend\n"
    + "local function alert_step(KEYS, ARGV)\n" + ALERT_STEP_BODY + "\nend\n"
    + "local function norm_commit(KEYS, ARGV)\n" + NORM_COMMIT_BODY + "\nend\n"
    + """
local n, step, m = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local akeys, aargv = {}, {}
for i = 1, 9 do akeys[i] = KEYS[i] end
for i = 1, n do aargv[i] = ARGV[i + 3] end
local r = append_record(akeys, aargv)
local a = n + m + 4  -- the alert step's first arg
if r[1] == 0 then
  if step then
    -- a duplicate: the event this final caused the first time, if any (it is among the newest)
    local recent = redis.call('XREVRANGE', KEYS[11], '+', '-', 'COUNT', 16)
    for _, e in ipairs(recent) do
      local f = {}
      for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
      if f['utterance_id'] == ARGV[a] and f['speaker'] == ARGV[a + 12] then
        return {0, r[2], r[3], 0, 1, f['kind'] == 'raised' and 1 or 0, f['kind'], f['alert_id'], e[1], f['at_ms'],
                tonumber(f['negative']), f['labels']}
      end
    end
  end
  return {0, r[2], r[3], 0}
end
local nr = 0
if m > 0 then
  local nargv = {}
  for i = 1, m do nargv[i] = ARGV[n + 3 + i] end
  nr = norm_commit({KEYS[#KEYS]}, nargv)
end
if not step then return {1, r[2], r[3], nr} end
local seq = r[3]
if seq == '' then seq = ARGV[a + 13] end  -- the record brought its seq: the caller passed it
local sargv = {seq}
for i = a, #ARGV - 1 do sargv[#sargv + 1] = ARGV[i] end
local s = alert_step({KEYS[10], KEYS[11], KEYS[12]}, sargv)
local out = {1, r[2], seq, nr}
for i = 1, #s do out[#out + 1] = s[i] end
return out
"""
)

SCRIPTS: dict[str, str] = {"append": APPEND, "end": END, "next_seq": NEXT_SEQ, "delete": DELETE, "alert_step": ALERT_STEP,
                           "commit": COMMIT, "norm_commit": NORM_COMMIT}
