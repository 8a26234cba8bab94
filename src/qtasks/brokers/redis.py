"""The Redis broker: crash-safe claims, priorities across all workers, blocking waits.

How a message lives (keys in `qtasks._redis.Keys`, all under the app's `{namespace}` hash
tag; every change is one Lua script, so it is atomic and one round trip):

* A message id is `<created_at in µs, 16 digits>:<task uuid>`; its body is in the `bodies`
  hash. Ready messages sit in a sorted set per queue scored by priority; members with
  equal scores sort bytewise, so `ZPOPMIN` hands out the lowest priority number first and
  then the oldest. The order is Redis's, the same for every worker; a fetch from several
  queues merges their heads in the script.
* Claiming (`fetch`) moves messages from the ready set into the consumer's own `inflight`
  hash (id → deliveries, priority, queue) and returns their bodies. A message stays in
  Redis until acked; nothing lives only in a worker's memory.
* Liveness is a heartbeat, not a visibility timeout: every consumer has a score in the
  `consumers` sorted set (Redis `TIME`), refreshed by each claim and by a THREAD with its
  own blocking client, so a task that blocks the event loop cannot make a live worker look
  dead. Every consumer's thread also sweeps: a consumer silent for
  `worker_lost_after_seconds` has its in-flight messages put back (delivery counts kept).
  A live worker's long task is never taken from it, however long it runs. `stop()` gives
  back its own claims at once, as if never delivered.
* A claim whose reply is lost (connection dropped, caller cancelled) may have run: the
  next fetch first reconciles the in-flight hash with what this process holds and gives
  back the rest, and `stop()` gives back everything anyway.
* Delayed messages (`eta`) sit in a sorted set per queue scored by their due time on
  REDIS's clock (`TIME` plus the delay the producer asked for), so producers' clocks do
  not matter; each claim first moves the due ones to the ready set.
* Idle consumers block on the server, never sleep-poll: a publish pushes wake tokens onto
  the queue's `wake` list (one per message, capped at 128, so the list stays tiny) and an
  idle consumer sends `BLPOP` on its queues' lists and, in the same pipeline, the claim
  script: a wake costs no extra round trip. The BLPOP timeout is the fetch timeout or the
  next due time, whichever is first. A claim that finds nothing deletes the (stale)
  tokens of its queues, so leftover tokens never cause spinning. `stop()` wakes its own
  blocked fetch through a per-consumer list.
* Dead letters (messages set aside for an operator) live per queue in the `dead` hash
  (uuid → msgpack of the `DeadLetter`) and the `dead_at` sorted set (uuid → dead_at).
  `dead_letter` is `ack`'s script plus the letter's write, so the claim ends and the
  letter appears atomically; each write trims its queue's letters older than
  `dead_letter_ttl_seconds` and refreshes both keys' TTL, so they vanish once unused.
* `ack`, `release` and `requeue` are one script call per batch (1000 messages per call).
  `enqueue` writes the task record (`SET NX`) and the message in the same script when the
  storage is a RedisStorage on the same link; concurrent calls are coalesced into few
  script calls (automatic pipelining, `qtasks._redis.Batcher`). A record that exists
  already marks a retried enqueue, whose message is not enqueued twice.
* On a Redis Cluster whose slot is being migrated, every writing script is all-or-nothing:
  it reads what it needs and touches (`EXISTS`) every key it will write before its first
  write, and a key it may empty gets one deleting call, its last (`qtasks._redis.TOUCH`).
  A key that moved already stops the script there, with nothing written, and the link
  runs it again once the migration is over; Lua has no rollback, so a script stopped
  half way could have taken a message out of one structure and not put it in the next.
* Redis errors are raised as `BrokerError` naming the URL without its password. Idempotent
  calls (enqueue, ack, release, requeue) are retried on connection errors with backoff
  (about 1.5 s); a failed fetch is retried by the worker's fetch loop, so a worker resumes
  by itself once Redis is back.

Why sorted sets and hashes, not streams or lists: a stream is FIFO (priorities would need
a stream per level, read in turn by every worker), and its pending entries are reclaimed
by idle time, which is a visibility timeout: a live worker's long task would be taken
unless it kept re-claiming it. Lists (`LMOVE` to a processing list) order only by arrival
and make every ack an O(n) `LREM`. A sorted set gives priority-then-age order in one
structure with O(log n) claims, and the per-consumer hash makes acks, give-backs and the
sweep cheap and exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks._redis import (
    BLOCKING_READ_MARGIN_SECONDS,
    DEFAULT_NAMESPACE,
    DEFAULT_URL,
    TOUCH,
    Batcher,
    Packed,
    RedisComponent,
    Script,
    bulk,
    script,
    with_host,
)
from qtasks.errors import BrokerError, QTasksError
from qtasks.interfaces import Broker, Delivery, QueueStats, Storage
from qtasks.message import DeadLetter, Envelope, Task
from qtasks.runtime.heartbeat import HeartbeatThread
from qtasks.storages.redis import RedisStorage

if TYPE_CHECKING:
    import redis

    from qtasks.config import QueueConfig

from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)

log = logging.getLogger(__name__)

MAX_BATCH = 1000
"""Most messages one script call handles (Lua's unpack() limit is a few thousand)."""
WAKE_TOKENS_MAX = 128

_WAKE = (
    TOUCH
    + """
local function wake(key, count)
  local room = WAKE_TOKENS_MAX - redis.call('LLEN', key)
  if room <= 0 then return end
  if count > room then count = room end
  local tokens = {}
  for j = 1, count do tokens[j] = '1' end
  redis.call('RPUSH', key, unpack(tokens))
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
""".replace("WAKE_TOKENS_MAX", str(WAKE_TOKENS_MAX))
)

ENQUEUE = script(
    "enqueue",
    _WAKE
    + """
-- KEYS[1] bodies; ARGV[1] key prefix, ARGV[2] record key prefix, then 6 per message:
-- queue ('' = a record only), priority, message id (`<digits>:<uuid>`; for a record
-- only, the uuid), delay seconds ('' = due now), body, record ('' = none). A record that
-- exists already marks a retried enqueue: its message is not enqueued twice.
-- Per message only the record's SET NX is its own call: bodies and ready messages are
-- written by one HSET and one ZADD per queue (a call costs more than the work it does).
local t = false  -- Redis's clock, read only if a message is delayed
local rp = ARGV[2]
local keys, seen, recs = {}, {}, {}
for i = 3, #ARGV, 6 do
  local q, mid, rec = ARGV[i], ARGV[i + 2], ARGV[i + 5]
  if rec ~= '' then
    local key = q == '' and rp .. mid or rp .. string.sub(mid, string.find(mid, ':', 1, true) + 1)
    recs[i] = key
    keys[#keys + 1] = key
  end
  if rec == '' or q ~= '' then
    local delay = tonumber(ARGV[i + 3])
    add_key(keys, seen, ARGV[1] .. (delay and delay > 0 and 'delayed:' or 'ready:') .. q)
    add_key(keys, seen, ARGV[1] .. 'wake:' .. q)
  end
end
touch(keys)
local bodies, nb = {}, 0
local ready, delayed, added = {}, {}, {}
local n = 0
for i = 3, #ARGV, 6 do
  local q, mid, rec = ARGV[i], ARGV[i + 2], ARGV[i + 5]
  local fresh
  if rec == '' then
    fresh = redis.call('HSETNX', KEYS[1], mid, ARGV[i + 4]) == 1
  elseif q == '' then
    redis.call('SET', recs[i], rec)
    fresh = false
  else
    fresh = redis.call('SET', recs[i], rec, 'NX')
    if fresh then
      bodies[nb + 1] = mid
      bodies[nb + 2] = ARGV[i + 4]
      nb = nb + 2
    end
  end
  if fresh then
    n = n + 1
    local delay = tonumber(ARGV[i + 3])
    if delay and delay > 0 then
      if not t then t = now() end
      local d = delayed[q]
      if not d then d = {}; delayed[q] = d end
      d[#d + 1] = t + delay
      d[#d + 1] = ARGV[i + 1] .. ':' .. mid
    else
      local r = ready[q]
      if not r then r = {0}; ready[q] = r end
      local m = r[1]
      r[m + 2] = ARGV[i + 1]
      r[m + 3] = mid
      r[1] = m + 2
    end
    added[q] = (added[q] or 0) + 1
  end
end
if nb > 0 then redis.call('HSET', KEYS[1], unpack(bodies, 1, nb)) end
for q, r in pairs(ready) do redis.call('ZADD', ARGV[1] .. 'ready:' .. q, unpack(r, 2, r[1] + 1)) end
for q, args in pairs(delayed) do redis.call('ZADD', ARGV[1] .. 'delayed:' .. q, unpack(args)) end
for q, count in pairs(added) do wake(ARGV[1] .. 'wake:' .. q, count) end
return n
""",
)

CLAIM = script(
    "claim",
    _WAKE
    + """
-- KEYS[1] consumers, KEYS[2] my inflight, KEYS[3] bodies, KEYS[4] counts;
-- queue i: KEYS[3i+2] ready, KEYS[3i+3] delayed, KEYS[3i+4] wake
-- ARGV[1] consumer id, ARGV[2] max count, ARGV[2+i] name of queue i
-- Returns {0, id, priority, queue index, deliveries, body, ...} or {ms until the next
-- delayed message is due, or -1}.
local t = now()
redis.call('ZADD', KEYS[1], t, ARGV[1])
local nq = (#KEYS - 4) / 3
local want = tonumber(ARGV[2])
for i = 1, nq do
  local due = redis.call('ZRANGEBYSCORE', KEYS[3 * i + 3], '-inf', t, 'LIMIT', 0, 1000)
  if #due > 0 then
    local args = {}
    for _, m in ipairs(due) do
      local sep = string.find(m, ':', 1, true)
      args[#args + 1] = string.sub(m, 1, sep - 1)
      args[#args + 1] = string.sub(m, sep + 1)
    end
    redis.call('ZADD', KEYS[3 * i + 2], unpack(args))
    redis.call('ZREM', KEYS[3 * i + 3], unpack(due))
  end
end
local picked = {}
if nq == 1 then
  local r = redis.call('ZPOPMIN', KEYS[5], want)
  for j = 1, #r, 2 do picked[#picked + 1] = {r[j], r[j + 1], 1} end
else
  local cand = {}
  for i = 1, nq do
    local r = redis.call('ZRANGE', KEYS[3 * i + 2], 0, want - 1, 'WITHSCORES')
    for j = 1, #r, 2 do
      local created = tonumber(string.sub(r[j], 1, 16)) or 0
      cand[#cand + 1] = {r[j], r[j + 1], i, tonumber(r[j + 1]), created}
    end
  end
  -- priority, then creation time, then id (numbers first: Lua compares strings by locale)
  table.sort(cand, function(a, b)
    if a[4] ~= b[4] then return a[4] < b[4] end
    if a[5] ~= b[5] then return a[5] < b[5] end
    return a[1] < b[1]
  end)
  local byq = {}
  for j = 1, math.min(want, #cand) do
    local c = cand[j]
    picked[#picked + 1] = c
    local l = byq[c[3]]
    if not l then l = {}; byq[c[3]] = l end
    l[#l + 1] = c[1]
  end
  for i, l in pairs(byq) do redis.call('ZREM', KEYS[3 * i + 2], unpack(l)) end
end
local n = #picked
if n == 0 then
  local nxt = false
  for i = 1, nq do
    redis.call('DEL', KEYS[3 * i + 4])
    local f = redis.call('ZRANGE', KEYS[3 * i + 3], 0, 0, 'WITHSCORES')
    if #f > 0 then
      local e = tonumber(f[2])
      if not nxt or e < nxt then nxt = e end
    end
  end
  if not nxt then return {-1} end
  local ms = math.ceil((nxt - t) * 1000)
  if ms < 0 then ms = 0 end
  return {ms}
end
local mids = {}
for j = 1, n do mids[j] = picked[j][1] end
local bodies = redis.call('HMGET', KEYS[3], unpack(mids))
local counts = redis.call('HMGET', KEYS[4], unpack(mids))
local fields, out, counted = {}, {0}, false
for j = 1, n do
  local p = picked[j]
  if counts[j] then counted = true end
  if bodies[j] then
    local c = (tonumber(counts[j]) or 0) + 1
    fields[#fields + 1] = p[1]
    fields[#fields + 1] = c .. ':' .. p[2] .. ':' .. ARGV[2 + p[3]]
    out[#out + 1] = p[1]
    out[#out + 1] = p[2]
    out[#out + 1] = p[3]
    out[#out + 1] = c
    out[#out + 1] = bodies[j]
  end
end
if counted then redis.call('HDEL', KEYS[4], unpack(mids)) end
if #fields > 0 then redis.call('HSET', KEYS[2], unpack(fields)) end
return out
""",
)

_SETTLE = """
-- Ends claims for good (ack, dead_letter). KEYS[1] my inflight, KEYS[2] bodies,
-- KEYS[3] counts; ARGV[1] key prefix; from ARGV[first], `step` per message: id, queue, ...
-- Returns the ARGV index of each message settled here; a message another consumer holds
-- now (swept and taken again) is left alone. `more(at)`, if given, lists the keys the
-- caller writes afterwards: touched before the first write, with the rest read.
local function settle(first, step, more)
  local mids = {}
  for i = first, #ARGV, step do mids[#mids + 1] = ARGV[i] end
  local held = redis.call('HMGET', KEYS[1], unpack(mids))
  local gone, at, swept, taken, ready = {}, {}, {}, {}, {}
  for j = 1, #mids do
    local i = first + step * (j - 1)
    local mid = mids[j]
    if held[j] then
      gone[#gone + 1] = mid
      at[#at + 1] = i
    elseif not taken[mid] then
      local r = ARGV[1] .. 'ready:' .. ARGV[i + 1]
      if redis.call('ZSCORE', r, mid) then
        -- a sweep had given it back and nobody took it yet: settled all the same
        taken[mid] = true
        local l = ready[r]
        if not l then l = {}; ready[r] = l end
        l[#l + 1] = mid
        swept[#swept + 1] = mid
        gone[#gone + 1] = mid
        at[#at + 1] = i
      end
    end
  end
  if more then touch(more(at)) end
  redis.call('HDEL', KEYS[1], unpack(mids))
  for r, l in pairs(ready) do redis.call('ZREM', r, unpack(l)) end
  if #swept > 0 then redis.call('HDEL', KEYS[3], unpack(swept)) end
  if #gone > 0 then redis.call('HDEL', KEYS[2], unpack(gone)) end
  return at
end
"""

ACK = script(
    "ack",
    TOUCH
    + _SETTLE
    + """
-- ARGV[1] key prefix, then 2 per message: id, queue
return #settle(2, 2)
""",
)

DEAD_LETTER = script(
    "dead_letter",
    TOUCH
    + _SETTLE
    + """
-- ARGV[1] key prefix, ARGV[2] expiry cutoff (dead_at), ARGV[3] TTL in ms ('' = keep
-- until dropped), then 5 per message: id, queue, uuid, dead_at, packed DeadLetter.
-- The message leaves its consumer and the queue and becomes its queue's dead letter; each
-- written queue's letters older than the cutoff are trimmed and its keys' TTL refreshed.
local at = settle(4, 5, function(at)
  local keys, seen = {}, {}
  for _, i in ipairs(at) do
    add_key(keys, seen, ARGV[1] .. 'dead:' .. ARGV[i + 1])
    add_key(keys, seen, ARGV[1] .. 'dead_at:' .. ARGV[i + 1])
  end
  return keys
end)
local touched = {}
for _, i in ipairs(at) do
  local q = ARGV[i + 1]
  redis.call('HSET', ARGV[1] .. 'dead:' .. q, ARGV[i + 2], ARGV[i + 4])
  redis.call('ZADD', ARGV[1] .. 'dead_at:' .. q, ARGV[i + 3], ARGV[i + 2])
  touched[q] = true
end
for q in pairs(touched) do
  local h, z = ARGV[1] .. 'dead:' .. q, ARGV[1] .. 'dead_at:' .. q
  if ARGV[3] == '' then
    redis.call('PERSIST', h)
    redis.call('PERSIST', z)
  else
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', '(' .. ARGV[2], 'LIMIT', 0, 1000)
    if #old > 0 then
      redis.call('HDEL', h, unpack(old))
      redis.call('ZREM', z, unpack(old))
    end
    redis.call('PEXPIRE', h, ARGV[3])
    redis.call('PEXPIRE', z, ARGV[3])
  end
end
return #at
""",
)

DEAD_LETTERS = script(
    "dead_letters",
    """
-- Queue i: KEYS[2i-1] dead letters, KEYS[2i] their ages; ARGV[1] cutoff (dead_at; older
-- ones are expired), ARGV[2] limit, ARGV[3..] uuids (none: the newest `limit` of each).
-- Returns the packed letters.
local cutoff = tonumber(ARGV[1]) or -math.huge
local out = {}
for i = 1, #KEYS, 2 do
  local ids
  if #ARGV > 2 then
    ids = {}
    for a = 3, #ARGV do
      local score = redis.call('ZSCORE', KEYS[i + 1], ARGV[a])
      if score and tonumber(score) >= cutoff then ids[#ids + 1] = ARGV[a] end
    end
  else
    ids = redis.call('ZREVRANGEBYSCORE', KEYS[i + 1], '+inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  end
  if #ids > 0 then
    for _, letter in ipairs(redis.call('HMGET', KEYS[i], unpack(ids))) do
      if letter then out[#out + 1] = letter end
    end
  end
end
return out
""",
)

DROP_DEAD_LETTERS = script(
    "drop_dead_letters",
    TOUCH
    + """
-- Queue i: KEYS[2i-1] dead letters, KEYS[2i] their ages; ARGV[1] cutoff (dead_at; older
-- ones are expired, dropped but not reported), ARGV[2] newest dead_at to drop ('+inf':
-- any), ARGV[3..] uuids (none: every letter). Returns the uuids dropped.
local cutoff = tonumber(ARGV[1]) or -math.huge
local newest = tonumber(ARGV[2]) or math.huge
local out = {}
for i = 1, #KEYS, 2 do
  if #ARGV > 2 then
    local drop, taken = {}, {}
    for a = 3, #ARGV do
      local score = not taken[ARGV[a]] and redis.call('ZSCORE', KEYS[i + 1], ARGV[a])
      if score and tonumber(score) <= newest then
        taken[ARGV[a]] = true
        drop[#drop + 1] = ARGV[a]
        if tonumber(score) >= cutoff then out[#out + 1] = ARGV[a] end
      end
    end
    in_chunks('ZREM', KEYS[i + 1], drop)
    in_chunks('HDEL', KEYS[i], drop)
  elseif ARGV[2] == '+inf' then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i + 1], ARGV[1], '+inf')) do
      out[#out + 1] = id
    end
    redis.call('DEL', KEYS[i], KEYS[i + 1])
  else
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i + 1], ARGV[1], ARGV[2])) do
      out[#out + 1] = id
    end
    local drop = redis.call('ZRANGEBYSCORE', KEYS[i + 1], '-inf', ARGV[2])
    in_chunks('ZREM', KEYS[i + 1], drop)
    in_chunks('HDEL', KEYS[i], drop)
  end
end
return out
""",
)

RELEASE = script(
    "release",
    _WAKE
    + """
-- KEYS[1] my inflight, KEYS[2] counts; ARGV[1] key prefix, ARGV[2..] message ids
local mids = {}
for i = 2, #ARGV do mids[#mids + 1] = ARGV[i] end
local held = redis.call('HMGET', KEYS[1], unpack(mids))
local back, keys, seen = {}, {}, {}
for j = 1, #mids do
  local v = held[j]
  if v then
    local c, p, q = string.match(v, '^(%d+):([^:]*):(.*)$')
    back[#back + 1] = {mids[j], p, q, tonumber(c) - 1}
    add_key(keys, seen, ARGV[1] .. 'ready:' .. q)
    add_key(keys, seen, ARGV[1] .. 'wake:' .. q)
  end
end
touch(keys)
local woken, n = {}, 0
for _, b in ipairs(back) do
  local q = b[3]
  redis.call('ZADD', ARGV[1] .. 'ready:' .. q, b[2], b[1])
  if b[4] > 0 then redis.call('HSET', KEYS[2], b[1], b[4]) end
  woken[q] = (woken[q] or 0) + 1
  n = n + 1
end
redis.call('HDEL', KEYS[1], unpack(mids))
for q, count in pairs(woken) do wake(ARGV[1] .. 'wake:' .. q, count) end
return n
""",
)

REQUEUE = script(
    "requeue",
    _WAKE
    + """
-- KEYS[1] my inflight, KEYS[2] bodies, KEYS[3] counts; ARGV[1] key prefix, then 8 per
-- message: old id, old queue, new queue, priority, new id, delay ('' = due now), body,
-- deliveries the new message starts with (0 for a retry, kept for a deferral)
-- Old messages are found first (in flight here, or given back by a sweep and still
-- ready), the new ones written next, the old ones removed last: one deleting call per
-- key, after the writes that could re-create it (a new id may equal the old one).
local t = now()
local olds = {}
for i = 2, #ARGV, 8 do olds[#olds + 1] = ARGV[i] end
local held = redis.call('HMGET', KEYS[1], unpack(olds))
local found, taken, unheld, unready = {}, {}, {}, {}
local keys, seen = {}, {}
for j = 1, #olds do
  local i, old = 2 + 8 * (j - 1), olds[j]
  if not taken[old] then
    local r = ARGV[1] .. 'ready:' .. ARGV[i + 1]
    if held[j] then
      unheld[#unheld + 1] = old
    elseif redis.call('ZSCORE', r, old) then
      local l = unready[r]
      if not l then l = {}; unready[r] = l end
      l[old] = true
    end
    if held[j] or unready[r] and unready[r][old] then
      taken[old] = true
      found[#found + 1] = i
      local delay, newq = tonumber(ARGV[i + 5]), ARGV[i + 2]
      add_key(keys, seen, ARGV[1] .. (delay and delay > 0 and 'delayed:' or 'ready:') .. newq)
      add_key(keys, seen, ARGV[1] .. 'wake:' .. newq)
    end
  end
end
touch(keys)
local woken, bodies, counts, newb, newc = {}, {}, {}, {}, {}
for _, i in ipairs(found) do
  local newq, mid = ARGV[i + 2], ARGV[i + 4]
  bodies[#bodies + 1] = mid
  bodies[#bodies + 1] = ARGV[i + 6]
  newb[mid] = true
  local c = tonumber(ARGV[i + 7]) or 0
  if c > 0 then
    counts[#counts + 1] = mid
    counts[#counts + 1] = c
    newc[mid] = true
  end
  local delay = tonumber(ARGV[i + 5])
  if delay and delay > 0 then
    redis.call('ZADD', ARGV[1] .. 'delayed:' .. newq, t + delay, ARGV[i + 3] .. ':' .. mid)
  else
    local r = ARGV[1] .. 'ready:' .. newq
    redis.call('ZADD', r, ARGV[i + 3], mid)
    if unready[r] then unready[r][mid] = nil end
  end
  woken[newq] = (woken[newq] or 0) + 1
end
if #bodies > 0 then redis.call('HSET', KEYS[2], unpack(bodies)) end
if #counts > 0 then redis.call('HSET', KEYS[3], unpack(counts)) end
if #unheld > 0 then redis.call('HDEL', KEYS[1], unpack(unheld)) end
for r, set in pairs(unready) do
  local l = {}
  for old in pairs(set) do l[#l + 1] = old end
  if #l > 0 then redis.call('ZREM', r, unpack(l)) end
end
local gone, nc = {}, {}
for _, i in ipairs(found) do
  local old = ARGV[i]
  if not newb[old] then gone[#gone + 1] = old end
  if not newc[old] then nc[#nc + 1] = old end
end
if #gone > 0 then redis.call('HDEL', KEYS[2], unpack(gone)) end
if #nc > 0 then redis.call('HDEL', KEYS[3], unpack(nc)) end
for q, count in pairs(woken) do wake(ARGV[1] .. 'wake:' .. q, count) end
return #found
""",
)

GIVE_BACK = script(
    "give_back",
    _WAKE
    + """
-- KEYS[1] consumers, KEYS[2] my inflight, KEYS[3] counts, KEYS[4] my wakeup list;
-- ARGV[1] key prefix, ARGV[2] consumer id. Claims go back as if never delivered.
local items = redis.call('HGETALL', KEYS[2])
local keys, seen = {}, {}
for j = 2, #items, 2 do
  local q = string.match(items[j], '^%d+:[^:]*:(.*)$')
  add_key(keys, seen, ARGV[1] .. 'ready:' .. q)
  add_key(keys, seen, ARGV[1] .. 'wake:' .. q)
end
touch(keys)
local woken, n = {}, 0
for j = 1, #items, 2 do
  local mid = items[j]
  local c, p, q = string.match(items[j + 1], '^(%d+):([^:]*):(.*)$')
  redis.call('ZADD', ARGV[1] .. 'ready:' .. q, p, mid)
  c = tonumber(c) - 1
  if c > 0 then redis.call('HSET', KEYS[3], mid, c) end
  woken[q] = (woken[q] or 0) + 1
  n = n + 1
end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[2])
for q, count in pairs(woken) do wake(ARGV[1] .. 'wake:' .. q, count) end
return n
""",
)

SWEEP = script(
    "sweep",
    _WAKE
    + """
-- KEYS[1] consumers, KEYS[2] counts; ARGV[1] key prefix, ARGV[2] lost after (seconds).
-- Claims of silent consumers go back, their delivery counts kept. Returns {consumers, messages}.
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now() - tonumber(ARGV[2]),
                        'LIMIT', 0, 100)
-- Every in-flight hash is read before the first write: their queues are the keys to touch.
local claims, keys, seen = {}, {}, {}
for d, id in ipairs(dead) do
  local items = redis.call('HGETALL', ARGV[1] .. 'inflight:' .. id)
  claims[d] = items
  for j = 2, #items, 2 do
    local q = string.match(items[j], '^%d+:[^:]*:(.*)$')
    add_key(keys, seen, ARGV[1] .. 'ready:' .. q)
    add_key(keys, seen, ARGV[1] .. 'wake:' .. q)
  end
  keys[#keys + 1] = ARGV[1] .. 'wakeup:' .. id
end
touch(keys)
local woken, n = {}, 0
for d, id in ipairs(dead) do
  local items = claims[d]
  for j = 1, #items, 2 do
    local mid = items[j]
    local c, p, q = string.match(items[j + 1], '^(%d+):([^:]*):(.*)$')
    redis.call('ZADD', ARGV[1] .. 'ready:' .. q, p, mid)
    redis.call('HSET', KEYS[2], mid, c)
    woken[q] = (woken[q] or 0) + 1
    n = n + 1
  end
  redis.call('DEL', ARGV[1] .. 'inflight:' .. id, ARGV[1] .. 'wakeup:' .. id)
end
if #dead > 0 then redis.call('ZREM', KEYS[1], unpack(dead)) end
for q, count in pairs(woken) do wake(ARGV[1] .. 'wake:' .. q, count) end
return {#dead, n}
""",
)

BEAT = script(
    "beat",
    """
-- KEYS[1] consumers; ARGV[1] consumer id
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
return 1
""",
)

SIZES = script(
    "queue_sizes",
    """
-- KEYS[1] consumers; ARGV[1] key prefix, ARGV[2..] queues. Ready + delayed + in flight.
local sizes, index = {}, {}
for i = 2, #ARGV do
  local q = ARGV[i]
  index[q] = i - 1
  sizes[i - 1] = redis.call('ZCARD', ARGV[1] .. 'ready:' .. q)
    + redis.call('ZCARD', ARGV[1] .. 'delayed:' .. q)
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  for _, v in ipairs(redis.call('HVALS', ARGV[1] .. 'inflight:' .. id)) do
    local k = index[string.match(v, '^%d+:[^:]*:(.*)$')]
    if k then sizes[k] = sizes[k] + 1 end
  end
end
return sizes
""",
)


QUEUE_STATS = script(
    "queue_stats",
    """
-- KEYS[1] consumers; ARGV[1] key prefix, ARGV[2] most ready messages to split by
-- priority, ARGV[3..] queues. Per queue: ready, delayed, in flight, then priority/count
-- pairs (none when the queue holds more than ARGV[2] ready messages).
local out, index = {}, {}
for i = 3, #ARGV do
  local q = ARGV[i]
  local ready = ARGV[1] .. 'ready:' .. q
  local n = redis.call('ZCARD', ready)
  local row = {n, redis.call('ZCARD', ARGV[1] .. 'delayed:' .. q), 0}
  if n <= tonumber(ARGV[2]) then
    local counts, order = {}, {}
    local flat = redis.call('ZRANGE', ready, 0, -1, 'WITHSCORES')
    for j = 2, #flat, 2 do
      local p = flat[j]
      if not counts[p] then counts[p] = 0; order[#order + 1] = p end
      counts[p] = counts[p] + 1
    end
    for _, p in ipairs(order) do row[#row + 1] = p; row[#row + 1] = counts[p] end
  end
  out[i - 2] = row
  index[q] = i - 2
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  for _, v in ipairs(redis.call('HVALS', ARGV[1] .. 'inflight:' .. id)) do
    local k = index[string.match(v, '^%d+:[^:]*:(.*)$')]
    if k then out[k][3] = out[k][3] + 1 end
  end
end
return out
""",
)

PURGE = script(
    "purge",
    TOUCH
    + """
-- ARGV[1] key prefix, ARGV[2..] queues. Drops their ready and delayed messages (claimed
-- ones stay with their workers); returns the message ids dropped.
local out, keys, seen = {}, {}, {}
for i = 2, #ARGV do
  local q = ARGV[i]
  local ready, delayed = ARGV[1] .. 'ready:' .. q, ARGV[1] .. 'delayed:' .. q
  if not seen[ready] then
    for _, id in ipairs(redis.call('ZRANGE', ready, 0, -1)) do out[#out + 1] = id end
    for _, m in ipairs(redis.call('ZRANGE', delayed, 0, -1)) do
      out[#out + 1] = string.match(m, '^[^:]*:(.*)$')
    end
    add_key(keys, seen, ready)
    add_key(keys, seen, delayed)
    add_key(keys, seen, ARGV[1] .. 'wake:' .. q)
  end
end
local bodies, counts = {}, {}
if #out > 0 then
  bodies = present(ARGV[1] .. 'bodies', out)
  counts = present(ARGV[1] .. 'counts', out)
end
touch(keys)
for _, key in ipairs(keys) do redis.call('DEL', key) end
in_chunks('HDEL', ARGV[1] .. 'bodies', bodies)
in_chunks('HDEL', ARGV[1] .. 'counts', counts)
return out
""",
)

DISCARD = script(
    "discard",
    TOUCH
    + """
-- ARGV[1] key prefix, ARGV[2] how many queues (n), ARGV[3..n+2] queues, then message ids.
-- Removes each id that is ready or delayed in one of the queues (not a claimed one);
-- returns the ids removed.
-- Everything is read first, then each key gets one deleting call (see TOUCH).
local n = tonumber(ARGV[2])
local out, taken, drop, keys = {}, {}, {}, {}
local function remove(key, member)
  local l = drop[key]
  if not l then l = {}; drop[key] = l; keys[#keys + 1] = key end
  l[#l + 1] = member
end
for i = n + 3, #ARGV do
  local id = ARGV[i]
  for j = 3, n + 2 do
    if taken[id] then break end
    local q = ARGV[j]
    local ready = ARGV[1] .. 'ready:' .. q
    local gone = redis.call('ZSCORE', ready, id) ~= false
    if gone then
      remove(ready, id)
    else
      local delayed = ARGV[1] .. 'delayed:' .. q
      local cursor = '0'
      repeat
        local page = redis.call('ZSCAN', delayed, cursor, 'MATCH', '*:' .. id, 'COUNT', 1000)
        cursor = page[1]
        for k = 1, #page[2], 2 do
          remove(delayed, page[2][k])
          gone = true
        end
      until cursor == '0' or gone
    end
    if gone then
      taken[id] = true
      out[#out + 1] = id
    end
  end
end
if #out == 0 then return out end
local bodies = present(ARGV[1] .. 'bodies', out)
local counts = present(ARGV[1] .. 'counts', out)
for _, key in ipairs(keys) do in_chunks('ZREM', key, drop[key]) end
in_chunks('HDEL', ARGV[1] .. 'bodies', bodies)
in_chunks('HDEL', ARGV[1] .. 'counts', counts)
return out
""",
)

# Ready messages a queue may hold for `queue_stats` to split them by priority (the split
# reads every member; beyond this the split is left out rather than block Redis).
PRIORITY_SPLIT_LIMIT = 50_000


def message_id(envelope: Envelope) -> str:
    """The id that orders a message among equal priorities: creation time, then uuid."""
    return f"{max(0, int(envelope.created_at * 1_000_000)):016d}:{envelope.uuid}"


_PER_MESSAGE = 6
"""ENQUEUE arguments per message."""


_Piece = tuple[bytes, int]
"""Messages as ENQUEUE arguments in RESP, and how many."""


def _message_count(piece: _Piece) -> int:
    return piece[1]


async def _all(writes: list[Awaitable[None]]) -> None:
    """Wait for every write; then raise the first error, if any."""
    outcomes = await asyncio.gather(*writes, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _enqueue_command(head: bytes, parts: list[bytes], count: int) -> Packed:
    data = b"*%d\r\n%b%b" % (6 + _PER_MESSAGE * count, head, b"".join(parts))
    return Packed("EVALSHA", data)


class RedisBroker(RedisComponent, Broker):
    """The broker of `redis://`, `rediss://` and `unix://` URLs; see the module docstring."""

    error_class = BrokerError

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
    ) -> None:
        super().__init__(url, namespace=namespace, config=config)
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._reset()

    def _reset(self) -> None:
        self._registered = False
        self._stopping = False
        self._held: set[bytes] = set()
        """Message ids claimed by this process and not yet settled."""
        self._reconcile = False
        self._fetch_lock: asyncio.Lock | None = None
        self._fetches: set[asyncio.Future[None]] = set()
        """Resolved when each running fetch ends (stop() waits for them)."""
        self._batchers: dict[str, Batcher[_Piece]] = {}
        self._queue_bulks: dict[str, bytes] = {}
        self._heads: dict[str, bytes] = {}
        """ENQUEUE's name, sha, keys and prefixes in RESP, per record prefix."""
        self._heartbeat: _HeartbeatThread | None = None

    async def start(self) -> None:
        """Connect (see RedisComponent.start)."""
        await super().start()
        self._stopping = False

    async def stop(self) -> None:
        """Stop heartbeating, end blocked fetches, give back every claim held, disconnect."""
        link = self._link
        if link is None:
            return
        self._stopping = True
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        if self._fetches:
            with contextlib.suppress(RedisError):
                await link.call("RPUSH", self.keys.wakeup(self.consumer_id), "1", retry=False)
        fetches = list(self._fetches)  # woken: they end within a round trip
        if fetches:
            await asyncio.wait(fetches, timeout=5.0)
        for batcher in self._batchers.values():
            await batcher.close()
        if self._registered:
            k, me = self.keys, self.consumer_id
            try:
                await self._eval(
                    GIVE_BACK,
                    [k.consumers, k.inflight(me), k.counts, k.wakeup(me)],
                    [k.prefix, me],
                )
            except QTasksError as exc:
                # Our heartbeat has stopped: the sweep gives the claims back later.
                log.warning("could not give back claims on stop: %s", exc)
        self._reset()
        await super().stop()

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Make messages deliverable (after their eta), coalesced with concurrent calls."""
        if envelopes:
            await self._submit("", self._pieces(envelopes, None, ()))

    async def enqueue(
        self, storage: Storage, tasks: Sequence[Task], envelopes: Sequence[Envelope]
    ) -> None:
        """Records and messages in ONE script call when the storage shares this link.

        Atomic, one round trip, and coalesced with concurrent calls; otherwise the records
        are stored first, then the messages published (see Broker.enqueue).
        """
        link = self.link
        if not (isinstance(storage, RedisStorage) and storage._link is link):
            await super().enqueue(storage, tasks, envelopes)
            return
        pairs = storage.encode_records(tasks)
        if len(pairs) == len(envelopes) and (
            pairs[0][0] == envelopes[0].uuid
            if len(pairs) == 1
            else all(p[0] == e.uuid for p, e in zip(pairs, envelopes, strict=True))
        ):  # the usual: a record per message, in the same order
            pieces = self._pieces(envelopes, [record for _, record in pairs], ())
        else:
            by_uuid = dict(pairs)
            records = [by_uuid.pop(e.uuid, b"") for e in envelopes]
            pieces = self._pieces(envelopes, records, list(by_uuid.items()))
        submitted = self._submit(storage.keys.record_prefix, pieces)
        # Nothing but the outcome is kept alive while the write is queued: with thousands
        # of calls queued at once, the garbage collector scans all they hold, repeatedly.
        del tasks, envelopes, pairs, pieces
        await submitted

    def _submit(self, record_prefix: str, pieces: list[_Piece]) -> Awaitable[None]:
        batcher = self._batchers.get(record_prefix)
        if batcher is None:
            batcher = self._batchers[record_prefix] = Batcher(
                functools.partial(self._write, record_prefix),
                max_items=MAX_BATCH,
                size=_message_count,
            )
        if len(pieces) == 1:
            return batcher.submit(pieces[0])
        return _all([batcher.submit(p) for p in pieces])

    def _pieces(
        self,
        envelopes: Sequence[Envelope],
        records: Sequence[bytes] | None,
        extra: Sequence[tuple[str, bytes]],
    ) -> list[_Piece]:
        """ENQUEUE's arguments for the messages, in RESP, MAX_BATCH messages a piece.

        6 per message: queue, priority, message id, delay, body, record (`records[i]` is
        the i-th message's, b"" for none). `extra` are (uuid, record) to store without a
        message. Built with one bytes format per message rather than packed argument by
        argument: a third of the cost, and no list per call for the garbage collector.
        """
        now = 0.0
        queues = self._queue_bulks
        frags: list[bytes] = []
        add = frags.append
        for i, e in enumerate(envelopes):
            uid = e.uuid.encode()
            queue = queues.get(e.queue)
            if queue is None:
                queue = self._queue_bulk(e.queue)
            created = int(e.created_at * 1_000_000) if e.created_at > 0 else 0
            eta = e.eta
            if eta is None:
                delay = b""
            else:
                now = now or time.time()
                delay = b"" if eta <= now else repr(eta - now).encode()
            priority = b"%d" % e.priority
            body = e.body
            record = records[i] if records is not None else b""
            add(
                queue
                + b"$%d\r\n%b\r\n$%d\r\n%016d:%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                % (
                    len(priority),
                    priority,
                    (16 if created < 10**16 else len(str(created))) + 1 + len(uid),
                    created,
                    uid,
                    len(delay),
                    delay,
                    len(body),
                    body,
                    len(record),
                    record,
                )
            )
        for uuid, record in extra:  # records without a message
            add(
                b"$0\r\n\r\n$1\r\n0\r\n"
                + bulk(uuid.encode())
                + b"$0\r\n\r\n$0\r\n\r\n"
                + bulk(record)
            )
        if len(frags) == 1:
            return [(frags[0], 1)]
        return [
            (b"".join(frags[i : i + MAX_BATCH]), len(frags[i : i + MAX_BATCH]))
            for i in range(0, len(frags), MAX_BATCH)
        ]

    def _queue_bulk(self, queue: str) -> bytes:
        if len(self._queue_bulks) >= 1024:  # queue names are few; never let it grow unbounded
            self._queue_bulks.clear()
        b = self._queue_bulks[queue] = bulk(queue.encode())
        return b

    async def _write(self, record_prefix: str, pieces: list[_Piece]) -> None:
        """One ENQUEUE call per MAX_BATCH messages, all in one round trip."""
        head = self._heads.get(record_prefix)
        if head is None:
            k = self.keys
            head = self._heads[record_prefix] = b"".join(
                bulk(str(a).encode())
                for a in ("EVALSHA", ENQUEUE.sha, 1, k.bodies, k.prefix, record_prefix)
            )
        commands: list[Packed] = []
        parts: list[bytes] = []
        count = 0
        for data, n in pieces:
            if count and count + n > MAX_BATCH:
                commands.append(_enqueue_command(head, parts, count))
                parts, count = [], 0
            parts.append(data)
            count += n
        commands.append(_enqueue_command(head, parts, count))
        await self._run(commands, retry=True)

    # -- consuming -----------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        """Claim due messages in priority order; block on the server up to `timeout`."""
        self.link  # noqa: B018 - raises if not started
        names = list(dict.fromkeys(queues))
        if max_count <= 0:
            return []
        if not names:
            await asyncio.sleep(max(timeout, 0.0))
            return []
        # Not a task of its own: cancelling the caller cuts the claim short (its connection
        # is dropped), and a claim that ran anyway is found by the next reconcile.
        done = asyncio.get_running_loop().create_future()
        self._fetches.add(done)
        try:
            return await self._fetch(names, min(max_count, MAX_BATCH), timeout)
        except asyncio.CancelledError:
            self._reconcile = True
            raise
        finally:
            self._fetches.discard(done)
            done.set_result(None)

    async def _fetch(self, names: list[str], max_count: int, timeout: float) -> list[Delivery]:
        if self._fetch_lock is None:
            self._fetch_lock = asyncio.Lock()
        async with self._fetch_lock:
            if self._reconcile:
                await self._do_reconcile()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(timeout, 0.0)
            k, me = self.keys, self.consumer_id
            keys = [k.consumers, k.inflight(me), k.bodies, k.counts]
            for q in names:
                keys += (k.ready(q), k.delayed(q), k.wake(q))
            claim = CLAIM.command(keys, [me, max_count, *names])
            blpop_keys = [k.wake(q) for q in names] + [k.wakeup(me)]
            self._registered = True
            reply = (await self._claim([claim]))[0]
            if self._heartbeat is None and not self._stopping:
                self._heartbeat = _HeartbeatThread(self)
                self._heartbeat.start()
            while True:
                if reply[0] == 0:
                    return self._deliveries(reply, names)
                remaining = deadline - loop.time()
                if remaining <= 0 or self._stopping:
                    return []
                wait = remaining if reply[0] < 0 else min(remaining, reply[0] / 1000)
                wait = max(wait, 0.001)
                replies = await self._claim(
                    [("BLPOP", *blpop_keys, f"{wait:.3f}"), claim],
                    read_timeout=wait + BLOCKING_READ_MARGIN_SECONDS,
                )
                reply = replies[-1]

    async def _claim(
        self, commands: list[tuple[Any, ...]], read_timeout: float | None = None
    ) -> list[Any]:
        try:
            replies = await self.link.run(commands, retry=False, read_timeout=read_timeout)
        except RedisError as exc:
            # The claim may have run with its reply lost: reconcile before the next one.
            self._reconcile = True
            raise self._error(exc) from exc
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise self._error(reply)
        return replies

    def _deliveries(self, reply: list[Any], names: list[str]) -> list[Delivery]:
        out: list[Delivery] = []
        held = self._held
        for j in range(1, len(reply), 5):
            mid = reply[j]
            held.add(mid)
            out.append(
                Delivery(
                    reply[j + 4],
                    mid,
                    names[reply[j + 2] - 1],
                    _priority(reply[j + 1]),
                    int(mid[:16]) / 1_000_000,
                    reply[j + 3],
                )
            )
        return out

    async def _do_reconcile(self) -> None:
        k, me = self.keys, self.consumer_id
        mids = await self._call("HKEYS", k.inflight(me))
        orphans = [m for m in mids if m not in self._held]
        if orphans:
            log.warning("giving back %d claims whose reply was lost", len(orphans))
            for part in _chunks(orphans):
                await self._eval(RELEASE, [k.inflight(me), k.counts], [k.prefix, *part])
        self._reconcile = False

    async def heartbeat(self) -> None:
        """Refresh this consumer's heartbeat (the heartbeat thread does it on its own)."""
        if self._registered:
            await self._eval(BEAT, [self.keys.consumers], [self.consumer_id])

    # -- settling ------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Forget finished messages (one script call per 1000)."""
        if deliveries:
            await self._settle(ACK, [self.keys.prefix], deliveries)

    async def settle(
        self, storage: Storage, records: Sequence[Task], deliveries: Sequence[Delivery]
    ) -> None:
        """Records, then acks, in ONE round trip when the storage shares this link.

        Redis runs a connection's commands in order, so the records are written before
        the acks; both are safe to repeat, so a dropped connection just retries them.
        """
        if not (records and isinstance(storage, RedisStorage) and storage._link is self._link):
            await super().settle(storage, records, deliveries)
            return
        commands = [storage.save_command(records)]
        if deliveries:
            commands += self._settle_commands(ACK, [self.keys.prefix], deliveries)
        await self._run(commands, retry=True)
        storage.saved(records)

    async def _settle(
        self,
        s: Script,
        head: list[Any],
        deliveries: Sequence[Delivery],
        extra: Sequence[tuple[Any, ...]] | None = None,
    ) -> None:
        await self._run(self._settle_commands(s, head, deliveries, extra), retry=True)

    def _settle_commands(
        self,
        s: Script,
        head: list[Any],
        deliveries: Sequence[Delivery],
        extra: Sequence[tuple[Any, ...]] | None = None,
    ) -> list[tuple[Any, ...]]:
        # Ends claims with a script built on _SETTLE: `head`, then per message its id,
        # its queue and its `extra` arguments; one call per 1000, safe to repeat.
        k, me = self.keys, self.consumer_id
        held = self._held
        keys = [k.inflight(me), k.bodies, k.counts]
        commands = []
        for start in range(0, len(deliveries), MAX_BATCH):
            part = deliveries[start : start + MAX_BATCH]
            args: list[Any] = list(head)
            if extra is None:
                for d in part:
                    held.discard(d.receipt)
                    args += (d.receipt, d.queue)
            else:
                more = extra[start : start + MAX_BATCH]
                for d, e in zip(part, more, strict=True):
                    held.discard(d.receipt)
                    args += (d.receipt, d.queue, *e)
            commands.append(s.command(keys, args))
        return commands

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give unstarted messages back as if never delivered."""
        if not deliveries:
            return
        k, me = self.keys, self.consumer_id
        commands = []
        for part in _chunks(deliveries):
            for d in part:
                self._held.discard(d.receipt)
            commands.append(
                RELEASE.command([k.inflight(me), k.counts], [k.prefix, *(d.receipt for d in part)])
            )
        await self._run(commands, retry=True)

    async def requeue(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Swap each claimed message for the next attempt's, atomically, in one call."""
        if not items:
            return
        k, me = self.keys, self.consumer_id
        now = time.time()
        commands = []
        for part in _chunks(items):
            args: list[Any] = [k.prefix]
            for d, e in part:
                self._held.discard(d.receipt)
                delay = "" if e.eta is None or e.eta <= now else repr(e.eta - now)
                args += (
                    d.receipt,
                    d.queue,
                    e.queue,
                    e.priority,
                    message_id(e),
                    delay,
                    e.body,
                    e.deliveries,
                )
            commands.append(REQUEUE.command([k.inflight(me), k.bodies, k.counts], args))
        await self._run(commands, retry=True)

    async def queue_sizes(self, queues: Sequence[str]) -> dict[str, int]:
        """Ready + delayed + claimed messages per queue."""
        names = list(dict.fromkeys(queues))
        if not names:
            return {}
        sizes = await self._eval(SIZES, [self.keys.consumers], [self.keys.prefix, *names])
        return {q: int(n) for q, n in zip(names, sizes, strict=True)}

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Messages waiting or in flight, and dead letters, of each queue (one round trip)."""
        names = list(dict.fromkeys(queues))
        if not names:
            return []
        k = self.keys
        cutoff = self._dead_cutoff()
        head = [k.prefix, PRIORITY_SPLIT_LIMIT, *names]
        commands: list[tuple[Any, ...]] = [QUEUE_STATS.command([k.consumers], head)]
        commands += [("ZCOUNT", k.dead_at(q), cutoff, "+inf") for q in names]
        replies = await self._run(commands)
        out: dict[str, QueueStats] = {}
        for q, row, dead in zip(names, replies[0], replies[1:], strict=True):
            ready, delayed, in_flight = (int(x) for x in row[:3])
            pairs = row[3:]
            by_priority = None
            if ready <= PRIORITY_SPLIT_LIMIT:
                by_priority = {
                    int(float(pairs[i])): int(pairs[i + 1]) for i in range(0, len(pairs), 2)
                }
                by_priority = dict(sorted(by_priority.items()))
            out[q] = QueueStats(
                queue=q,
                total=ready + delayed + in_flight,
                ready=ready,
                delayed=delayed,
                in_flight=in_flight,
                dead_lettered=int(dead),
                by_priority=by_priority,
            )
        return [out[q] for q in queues]

    async def purge(self, queues: Sequence[str]) -> list[str]:
        """Drop the ready and delayed messages of `queues` (one script call)."""
        names = list(dict.fromkeys(queues))
        if not names:
            return []
        ids = await self._eval(PURGE, [], [self.keys.prefix, *names])
        return [_uuid_of(raw) for raw in ids]

    async def discard(self, uuids: Sequence[str], queues: Sequence[str] | None = None) -> list[str]:
        """Remove unclaimed messages of `uuids` from `queues`.

        A message's id holds its creation time, so it is found first by scanning the
        bodies hash (HSCAN, a page per round trip: Redis is never blocked on a long
        queue); the removal is one script that takes only messages still ready or
        delayed, so a message claimed meanwhile is left to its worker.
        """
        if queues is None:
            raise NotImplementedError(
                "RedisBroker.discard needs the queues to look in (cancel passes the task's)"
            )
        names = list(dict.fromkeys(queues))
        ids = await self._find_ids(list(dict.fromkeys(str(u) for u in uuids)))
        if not ids or not names:
            return []
        removed = await self._eval(DISCARD, [], [self.keys.prefix, len(names), *names, *ids])
        return [_uuid_of(raw) for raw in removed]

    async def _find_ids(self, uuids: list[str]) -> list[str]:
        ids: list[str] = []
        for uuid in uuids:
            cursor: Any = 0
            while True:
                cursor, flat = await self._call(
                    "HSCAN", self.keys.bodies, cursor, "MATCH", f"*:{uuid}", "COUNT", 1000
                )
                ids += [flat[i].decode() for i in range(0, len(flat), 2)]
                if int(cursor) == 0:
                    break
        return ids

    # -- dead letters --------------------------------------------------------------------

    def _dead_cutoff(self) -> str:
        # Letters older than this are expired: skipped by reads, trimmed by writes.
        ttl = self.config.dead_letter_ttl_seconds
        return "-inf" if ttl is None else repr(time.time() - ttl)

    async def dead_letter(self, items: Sequence[tuple[Delivery, DeadLetter]]) -> None:
        """Settle claims into their queues' dead letters: one script call per 1000.

        Built on the same claim check as `ack`: a message another consumer holds now (swept
        and taken again) is left alone, so a repeated call writes no second letter.
        """
        if not items:
            return
        ttl = self.config.dead_letter_ttl_seconds
        ttl_ms = "" if ttl is None else str(max(1, math.ceil(ttl * 1000)))
        head = [self.keys.prefix, self._dead_cutoff(), ttl_ms]
        extra = [(x.uuid, repr(x.dead_at), _LETTER_ENCODER.encode(x)) for _, x in items]
        await self._settle(DEAD_LETTER, head, [d for d, _ in items], extra)

    def _dead_keys(self, names: list[str]) -> list[str]:
        k = self.keys
        return [key for q in names for key in (k.dead(q), k.dead_at(q))]

    async def dead_letters(
        self, queues: Sequence[str], limit: int = 100, uuids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters of `queues`, newest first, at most `limit` (only `uuids` if given)."""
        names = list(dict.fromkeys(queues))
        wanted = None if uuids is None else list(dict.fromkeys(str(u) for u in uuids))
        if limit <= 0 or not names or wanted == []:
            return []
        keys, head = self._dead_keys(names), [self._dead_cutoff(), limit]
        if wanted is None:
            commands = [DEAD_LETTERS.command(keys, head)]
        else:
            commands = [DEAD_LETTERS.command(keys, [*head, *part]) for part in _chunks(wanted)]
        replies = await self._run(commands)
        letters = [_LETTER_DECODER.decode(raw) for reply in replies for raw in reply]
        letters.sort(key=lambda x: x.dead_at, reverse=True)
        return letters[:limit]

    async def drop_dead_letters(
        self,
        queues: Sequence[str],
        uuids: Sequence[str] | None = None,
        dead_at_most: float | None = None,
    ) -> list[str]:
        """Delete dead letters of `queues` (only `uuids` if given); the uuids deleted."""
        names = list(dict.fromkeys(queues))
        wanted = None if uuids is None else list(dict.fromkeys(str(u) for u in uuids))
        if not names or wanted == []:
            return []
        keys, cutoff = self._dead_keys(names), self._dead_cutoff()
        newest = "+inf" if dead_at_most is None else repr(dead_at_most)
        if wanted is None:
            commands = [DROP_DEAD_LETTERS.command(keys, [cutoff, newest])]
        else:
            commands = [
                DROP_DEAD_LETTERS.command(keys, [cutoff, newest, *p]) for p in _chunks(wanted)
            ]
        replies = await self._run(commands)
        return [raw.decode() for reply in replies for raw in reply]

    async def sweep(self) -> int:
        """Give back the claims of lost consumers now; how many messages (tests, tools)."""
        k = self.keys
        reply = await self._eval(
            SWEEP, [k.consumers, k.counts], [k.prefix, self.config.worker_lost_after_seconds]
        )
        return int(reply[1])

    async def startup_warnings(self) -> list[str]:
        """Redis settings that can lose tasks: an evicting maxmemory-policy, no persistence.

        Read with CONFIG GET, which managed services (ElastiCache, Memorystore, ...) often
        refuse or rename: then nothing is said, since nothing is known.
        """
        from qtasks.urls import redact_url  # local: this method is the only user here

        commands = [("CONFIG", "GET", name) for name in ("maxmemory-policy", "save", "appendonly")]
        try:
            replies = await self._run(commands, retry=False)
        except QTasksError:
            return []
        settings: dict[str, str] = {}
        for reply in replies:
            # [name, value] pairs; an empty list when the setting does not exist.
            if isinstance(reply, list | tuple) and len(reply) == 2:
                name, value = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
                settings[name.lower()] = value.strip()
        where = f"Redis at {redact_url(self.url)}"
        warnings = []
        policy = settings.get("maxmemory-policy")
        if policy is not None and policy.lower() != "noeviction":
            warnings.append(
                f"{where} has maxmemory-policy {policy}: when it fills up, Redis deletes keys, "
                f"so queued tasks and results can vanish without an error; set "
                f"maxmemory-policy noeviction (writes then fail loudly instead)"
            )
        save, aof = settings.get("save"), settings.get("appendonly")
        if save == "" and aof is not None and aof.lower() == "no":
            warnings.append(
                f'{where} persists nothing (save "" and appendonly no): a Redis restart loses '
                f"every queued task; turn on appendonly yes (AOF) for a task queue"
            )
        return warnings


_LETTER_ENCODER = msgspec.msgpack.Encoder()
_LETTER_DECODER = msgspec.msgpack.Decoder(DeadLetter)


def _priority(score: bytes) -> int:
    # Redis prints a score as an integer up to 2**53 and in exponent form beyond.
    try:
        return int(score)
    except ValueError:
        return int(float(score))


def _chunks(seq: Sequence[Any], size: int = MAX_BATCH) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


class _HeartbeatThread(HeartbeatThread):
    """Beats and sweeps through its own blocking client (see qtasks.runtime.heartbeat)."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(broker.consumer_id, broker.config)
        self.link = broker.link
        self.node_url = broker.link.node_url
        self.keys = broker.keys
        # A reply later than this is a failure; the beat after it tries a fresh connection.
        self.socket_timeout = max(0.5, min(self.interval, 2.0))
        self._client: redis.Redis | None = None

    def _eval(self, s: Script, keys: list[str], args: list[Any]) -> Any:
        if self._client is None:
            self._client = self.link.sync_client(self.socket_timeout, self.node_url)
        run: Any = self._client.execute_command  # untyped in redis-py
        try:
            return run(*s.command(keys, args))
        except NoScriptError:
            run("SCRIPT", "LOAD", s.source)
            return run(*s.command(keys, args))

    def beat(self) -> None:
        try:
            self._eval(BEAT, [self.keys.consumers], [self.consumer_id])
        except AskError as exc:
            # The slot is migrating and the consumers set has moved already: beat on the
            # importing node, or a long migration makes this live worker look lost. Safe
            # for BEAT, which touches only the key it declares (not so the sweep).
            self._beat_asking(with_host(self.node_url, exc.host, int(exc.port)))

    def _beat_asking(self, url: str) -> None:
        client = self.link.sync_client(self.socket_timeout, url)
        try:
            run: Any = client.execute_command  # untyped in redis-py
            for _ in range(2):
                pipe: Any = client.pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.execute_command(*BEAT.command([self.keys.consumers], [self.consumer_id]))
                reply = pipe.execute(raise_on_error=False)[1]
                if isinstance(reply, NoScriptError):
                    run("SCRIPT", "LOAD", BEAT.source)
                    continue
                if isinstance(reply, Exception):
                    raise reply
                return
        finally:
            client.close()

    def sweep(self) -> None:
        k = self.keys
        dead, freed = self._eval(SWEEP, [k.consumers, k.counts], [k.prefix, self.lost_after])
        if dead:
            log.warning(
                "%d lost consumers: %d of their messages are deliverable again", dead, freed
            )

    def failed(self, exc: Exception) -> bool:
        self.close()
        if isinstance(exc, MovedError):  # Cluster failover or resharding: again, on the new node
            self.node_url = with_host(self.node_url, exc.host, int(exc.port))
            return True
        if isinstance(exc, (TryAgainError, AskError)) or "non local key" in str(exc):
            # The app's slot is migrating: the sweep waits for the end (beats go on).
            log.debug("Redis sweep skipped: the Cluster slot is migrating (%s)", exc)
            return False
        log.warning("Redis heartbeat to %s failed: %r", self.link.redacted, exc)
        return False

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


def _uuid_of(raw: bytes | str) -> str:
    """The task uuid in a message id (`<created_at µs>:<uuid>`)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text.split(":", 1)[1]
