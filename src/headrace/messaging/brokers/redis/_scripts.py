"""The Lua scripts of the Redis Streams broker (the package docstring has the key layout).

Why scripts: every state change that touches more than one key (a delayed retry that
leaves the stream and enters the delay set, a dead letter that leaves the stream and
enters the dead-letter stream) must be atomic, or a crash between the two steps loses
or duplicates the message; and the fetch path does its housekeeping (promote due
retries, re-deliver hand-backs, reclaim expired leases, read new entries) in one round
trip instead of four. Redis runs a script atomically and replicates its effects, so
``TIME`` inside a script is the one clock every process of the deployment shares.

Leases. Redis knows only the idle time of a pending entry (time since its last
delivery). Every consumer reclaims with the same ``XAUTOCLAIM`` min-idle-time, the
*horizon* ``H``; a delivery leased for ``L <= H`` seconds has its delivery time set
``H - L`` seconds into the past (``XCLAIM ... TIME ... JUSTID``, which counts no
delivery), so it becomes reclaimable exactly ``L`` seconds from now. Extending a lease
sets it again.

Attempts. ``attempt = a + deliveries`` where ``deliveries`` is Redis's own delivery
counter (XPENDING) and ``a`` a field of the entry (attempts spent before the entry was
added: a delayed retry is a new entry). A hand-back lowers the counter by one
(``XCLAIM ... RETRYCOUNT``) so that the re-delivery does not count.

Entry fields (short names keep the stream small): ``b`` body, ``k`` key, ``h`` headers
(JSON), ``i`` the message id when the entry is a copy (a delayed retry, a replayed dead
letter), ``a`` as above. Dead letters add ``n`` (attempt), ``e`` (error JSON), ``t``
(server time in ms).
"""

from __future__ import annotations

__all__ = ["DEAD_LETTER", "EXTEND", "FETCH", "RELEASE", "REPLAY", "RETURN"]

# Shared helpers, prepended to the scripts that use them.
_COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function deliveries(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return -1, nil end
  return tonumber(p[1][4]), p[1][2]
end

-- The delivery counter of a pending entry if `consumer` holds it, else nil.
local function held(stream, group, id, consumer)
  local count, owner = deliveries(stream, group, id)
  if owner ~= consumer then return nil end
  return count
end

-- Make the leases of `ids` expire `lease` ms from now (see the module doc).
local function set_leases(stream, group, consumer, ids, now, lease, horizon)
  if lease >= horizon then
    return
  end
  for start = 1, #ids, 1000 do
    -- unpack() expands only as the last argument, and XCLAIM wants its options
    -- after the ids: build one argument list.
    local args = {stream, group, consumer, 0}
    for j = start, math.min(#ids, start + 999) do args[#args + 1] = ids[j] end
    args[#args + 1] = 'TIME'
    args[#args + 1] = now - (horizon - lease)
    args[#args + 1] = 'JUSTID'
    redis.call('XCLAIM', unpack(args))
  end
end

-- The fields of an entry without the bookkeeping ones, its message id and base attempts.
local function split_fields(fields, id)
  local kept, base, mid = {}, 0, id
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name == 'a' then base = tonumber(fields[j + 1])
    elseif name == 'i' then mid = fields[j + 1]
    elseif name ~= 'n' and name ~= 'e' and name ~= 't' then
      kept[#kept + 1] = name; kept[#kept + 1] = fields[j + 1]
    end
  end
  return kept, base, mid
end

-- A member of the `returned` set sorts like the entry id it names.
local function returned_member(id, count)
  local dash = string.find(id, '-', 1, true)
  local ms, seq = string.sub(id, 1, dash - 1), string.sub(id, dash + 1)
  return string.rep('0', 20 - #ms) .. ms .. string.rep('0', 20 - #seq) .. seq
    .. '|' .. id .. '|' .. count
end
"""

# KEYS: stream, delayed, returned, signal
# ARGV: group, consumer, count, own_cursor ('' when done), reclaim ('1'/'0'),
#       horizon_ms, claim_cursor, promote_limit, lease_ms, trim ('1'/'0')
# Returns {own_cursor, claim_cursor, due_in_ms (-1: none), last_delivered_id,
#          signal_last_id, then per entry: id, deliveries, fields}.
FETCH = (
    _COMMON
    + r"""
local stream, delayed, returned, signal = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer = ARGV[1], ARGV[2]
local want = tonumber(ARGV[3])
local own_cursor = ARGV[4]
local horizon, lease = tonumber(ARGV[6]), tonumber(ARGV[9])
local out = {own_cursor, ARGV[7], -1, '', '0-0'}
local ids = {}
local now = now_ms()

local function last_delivered()
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1] end
      if g[j] == 'last-delivered-id' then last = g[j + 1] end
    end
    if name == group then return last end
  end
  return '0-0'
end

local function add(id, count, fields)
  out[#out + 1] = id
  out[#out + 1] = count
  out[#out + 1] = fields
  ids[#ids + 1] = id
end

-- 1. Delayed retries whose time has come go to the end of the stream.
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[8]))
for i = 1, #due do
  redis.call('XADD', stream, '*', unpack(cmsgpack.unpack(due[i])))
end
if #due > 0 then redis.call('ZREM', delayed, unpack(due)) end

-- 2. Our own pending entries, left by an earlier process with this consumer name.
if own_cursor ~= '' then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
    'STREAMS', stream, own_cursor)
  local entries = {}
  if r and r[1] then entries = r[1][2] end
  if #entries == 0 then own_cursor = '' else own_cursor = entries[#entries][1] end
  for _, e in ipairs(entries) do
    if e[2] then
      add(e[1], deliveries(stream, group, e[1]), e[2])
    else
      -- Deleted from the stream while pending: nothing left to deliver.
      redis.call('XACK', stream, group, e[1])
    end
  end
  out[1] = own_cursor
end

-- 3. Messages handed back or nacked without delay: at once, in stream order.
if #ids < want then
  local members = redis.call('ZRANGE', returned, 0, want - #ids - 1)
  for _, m in ipairs(members) do
    redis.call('ZREM', returned, m)
    local first = string.find(m, '|', 1, true)
    local second = string.find(m, '|', first + 1, true)
    local id = string.sub(m, first + 1, second - 1)
    local count = tonumber(string.sub(m, second + 1))
    -- Skip it if it was delivered again since it came back (e.g. reclaimed).
    if deliveries(stream, group, id) == count then
      local claimed = redis.call('XCLAIM', stream, group, consumer, 0, id)
      if claimed[1] and claimed[1][2] then add(id, count + 1, claimed[1][2]) end
    end
  end
end

-- 4. Expired leases of any consumer, crashed ones included.
if #ids < want and ARGV[5] == '1' then
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, horizon, ARGV[7],
    'COUNT', want - #ids)
  out[2] = r[1]
  for _, e in ipairs(r[2]) do
    if e[2] then add(e[1], deliveries(stream, group, e[1]), e[2]) end
  end
end

-- 5. New entries.
if #ids < want then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want - #ids,
    'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do add(e[1], 1, e[2]) end
  end
end

-- 6. Acked entries leave the stream: everything below the oldest entry that is still
-- pending, or not yet delivered, is acked (one group per stream). Trimming frees whole
-- stream nodes, far cheaper than an XDEL per ack.
if ARGV[10] == '1' then
  local floor = redis.call('XPENDING', stream, group)[2]
  if not floor then
    local last = last_delivered()
    local dash = string.find(last, '-', 1, true)
    floor = string.sub(last, 1, dash) .. (tonumber(string.sub(last, dash + 1)) + 1)
  end
  redis.call('XTRIM', stream, 'MINID', floor)
end

if #ids > 0 then
  set_leases(stream, group, consumer, ids, now, lease, horizon)
else
  -- Nothing to deliver: tell the caller what to wait for.
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if first[2] then out[3] = math.max(0, tonumber(first[2]) - now) end
  out[4] = last_delivered()
  local s = redis.call('XREVRANGE', signal, '+', '-', 'COUNT', 1)
  if s[1] then out[5] = s[1][1] end
end
return out
"""
)

# KEYS: stream, delayed, returned, signal
# ARGV: group, consumer, mode ('h' hand back, 'n' nack), delay_ms, horizon_ms,
#       then pairs of entry id and the delivery counter the caller holds.
# Returns how many entries were returned (the others were no longer held).
RETURN = (
    _COMMON
    + r"""
local stream, delayed, returned, signal = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer, mode = ARGV[1], ARGV[2], ARGV[3]
local delay, horizon = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local done = 0
for i = 6, #ARGV, 2 do
  local id, expected = ARGV[i], tonumber(ARGV[i + 1])
  if held(stream, group, id, consumer) == expected then
    if mode == 'n' and delay > 0 then
      -- Leave the stream for the delay set: nobody may reclaim it meanwhile.
      local e = redis.call('XRANGE', stream, id, id)
      if e[1] then
        local kept, base, mid = split_fields(e[1][2], id)
        kept[#kept + 1] = 'i'; kept[#kept + 1] = mid
        kept[#kept + 1] = 'a'; kept[#kept + 1] = base + expected
        redis.call('ZADD', delayed, now + delay, cmsgpack.pack(kept))
      end
      redis.call('XACK', stream, group, id)
      redis.call('XDEL', stream, id)
    else
      -- Stay pending (the entry keeps its id and its place) and be claimed at once;
      -- expire the lease too, so that a reclaim finds it if the returned set does not.
      local count = expected
      if mode == 'h' then count = expected - 1 end
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'TIME', now - horizon,
        'RETRYCOUNT', count, 'JUSTID')
      redis.call('ZADD', returned, 0, returned_member(id, count))
    end
    done = done + 1
  end
end
if done > 0 then
  -- Wake fetches blocked on this topic: they re-plan (returned now, or a new due time).
  redis.call('XADD', signal, 'MAXLEN', 1, '*', 's', '1')
end
return done
"""
)

# KEYS: stream, dead
# ARGV: group, consumer, entry id, delivery counter held, attempt, error JSON
# Returns 1 if dead-lettered, 0 if the entry was no longer held by this delivery.
DEAD_LETTER = (
    _COMMON
    + r"""
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
if held(stream, group, id, consumer) ~= tonumber(ARGV[4]) then return 0 end
local e = redis.call('XRANGE', stream, id, id)
if e[1] then
  local kept, base, mid = split_fields(e[1][2], id)
  kept[#kept + 1] = 'i'; kept[#kept + 1] = mid
  kept[#kept + 1] = 'n'; kept[#kept + 1] = ARGV[5]
  kept[#kept + 1] = 'e'; kept[#kept + 1] = ARGV[6]
  kept[#kept + 1] = 't'; kept[#kept + 1] = now_ms()
  redis.call('XADD', dead, '*', unpack(kept))
end
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
if e[1] then return 1 end
return 0
"""
)

# KEYS: stream
# ARGV: group, consumer, lease_ms, horizon_ms, then pairs of entry id and counter held.
EXTEND = (
    _COMMON
    + r"""
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local lease, horizon = tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = {}
for i = 5, #ARGV, 2 do
  if held(stream, group, ARGV[i], consumer) == tonumber(ARGV[i + 1]) then
    ids[#ids + 1] = ARGV[i]
  end
end
if #ids > 0 then
  local now = now_ms()
  if lease >= horizon then
    -- A full horizon: a plain re-claim to ourselves resets the idle time to zero.
    set_leases(stream, group, consumer, ids, now, horizon - 1, horizon)
  else
    set_leases(stream, group, consumer, ids, now, lease, horizon)
  end
end
return #ids
"""
)

# KEYS: stream, dead ; ARGV: dead-letter entry ids. Re-adds them as fresh messages.
REPLAY = (
    _COMMON
    + r"""
local stream, dead = KEYS[1], KEYS[2]
local done = 0
for _, id in ipairs(ARGV) do
  local e = redis.call('XRANGE', dead, id, id)
  if e[1] then
    local kept, base, mid = split_fields(e[1][2], id)
    kept[#kept + 1] = 'i'; kept[#kept + 1] = mid
    redis.call('XADD', stream, '*', unpack(kept))
    redis.call('XDEL', dead, id)
    done = done + 1
  end
end
return done
"""
)

# KEYS: stream ; ARGV: group, consumer. Forget this consumer if it holds nothing.
RELEASE = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
