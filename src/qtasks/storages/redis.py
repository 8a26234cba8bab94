"""The Redis storage: task records with a result TTL, waiters woken by pub/sub.

Why it works this way:

* A record is one string key (`qtasks:{<app>}:task:<uuid>`) holding the whole `Task` as
  msgspec JSON: one GET and one decode to read it, one SET to write it, and the worker
  always writes whole records. (A hash per record would need a field per attribute,
  each encoded on its own, for no partial update anyone makes.) Final records are written
  with `PX` = what is left of `result_ttl_seconds` after `finished_at`, so Redis expires
  them; records still running never expire.
* `save` is one script call for the whole batch: it SETs every record and PUBLISHes each
  final one on the task's own channel `qtasks:{<app>}:done:<uuid>` (SPUBLISH on a
  Cluster), the encoded record as the message. Nobody listening costs Redis a dictionary
  lookup.
* `wait` registers a future, subscribes to the task's channel and waits for the server's
  confirmation, THEN reads the record: a final write between the two is either read or
  published to us, never missed, and nothing polls. The published record wakes the waiter
  with no further read. One subscriber connection per link serves every waiter of the
  process; after a reconnect each waiter re-reads its record once. Writers in this process
  also wake waiters directly.
* Steps of a generator task are a Redis Stream (`...:steps:<uuid>`): step n has the id
  `0-<n+1>`, so a reader's position is an id and needs no lookup. `add_steps` is one
  script (XADD with MAXLEN ~ STEP_STREAM_MAXLEN, then PEXPIRE with the result TTL). The
  `save` script adds an end mark to the stream of every final record that has one (and
  gives the stream the record's TTL), so a reader blocked in `XREAD BLOCK` wakes when the
  task ends as well as at each step: nothing polls. A reader that finds no stream makes an
  empty one (XGROUP CREATE ... MKSTREAM, in the same script that reads the record) so
  that the end mark has somewhere to go. Readers get the record and the steps from one
  script: a final record comes with every step.
* State (`qtasks.plugins.AsyncState`) is one hash per state (`...:state:<name>`, key →
  JSON); every State method is one command or script, so atomic across processes.
  `state_incr` adds in Redis (HINCRBY for integers, exact to 64 bits; a script for
  floats); locks are `SET NX PX` keys released by a compare-and-delete script.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks._redis import (
    BLOCKING_READ_MARGIN_SECONDS,
    DEFAULT_NAMESPACE,
    DEFAULT_URL,
    TOUCH,
    RedisComponent,
    script,
)
from qtasks._waiters import Waiters
from qtasks.errors import EncodeError, StorageError, TaskNotFound
from qtasks.interfaces import Steps, Storage
from qtasks.message import Task, TaskStatusEnum
from qtasks.plugins.state import add_number, encode_value

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Task)

STEP_STREAM_MAXLEN = 10_000
"""Steps a task's stream keeps at most (about: MAXLEN ~); older ones are trimmed."""

_STEPS_COUNT = 1000
"""Steps one read returns at most."""

# The id of a stream's last entry, 0 for none: step n (from 0) has the id 0-(n+1).
_LAST_SEQ = """
local function last_seq(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  return tonumber(string.match(last[1][1], '^0%-(%d+)$')) or 0
end
"""

RECENT_PER_STATUS = 10_000
"""Records of each status the index keeps for `recent` (the newest ones)."""

SAVE = script(
    "save",
    TOUCH
    + _LAST_SEQ
    + """
-- KEYS[1] the first record's key (routing); ARGV[1] record key prefix, ARGV[2] channel
-- prefix, ARGV[3] PUBLISH or SPUBLISH, ARGV[4] step stream prefix, ARGV[5] status index
-- prefix, ARGV[6] now (ms), ARGV[7] entries kept per index, ARGV[8] index lifetime (ms,
-- '' = none), then 4 per record: uuid, expiry ('' = not final, '0' = final and kept,
-- else milliseconds to live), status, record.
-- The index (one sorted set per status, uuid -> time of the write) is what `recent`
-- lists; a record leaves its earlier status's set as it moves on.
local moved_from = {
  new = {'process', 'retry', 'success', 'error', 'cancel'},  -- sent again (dead letters)
  process = {'retry'}, retry = {'process'}, success = {'process', 'retry'},
  error = {'process', 'retry'}, cancel = {'process', 'retry'},
}
-- Reads and touches come first; removals from the earlier statuses' sets come last,
-- one call per set (see TOUCH).
local keys, seen, leave, steps_kept = {}, {}, {}, {}
for i = 9, #ARGV, 4 do
  keys[#keys + 1] = ARGV[1] .. ARGV[i]
  local status = ARGV[i + 2]
  if status ~= 'new' then add_key(keys, seen, ARGV[5] .. status) end
  for _, old in ipairs(moved_from[status] or {}) do
    local index = ARGV[5] .. old
    add_key(keys, seen, index)
    local l = leave[index]
    if not l then l = {}; leave[index] = l end
    l[#l + 1] = ARGV[i]
  end
  if ARGV[i + 1] ~= '' then steps_kept[i] = redis.call('EXISTS', ARGV[4] .. ARGV[i]) == 1 end
end
touch(keys)
local touched = {}
for i = 9, #ARGV, 4 do
  local key, ttl, status = ARGV[1] .. ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if status ~= 'new' then  -- queued tasks are not listed (see RedisStorage.recent)
    local index = ARGV[5] .. status
    redis.call('ZADD', index, ARGV[6], ARGV[i])
    touched[index] = true
  end
  local record = ARGV[i + 3]
  if ttl == '' or ttl == '0' then
    redis.call('SET', key, record)
  else
    redis.call('SET', key, record, 'PX', ttl)
  end
  if ttl ~= '' then
    redis.call(ARGV[3], ARGV[2] .. ARGV[i], record)
    local steps = ARGV[4] .. ARGV[i]
    if steps_kept[i] then
      -- The end mark wakes readers blocked on the stream; it lives as long as the record.
      redis.call('XADD', steps, '0-' .. (last_seq(steps) + 1), 'end', '1')
      if ttl == '0' then redis.call('PERSIST', steps) else redis.call('PEXPIRE', steps, ttl) end
    end
  end
end
for index in pairs(touched) do
  redis.call('ZREMRANGEBYRANK', index, 0, -tonumber(ARGV[7]) - 1)
  if ARGV[8] == '' then redis.call('PERSIST', index) else redis.call('PEXPIRE', index, ARGV[8]) end
end
for index, uuids in pairs(leave) do
  -- only the uuids the set holds: a chunk must not empty it before the next one
  local held = {}
  for _, u in ipairs(uuids) do
    if not held[u] and redis.call('ZSCORE', index, u) then held[u] = true; held[#held + 1] = u end
  end
  in_chunks('ZREM', index, held)
end
return 1
""",
)

ADD_STEPS = script(
    "add_steps",
    _LAST_SEQ
    + """
-- KEYS[1] the task's step stream; ARGV[1] MAXLEN, ARGV[2] milliseconds to live ('' = no
-- expiry), ARGV[3...] the steps. Returns the id sequence number of the last one.
local n = last_seq(KEYS[1])
for i = 3, #ARGV do
  n = n + 1
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-' .. n, 'v', ARGV[i])
end
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
""",
)

READ_STEPS = script(
    "read_steps",
    """
-- KEYS[1] the task's record, KEYS[2] its step stream; ARGV[1] the first id to read,
-- ARGV[2] how many at most, ARGV[3] milliseconds to live of a stream made here ('' = no
-- expiry). Returns {record or nil, entries}.
local record = redis.call('GET', KEYS[1])
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
if record and #entries == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  -- An empty stream, so that the save of the final record puts its end mark in it and
  -- wakes the XREAD the reader blocks in next. (A group is the only way to make an
  -- empty stream; nobody reads through it.)
  redis.call('XGROUP', 'CREATE', KEYS[2], 'qtasks', '0', 'MKSTREAM')
  if ARGV[3] ~= '' then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
end
return {record, entries}
""",
)


INCR = script(
    "state_incr",
    """
-- KEYS[1] the state hash; ARGV[1] key, ARGV[2] amount, ARGV[3] '1' if the amount is an int.
-- Returns {'int', n}, {'float', text} or {'nan', current value} (not a number: TypeError).
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
if ARGV[3] == '1' and string.match(cur, '^%-?%d+$') then
  return {'int', redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])}
end
if not string.match(cur, '^%-?%d+%.?%d*[eE]?[-+]?%d*$') then return {'nan', cur} end
local text = string.format('%.17g', tonumber(cur) + tonumber(ARGV[2]))
if not string.find(text, '[.eEn]') then text = text .. '.0' end
redis.call('HSET', KEYS[1], ARGV[1], text)
return {'float', text}
""",
)

RELEASE_LOCK = script(
    "state_release_lock",
    """
-- KEYS[1] the lock; ARGV[1] the token that must hold it
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
)


class RedisStorage(RedisComponent, Storage):
    """The storage of `redis://`, `rediss://` and `unix://` URLs; see the module docstring."""

    error_class = StorageError

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
    ) -> None:
        super().__init__(url, namespace=namespace, config=config)
        self._waiters = Waiters()
        self._rereads: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect and join this process's waiters for the app."""
        await super().start()
        self._waiters = self.link.shared("waiters", self.namespace, Waiters)

    async def stop(self) -> None:
        """Disconnect (re-reads after a reconnect are awaited first)."""
        if self._rereads:
            await asyncio.gather(*self._rereads, return_exceptions=True)
        await super().stop()

    def encode_records(self, tasks: Sequence[Task]) -> list[tuple[str, bytes]]:
        """(uuid, encoded record) pairs; EncodeError names the task that cannot be stored."""
        out = []
        for task in tasks:
            try:
                out.append((str(task.uuid), _encoder.encode(task)))
            except (TypeError, ValueError, OverflowError) as exc:
                raise EncodeError(f"task {task.uuid} cannot be stored: {exc}") from exc
        return out

    async def add(self, tasks: Sequence[Task]) -> None:
        """Store new records (one MSET; a record with the same uuid is replaced)."""
        if not tasks:
            return
        prefix = self.keys.record_prefix
        args: list[str | bytes] = []
        for uuid, record in self.encode_records(tasks):
            args += (prefix + uuid, record)
        await self._call("MSET", *args)

    async def save(self, tasks: Sequence[Task]) -> None:
        """Write records, publish the final ones (one script call), wake local waiters."""
        if not tasks:
            return
        await self._run([self.save_command(tasks)])
        self.saved(tasks)

    def saved(self, tasks: Sequence[Task]) -> None:
        """Wake this process's waiters of records written by `save_command`."""
        self._waiters.notify(tasks)

    def save_command(self, tasks: Sequence[Task]) -> tuple[Any, ...]:
        """The one command `save` sends, for a broker that pipelines it with its acks."""
        ttl = self.config.result_ttl_seconds
        now = time.time()
        k = self.keys
        publish = "SPUBLISH" if self.link.cluster else "PUBLISH"
        # The index outlives the records it lists by a day, so an idle app's index goes too.
        index_ttl = "" if ttl is None else str(int((ttl + 86_400) * 1000))
        args: list[str | bytes] = [
            k.record_prefix,
            k.done_prefix,
            publish,
            k.steps_prefix,
            self.index_prefix,
            str(int(now * 1000)),
            str(RECENT_PER_STATUS),
            index_ttl,
        ]
        for task, (uuid, record) in zip(tasks, self.encode_records(tasks), strict=True):
            if not task.is_final:
                expiry = ""
            elif ttl is None:
                expiry = "0"
            else:
                expiry = str(max(1, int(((task.finished_at or now) + ttl - now) * 1000)))
            args += (uuid, expiry, task.status.value, record)
        return SAVE.command([k.record(str(tasks[0].uuid))], args)

    @property
    def index_prefix(self) -> str:
        """+ status: ZSET uuid -> time written, the records `recent` lists (not `new`)."""
        return f"{self.keys.prefix}recent:"

    async def recent(self, status: TaskStatusEnum, limit: int) -> list[Task]:
        """Up to `limit` records with `status`, latest written first.

        Kept by `save` for every status a worker writes (process, retry, success, error,
        cancel), the newest RECENT_PER_STATUS of each; queued (`new`) tasks are not
        indexed, to keep the enqueue path as it is: NotImplementedError for them.
        """
        if status is TaskStatusEnum.NEW:
            raise NotImplementedError(
                f"{type(self).__name__} cannot list queued (new) tasks; see the queue depths"
            )
        if limit <= 0:
            return []
        index = self.index_prefix + status.value
        found: list[Task] = []
        start = 0
        stale: list[str] = []
        while len(found) < limit:
            # Over-read a little: entries of expired records are skipped (and removed).
            page = max(limit - len(found), 10) * 2
            uuids = await self._call("ZREVRANGE", index, start, start + page - 1)
            if not uuids:
                break
            start += len(uuids)
            names = [u.decode() if isinstance(u, bytes) else str(u) for u in uuids]
            raws = await self._call("MGET", *[self.keys.record(u) for u in names])
            for uuid, raw in zip(names, raws, strict=True):
                record = None if raw is None else self._decode(raw, uuid)
                if record is None:
                    stale.append(uuid)
                elif record.status is status and len(found) < limit:
                    found.append(record)
        if stale:
            await self._call("ZREM", index, *stale)
        return found

    async def get(self, uuid: str) -> Task | None:
        """The record, or None if unknown or expired."""
        raw = await self._call("GET", self.keys.record(str(uuid)))
        return None if raw is None else self._decode(raw, uuid)

    def _decode(self, raw: bytes, uuid: str) -> Task:
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise StorageError(f"record {uuid} in {self!r} is corrupt: {exc}") from exc

    async def wait(self, uuid: str, timeout: float) -> Task | None:
        """The final record, or None after `timeout`; see the module docstring for how."""
        uuid = str(uuid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        waiters = self._waiters
        fut = waiters.register(uuid)
        channel = self.keys.done(uuid)
        subscriber = self.link.subscriber

        def on_message(payload: bytes | None) -> None:
            if payload is None:  # reconnected: a publish may have been missed
                task = asyncio.ensure_future(self._reread(uuid))
                self._rereads.add(task)
                task.add_done_callback(self._rereads.discard)
                return
            try:
                record = _decoder.decode(payload)
            except msgspec.DecodeError:
                return
            waiters.notify((record,))

        try:
            confirmed = subscriber.subscribe(channel, on_message)
            if confirmed is not None:
                # Unconfirmed after `timeout` (Redis unreachable): the read below decides.
                await asyncio.wait((confirmed,), timeout=max(timeout, 0.0))
            current = await self.get(uuid)
            if current is None:  # never enqueued, expired, or evicted by maxmemory
                raise TaskNotFound(uuid)
            if current.is_final:
                return current
            remaining = deadline - loop.time()
            if remaining > 0:
                done, _ = await asyncio.wait((fut,), timeout=remaining)
                if done:
                    return fut.result()
            if await self.get(uuid) is None:  # gone while waiting: say so, not "timeout"
                raise TaskNotFound(uuid)
            return None
        finally:
            waiters.discard(uuid, fut)
            subscriber.unsubscribe(channel, on_message)

    async def _reread(self, uuid: str) -> None:
        try:
            current = await self.get(uuid)
        except StorageError:
            return  # the next reconnect re-reads again
        if current is not None and current.is_final:
            self._waiters.notify((current,))

    async def remove(self, uuids: Sequence[str]) -> None:
        """Delete records."""
        if uuids:
            keys = self.keys
            await self._call(
                "DEL", *(k for u in uuids for k in (keys.record(str(u)), keys.steps(str(u))))
            )

    # -- Steps ---------------------------------------------------------------------------

    def _steps_ttl(self) -> str:
        ttl = self.config.result_ttl_seconds
        return "" if ttl is None else str(max(1, int(ttl * 1000)))

    async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
        """Append steps to the task's stream in one script call (readers wake in XREAD)."""
        uuid = str(uuid)
        encoded = []
        for value in values:
            try:
                encoded.append(_encoder.encode(value))
            except (TypeError, ValueError, OverflowError) as exc:
                raise EncodeError(f"a step of task {uuid} cannot be stored: {exc}") from exc
        if encoded:
            args = [STEP_STREAM_MAXLEN, self._steps_ttl(), *encoded]
            # Not retried: a lost reply after the script ran would add the steps twice.
            await self._eval(ADD_STEPS, [self.keys.steps(uuid)], args, retry=False)

    async def steps(self, uuid: str, after: int, timeout: float) -> Steps:
        """Steps from `after` on, or the final record; blocks in XREAD for either."""
        uuid = str(uuid)
        after = max(after, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        keys = [self.keys.record(uuid), self.keys.steps(uuid)]
        while True:
            raw, entries = await self._eval(
                READ_STEPS, keys, [f"0-{after + 1}", _STEPS_COUNT, self._steps_ttl()]
            )
            values: list[Any] = []
            for entry_id, fields in entries:
                after = int(entry_id.rpartition(b"-")[2])
                if fields[0] == b"v":  # else the end mark: it only wakes readers
                    values.append(self._decode_step(fields[1], uuid))
            record = None if raw is None else self._decode(raw, uuid)
            final = record if record is not None and record.is_final else None
            remaining = deadline - loop.time()
            if values or final is not None or remaining <= 0:
                return Steps(values, after, final)
            # Until the next entry: a step, or the end mark the final save adds.
            block_ms = max(1, int(remaining * 1000))
            command = ("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", keys[1], f"0-{after}")
            await self._run([command], read_timeout=remaining + BLOCKING_READ_MARGIN_SECONDS)

    def _decode_step(self, raw: bytes, uuid: str) -> Any:
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise StorageError(f"a step of task {uuid} in {self!r} is corrupt: {exc}") from exc

    # -- State ---------------------------------------------------------------------------

    def _state(self, name: str) -> str:
        return f"{self.keys.prefix}state:{name}"

    async def state_get(self, name: str, key: str, default: Any = None) -> Any:
        """The value under key of state `name`, or default."""
        raw = await self._call("HGET", self._state(name), key)
        return default if raw is None else msgspec.json.decode(raw)

    async def state_get_all(self, name: str) -> dict[str, Any]:
        """Every key and value of state `name` (one HGETALL: a consistent snapshot)."""
        flat = await self._call("HGETALL", self._state(name))
        pairs = {flat[i].decode(): msgspec.json.decode(flat[i + 1]) for i in range(0, len(flat), 2)}
        return dict(sorted(pairs.items()))

    async def state_update(self, name: str, values: Mapping[str, Any]) -> None:
        """Set several keys in one HSET (all or none)."""
        args: list[Any] = []
        for key, value in values.items():
            args += (key, encode_value(value))
        if args:
            await self._call("HSET", self._state(name), *args)

    async def state_delete(self, name: str, keys: Sequence[str] | None = None) -> None:
        """Delete keys (the whole state when None) in one command."""
        if keys is None:
            await self._call("DEL", self._state(name))
        elif keys:
            await self._call("HDEL", self._state(name), *keys)

    async def state_incr(self, name: str, key: str, amount: int | float = 1) -> int | float:
        """Add `amount` in Redis, atomically; the new value."""
        add_number(name, key, 0, amount)  # TypeError for a non-number amount
        is_int = not isinstance(amount, float)
        kind, value = await self._eval(
            INCR, [self._state(name)], [key, repr(amount), "1" if is_int else "0"]
        )
        if kind == b"int":
            return int(value)
        if kind == b"float":
            return float(value)
        current = msgspec.json.decode(value)
        result: int | float = add_number(name, key, current, amount)  # raises TypeError
        return result  # pragma: no cover - a number the pattern missed (e.g. 1e5 as int)

    async def state_acquire_lock(
        self, name: str, key: str, token: str, expire_seconds: float
    ) -> bool:
        """SET NX PX: taken if free (an expired lock is gone already)."""
        ms = max(1, int(expire_seconds * 1000))
        reply = await self._call("SET", self._lock(name, key), token, "NX", "PX", ms)
        return reply is not None

    async def state_release_lock(self, name: str, key: str, token: str) -> bool:
        """Free the lock if `token` still holds it (compare-and-delete in one script)."""
        return bool(await self._eval(RELEASE_LOCK, [self._lock(name, key)], [token]))

    def _lock(self, name: str, key: str) -> str:
        return f"{self.keys.prefix}lock:{name}:{key}"
