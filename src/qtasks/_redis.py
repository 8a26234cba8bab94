"""The shared Redis link behind the redis broker, storage and global config.

URLs: `redis://[user:password@]host:port/db`, `rediss://...` (TLS; redis-py's query
options such as `ssl_cert_reqs=none`, `ssl_ca_certs=/path`, `ssl_certfile`, `ssl_keyfile`,
`ssl_check_hostname=false`), `unix:///path/redis.sock?db=0`, and a Redis Cluster with
`?cluster=true` on a redis:// or rediss:// URL naming any node (database 0 only).
Passwords never appear in logs, reprs or errors (`qtasks.urls.redact_url`).

Why it looks like this:

* One `RedisLink` per (URL, event loop, process) — per namespace too on a Cluster, see
  below — shared by every component through a ref-counted registry (`acquire` /
  `RedisLink.release`), so a producer's broker and storage use the same connections and
  `enqueue` can write the record and the message in ONE script call.
* redis-py does what it is good at: parsing the URL, the connection handshake (AUTH,
  SELECT, TLS, CLIENT SETNAME `qtasks-<pid>`) and the hiredis reply parser. The link
  keeps its own small pool of redis-py `Connection`s and sends commands on them directly,
  packed by hiredis in C: the client's generic path (pool lock, a health check reading the
  socket on every checkout, observability hooks, response callbacks) cost about 40% of a
  loopback round trip when measured, and every qtasks operation is one command or one
  pipeline anyway. Connections speak RESP2 whatever the URL says: replies are read raw,
  so their shapes must not change with the protocol. Sockets have no read timeout (with
  one, redis-py wraps every write in a `wait_for`, a task per command); TCP keepalive
  finds dead peers and blocking reads get an explicit timeout.
* Every multi-key operation is a Lua script (see the broker), loaded once per link and
  run with EVALSHA; NOSCRIPT (a restarted or flushed server) reloads and re-runs.
* Retries are explicit: `run(..., retry=True)` retries connection errors with backoff
  (0, 0, 50 ms, 100 ms, ... about 1.5 s in all) and then raises; only operations that are
  safe to repeat ask for it. After a connection error every idle connection is dropped
  too, since after a server restart they are all stale.
* Keys are `qtasks:{<namespace>}:...`. The `{...}` hash tag puts all of one app's keys in
  one Redis Cluster slot, so every script may touch any of them. On a Cluster the link
  asks a seed node (`CLUSTER SLOTS`) which master serves that slot and talks only to it,
  following MOVED (for good) and ASK replies and asking again after connection errors.
  While the slot migrates, a plain command told ASK is sent once to the importing node
  after ASKING; a script never is (it touches keys it does not declare, which that node
  would create beside the ones still to move: the migration then fails with BUSYKEY), so
  it waits with backoff, like any command told TRYAGAIN, until the migration ends (up to
  CLUSTER_WAIT_SECONDS). A script stopped at a moved key has written nothing, since every
  writing script touches its keys first (`TOUCH`), so running it again is safe. Pub/sub
  follows the slot too: the old master unsubscribes its channels when it gives the slot
  away. This replaces
  redis-py's cluster client: all of one app's commands go to one node anyway, and the
  single-node code path stays the fast one. The trade-off: one app lives on one master;
  several apps spread over the cluster.
* Waiting for results uses pub/sub: one subscriber connection per link (`Subscriber`),
  subscribed to one channel per awaited task (`SSUBSCRIBE` on a Cluster, where plain
  pub/sub is broadcast to every node). Writers publish the final record itself, so a
  woken waiter needs no further read. A channel per task rather than one per app: a
  process waiting for one result is not sent every other result of the app.
* `Batcher` coalesces concurrent calls (enqueue) into few writes, with up to four in
  flight so a bulk enqueue's chunks overlap with the server's work on earlier ones (up
  to eight for full batches, written by the caller that fills one: see its docstring).
  A command may come already packed (`Packed`): the broker builds ENQUEUE's RESP itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import random
import socket
import sys
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from qtasks.config import QueueConfig
from qtasks.errors import ConfigurationError, QTasksError
from qtasks.urls import redact_url

try:
    import redis
    import redis.asyncio
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import NoBackoff
    from redis.crc import key_slot
    from redis.exceptions import (
        AskError,
        ClusterDownError,
        MovedError,
        NoScriptError,
        RedisError,
        ResponseError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry as SyncRetry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the Redis backend needs redis-py; install it with: pip install 'qtasks[redis]'"
    ) from exc

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - redis-py works without hiredis, only slower
    _hiredis_pack = None

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - redis-py depends on async-timeout there
    from async_timeout import timeout as _timeout

T = TypeVar("T")
C = TypeVar("C", bound="RedisComponent")

log = logging.getLogger(__name__)

DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_NAMESPACE = "QueueTasks"
CONNECT_TIMEOUT_SECONDS = 5.0
BLOCKING_READ_MARGIN_SECONDS = 10.0
"""How long past a blocking command's own timeout a reply may take before the link gives up."""
_RETRY_DELAYS = (0.0, 0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
_KEEPALIVE = {
    opt: value
    for opt, value in (
        (getattr(socket, "TCP_KEEPIDLE", None), 10),
        (getattr(socket, "TCP_KEEPINTVL", None), 5),
        (getattr(socket, "TCP_KEEPCNT", None), 3),
    )
    if opt is not None
}
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_REDIRECT_ERRORS = (MovedError, AskError, TryAgainError, ClusterDownError)
CLUSTER_WAIT_SECONDS = 30.0
"""How long a command waits for a Cluster slot migration (or failover) to end."""

# -- URLs and keys -----------------------------------------------------------------------


def client_name() -> str:
    """The name qtasks connections give themselves (CLIENT LIST shows which process)."""
    return f"qtasks-{os.getpid()}"


@functools.cache
def driver_options() -> dict[str, Any]:
    """CLIENT SETINFO of qtasks connections: `lib-name redis-py(qtasks_vX)`, `lib-ver`.

    Given explicitly because redis-py's default looks its own version up in the installed
    package metadata for every new connection (reading files, importing the email
    package). redis-py before 7.1 has no DriverInfo: its defaults are kept there.
    """
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # pragma: no cover - depends on the installed redis-py
        return {}
    from qtasks._version import __version__

    info = DriverInfo(lib_version=redis.__version__)
    return {"driver_info": info.add_upstream_driver("qtasks", __version__)}


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """What a qtasks Redis URL names: redis-py's URL (our own options removed), cluster mode."""

    url: str
    connect_url: str
    cluster: bool


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_url(url: str) -> RedisTarget:
    """Check a `redis://`, `rediss://` or `unix://` URL; `?cluster=true` selects Cluster mode.

    Everything else in the URL (user, password, db, TLS options such as
    `ssl_cert_reqs=none` or `ssl_ca_certs=/path`) is redis-py's `from_url` syntax.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"{redact_url(url)!r} is not a Redis URL; use redis://host:6379/0, "
            f"rediss://... (TLS) or unix:///path/to/redis.sock"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    cluster = False
    kept: list[tuple[str, str]] = []
    for name, value in query:
        if name == "cluster":
            if value.lower() not in _TRUE | _FALSE:
                raise ConfigurationError(
                    f"cluster={value!r} in {redact_url(url)!r}: use true/false"
                )
            cluster = value.lower() in _TRUE
        else:
            kept.append((name, value))
    if cluster and scheme == "unix":
        raise ConfigurationError("a Redis Cluster is reached over TCP: use redis:// or rediss://")
    connect_url = urlunsplit(parts._replace(query=urlencode(kept)))
    try:
        redis.asyncio.connection.parse_url(connect_url)
    except ValueError as exc:
        raise ConfigurationError(f"bad Redis URL {redact_url(url)!r}: {exc}") from exc
    if cluster and parts.path not in ("", "/", "/0"):
        raise ConfigurationError("a Redis Cluster has only database 0; drop the /db part")
    return RedisTarget(url, connect_url, cluster)


def with_host(url: str, host: str, port: int) -> str:
    """`url` pointing at host:port instead, credentials and options kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{hostport}" if userinfo else hostport
    return urlunsplit(parts._replace(netloc=netloc))


class Keys:
    """Every key name of one app (namespace); all share the `{namespace}` hash tag."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = f"qtasks:{{{namespace}}}:"
        p = self.prefix
        self.consumers = p + "consumers"
        """ZSET consumer id → last heartbeat (Redis TIME)."""
        self.bodies = p + "bodies"
        """HASH message id → body."""
        self.counts = p + "counts"
        """HASH message id → deliveries so far, for delivered messages that are not in flight."""
        self.record_prefix = p + "task:"
        """+ uuid: STRING, the msgspec JSON of a `Task`."""
        self.done_prefix = p + "done:"
        """+ uuid: pub/sub channel carrying the task's final record."""
        self.steps_prefix = p + "steps:"
        """+ uuid: STREAM of a generator task's steps (see qtasks.storages.redis)."""
        self.config = p + "config"
        self.workers = p + "workers"
        self.worker_beats = p + "workers:heartbeat"

    def ready(self, queue: str) -> str:
        """ZSET message id → priority; equal priorities sort by id (creation time first)."""
        return f"{self.prefix}ready:{queue}"

    def delayed(self, queue: str) -> str:
        """ZSET '<priority>:<message id>' → due time (Redis clock)."""
        return f"{self.prefix}delayed:{queue}"

    def wake(self, queue: str) -> str:
        """LIST of wake tokens idle consumers of the queue block on."""
        return f"{self.prefix}wake:{queue}"

    def inflight(self, consumer: str) -> str:
        """HASH message id → '<deliveries>:<priority>:<queue>' of one consumer's claims."""
        return f"{self.prefix}inflight:{consumer}"

    def wakeup(self, consumer: str) -> str:
        """LIST that wakes one consumer's blocked fetch (used by its stop())."""
        return f"{self.prefix}wakeup:{consumer}"

    def dead(self, queue: str) -> str:
        """HASH uuid → msgpack of a `DeadLetter`: the queue's dead letters."""
        return f"{self.prefix}dead:{queue}"

    def dead_at(self, queue: str) -> str:
        """ZSET uuid → dead_at: the queue's dead letters by age (newest last)."""
        return f"{self.prefix}dead_at:{queue}"

    def record(self, uuid: str) -> str:
        """The record of one task."""
        return self.record_prefix + uuid

    def done(self, uuid: str) -> str:
        """The channel the final record of one task is published on."""
        return self.done_prefix + uuid

    def steps(self, uuid: str) -> str:
        """The stream of one task's steps."""
        return self.steps_prefix + uuid


# -- scripts -----------------------------------------------------------------------------


class Script:
    """A Lua script, run by its SHA1 (loaded into the server on demand)."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        """The EVALSHA command that runs this script."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"<Script {self.name}>"


_SCRIPTS: dict[str, Script] = {}


class Packed:
    """A command already in RESP, sent as is: for callers that build the wire format of
    many small pieces faster than packing their arguments (see the broker's enqueue)."""

    __slots__ = ("data", "name")

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        """The command's name (EVALSHA, ...): what `_is_script` and tests look at."""
        self.data = data

    def __repr__(self) -> str:
        return f"<Packed {self.name} {len(self.data)} bytes>"


Command = Sequence[Any] | Packed
"""A command: its arguments (packed by `_pack`), or already packed."""


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


TOUCH = """
-- On a Cluster whose slot is migrating, any command on a key that moved already (or does
-- not exist) fails, and Lua has no rollback: a writing script touches every key it will
-- use before its first write, so it stops with nothing written and is run again once
-- the migration is over. Nothing moves while a script runs, so a touched key stays
-- until the script itself empties it: a key a script may empty gets one deleting call,
-- its last. Keys in KEYS need no touch: the server checks them before the script runs.
local function touch(keys)
  for i = 1, #keys, 1000 do
    redis.call('EXISTS', unpack(keys, i, math.min(i + 999, #keys)))
  end
end
local function add_key(keys, seen, key)
  if not seen[key] then
    seen[key] = true
    keys[#keys + 1] = key
  end
end
-- In chunks (unpack's limit), so the command must leave the key non-empty until the
-- last chunk: every member given must be present (see `present`).
local function in_chunks(cmd, key, members)
  for i = 1, #members, 1000 do
    redis.call(cmd, key, unpack(members, i, math.min(i + 999, #members)))
  end
end
-- The fields of `ids` (unique) that the hash holds.
local function present(key, ids)
  local out = {}
  for i = 1, #ids, 1000 do
    local part = {unpack(ids, i, math.min(i + 999, #ids))}
    local got = redis.call('HMGET', key, unpack(part))
    for j = 1, #part do
      if got[j] then out[#out + 1] = part[j] end
    end
  end
  return out
end
"""
"""Lua helpers of the writing scripts: all-or-nothing while the slot migrates."""


def script(name: str, source: str) -> Script:
    """Register a script; every link loads the registered scripts when it opens."""
    s = Script(name, source)
    _SCRIPTS[s.sha] = s
    return s


# -- the link ----------------------------------------------------------------------------


class RedisLink:
    """Connections to the node that holds one app's keys; see the module docstring."""

    def __init__(self, target: RedisTarget, namespace: str) -> None:
        self.target = target
        self.namespace = namespace
        self.redacted = redact_url(target.url)
        self.pid = os.getpid()
        self.refs = 0
        self.node_url = target.connect_url
        """The node this link talks to (the seed itself unless in Cluster mode)."""
        self._factory: redis.asyncio.ConnectionPool | None = None
        self._idle: list[AbstractConnection] = []
        self._open: set[AbstractConnection] = set()
        self._stale: weakref.WeakSet[AbstractConnection] = weakref.WeakSet()
        """Connections to the node served before a redirect (in use then): never reused."""
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._shared: dict[tuple[str, str], Any] = {}
        self._subscriber: Subscriber | None = None
        self._closed = False

    @property
    def cluster(self) -> bool:
        """True when the URL names a Redis Cluster."""
        return self.target.cluster

    # -- lifecycle -----------------------------------------------------------------------

    def _make_factory(self, url: str) -> redis.asyncio.ConnectionPool:
        options: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "retry": AsyncRetry(NoBackoff(), 0),
            # Replies are read raw, in RESP2 shapes (flat arrays, pub/sub as arrays).
            "protocol": 2,
            "client_name": client_name(),
            **driver_options(),
        }
        if urlsplit(url).scheme.lower() != "unix":
            options["socket_keepalive"] = True
            options["socket_keepalive_options"] = _KEEPALIVE
        return redis.asyncio.ConnectionPool.from_url(url, **options)

    def sync_client(self, socket_timeout: float, url: str | None = None) -> redis.Redis:
        """A blocking client to the node (or `url`), for a thread (one connection, no retries)."""
        url = url or self.node_url
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": min(socket_timeout, CONNECT_TIMEOUT_SECONDS),
            "retry": SyncRetry(NoBackoff(), 0),
            "single_connection_client": True,
            "protocol": 2,
            "client_name": client_name(),
            **driver_options(),
        }
        if urlsplit(url).scheme.lower() != "unix":
            options["socket_keepalive"] = True
            options["socket_keepalive_options"] = _KEEPALIVE
        return redis.Redis.from_url(url, **options)

    async def open(self) -> None:
        """Find the node (Cluster mode) and load the scripts; fails early if unreachable."""
        async with self._open_lock:
            if self._opened:
                return
            if self._factory is None:
                self._factory = self._make_factory(self.node_url)
            if self.cluster:
                await self._discover()
            await self.load_scripts()
            self._opened = True

    async def close(self) -> None:
        """Close every connection (subscriber included)."""
        self._closed = True
        sub, self._subscriber = self._subscriber, None
        if sub is not None:
            await sub.close()
        await self._drop_connections(all_open=True)
        factory, self._factory = self._factory, None
        if factory is not None:
            await factory.aclose()

    def release(self) -> None:
        """Drop one reference; the last one unregisters the link (close() is awaited by it)."""
        self.refs -= 1
        if self.refs <= 0:
            key = _registry_key(self.target, self.namespace)
            if _registry.get(key) is self:
                del _registry[key]

    def shared(self, kind: str, namespace: str, factory: Callable[[], T]) -> T:
        """A per-(kind, namespace) object shared by this link's components."""
        key = (kind, namespace)
        obj = self._shared.get(key)
        if obj is None:
            obj = self._shared.setdefault(key, factory())
        return obj  # type: ignore[no-any-return]

    @property
    def subscriber(self) -> Subscriber:
        """The link's pub/sub connection (started on first use)."""
        if self._subscriber is None:
            self._subscriber = Subscriber(self)
        return self._subscriber

    # -- connections ---------------------------------------------------------------------

    def new_connection(self) -> AbstractConnection:
        """A fresh, unconnected connection to the node (not pooled)."""
        if self._factory is None:
            self._factory = self._make_factory(self.node_url)
        return _make_connection(self._factory)

    async def _acquire(self) -> AbstractConnection:
        if self._closed:
            raise RedisConnectionError("the link is closed")
        conn = self._idle.pop() if self._idle else self.new_connection()
        while conn in self._stale:  # released after the link moved to another node
            self._open.discard(conn)
            await _disconnect_quietly(conn)
            conn = self._idle.pop() if self._idle else self.new_connection()
        self._open.add(conn)
        if not conn.is_connected:
            try:
                await _connect(conn)
            except BaseException:
                self._open.discard(conn)
                raise
        return conn

    def _release(self, conn: AbstractConnection) -> None:
        if self._closed or not conn.is_connected:
            self._open.discard(conn)
            return
        self._idle.append(conn)

    async def _drop_connections(self, *, all_open: bool = False) -> None:
        conns = list(self._idle)
        self._idle.clear()
        if all_open:
            conns += [c for c in self._open if c not in conns]
            self._open.clear()
        for conn in conns:
            self._open.discard(conn)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _send(self, commands: Sequence[Command], read_timeout: float | None) -> list[Any]:
        conn = await self._acquire()
        try:
            packed = _pack(conn, commands)
            await conn.send_packed_command(packed, check_health=False)
            out: list[Any] = []
            for _ in commands:
                try:
                    if read_timeout is None:
                        reply = await conn.read_response(disable_decoding=True)
                    else:
                        reply = await _read_with_timeout(conn, read_timeout)
                except ResponseError as err:
                    reply = err
                out.append(reply)
        except BaseException:
            # The reply stream is out of step or the socket is gone: never reuse it.
            self._open.discard(conn)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        self._release(conn)
        return out

    async def run(
        self,
        commands: Sequence[Command],
        *,
        retry: bool = True,
        read_timeout: float | None = None,
    ) -> list[Any]:
        """Send commands in one round trip; their replies (ResponseErrors as values).

        EVALSHA of an unloaded script is loaded and re-run, and on a Cluster redirected
        commands are followed (see `_fix_replies`): neither ran, so both are re-sent even
        without `retry`. With `retry`, connection errors are retried with backoff: only for
        operations that are safe to repeat.
        """
        attempts = _RETRY_DELAYS if retry else (0.0,)
        for attempt, delay in enumerate(attempts):
            if delay:
                await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                replies = await self._send(commands, read_timeout)
                if not any(isinstance(r, ResponseError) for r in replies):
                    return replies
                return await self._fix_replies(commands, replies, read_timeout, retry)
            except _CONNECTION_ERRORS:
                await self._drop_connections()
                if self.cluster:
                    with contextlib.suppress(*_CONNECTION_ERRORS, RedisError):
                        await self._discover()
                if attempt == len(attempts) - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fix_replies(
        self,
        commands: Sequence[Command],
        replies: list[Any],
        read_timeout: float | None,
        retry: bool,
    ) -> list[Any]:
        """Re-send the commands that did not run until they do; the replies of all.

        Only the failed commands are re-sent (the others ran: not twice), in their order:
        NOSCRIPT after loading the scripts; MOVED on the new master (the link follows it
        for good); ASK, for a plain command, once on the importing node after ASKING. A
        script is never sent to an importing node: it touches keys it does not declare,
        which that node would create beside the ones still to be migrated (splitting the
        app's data; the migration then fails with BUSYKEY). A script told ASK, and every
        command told TRYAGAIN (some of its keys moved already) or CLUSTERDOWN, waits with
        backoff until the slot's migration (or failover) is over, up to
        CLUSTER_WAIT_SECONDS. So does a script that stopped at an undeclared key already
        migrated ("non local key"), if `retry` says it is safe to run again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLUSTER_WAIT_SECONDS
        pause, hops, reloads = 0.01, 0, 0
        while True:
            todo = [i for i, r in enumerate(replies) if _not_run(r, retry)]
            if not todo:
                return replies
            failed = [replies[i] for i in todo]
            moved = next((r for r in failed if isinstance(r, MovedError)), None)
            asked: list[int] = []
            if moved is None and any(isinstance(r, NoScriptError) for r in failed):
                reloads += 1
                if reloads > 2:  # loaded, yet missing again: report it, do not spin
                    return replies
                await self.load_scripts()
                continue_now = True
            else:
                if moved is None:
                    asked = [
                        i
                        for i in todo
                        if isinstance(replies[i], AskError) and not _is_script(commands[i])
                    ]
                hops += 1
                # MOVED is followed at once (a few times: nodes can disagree for a moment);
                # otherwise the slot is moving: wait for the migration to end.
                continue_now = bool(asked) or (moved is not None and hops <= 3)
            if not continue_now:
                if loop.time() >= deadline:
                    raise RedisConnectionError(
                        f"slot {self.slot} of the Redis Cluster is still migrating or down "
                        f"after {CLUSTER_WAIT_SECONDS:.0f}s: {failed[0]}"
                    )
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, 0.2)
                if moved is None and any(isinstance(r, ClusterDownError) for r in failed):
                    with contextlib.suppress(*_CONNECTION_ERRORS, RedisError):
                        await self._discover()  # a failover: a replica took over
            if moved is not None:
                await self._point_to(
                    with_host(self.target.connect_url, moved.host, int(moved.port))
                )
            if asked:
                ask = replies[asked[0]]
                node = with_host(self.target.connect_url, ask.host, int(ask.port))
                where = (ask.host, ask.port)
                target = [i for i in asked if (replies[i].host, replies[i].port) == where]
                again = await self._send_asking(node, [commands[i] for i in target], read_timeout)
                for i, reply in zip(target, again, strict=True):
                    replies[i] = reply
            else:
                again = await self._send([commands[i] for i in todo], read_timeout)
                for i, reply in zip(todo, again, strict=True):
                    replies[i] = reply

    async def _send_asking(
        self, node_url: str, commands: Sequence[Command], read_timeout: float | None
    ) -> list[Any]:
        """Send each command once to `node_url` after ASKING (it imports the slot): replies."""
        factory = self._make_factory(node_url)
        conn = _make_connection(factory)
        try:
            await _connect(conn)
            packed = _pack(conn, [c for command in commands for c in (("ASKING",), command)])
            await conn.send_packed_command(packed, check_health=False)
            out: list[Any] = []
            for n in range(2 * len(commands)):
                try:
                    if read_timeout is None:
                        reply = await conn.read_response(disable_decoding=True)
                    else:
                        reply = await _read_with_timeout(conn, read_timeout)
                except ResponseError as err:
                    reply = err
                if n % 2:
                    out.append(reply)
            return out
        finally:
            await _disconnect_quietly(conn)
            await factory.aclose()

    async def call(self, *args: Any, retry: bool = True) -> Any:
        """One command's reply; a ResponseError reply is raised."""
        (reply,) = await self.run([args], retry=retry)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def eval(
        self, s: Script, keys: Sequence[Any], args: Sequence[Any], *, retry: bool = True
    ) -> Any:
        """Run a script; its reply (a ResponseError from the script is raised)."""
        (reply,) = await self.run([s.command(keys, args)], retry=retry)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every registered script (one round trip)."""
        scripts = list(_SCRIPTS.values())
        replies = await self._send([("SCRIPT", "LOAD", s.source) for s in scripts], None)
        for reply in replies:
            if isinstance(reply, _REDIRECT_ERRORS):
                await self._redirect(reply)
                await self.load_scripts()
                return
            if isinstance(reply, ResponseError):
                raise reply

    # -- Cluster -------------------------------------------------------------------------

    @property
    def slot(self) -> int:
        """The Cluster slot of this link's namespace."""
        return key_slot(Keys(self.namespace).prefix.encode())

    async def _discover(self) -> None:
        """Point the link at the master serving the namespace's slot (asks the seed nodes)."""
        seeds = [self.node_url]
        if self.target.connect_url not in seeds:
            seeds.append(self.target.connect_url)
        last: BaseException | None = None
        for seed in seeds:
            factory = self._make_factory(seed)
            conn = _make_connection(factory)
            try:
                await _connect(conn)
                await conn.send_command("CLUSTER", "SLOTS")
                slots = await conn.read_response(disable_decoding=True)
            except (*_CONNECTION_ERRORS, RedisError) as exc:
                last = exc
                continue
            finally:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                await factory.aclose()
            seed_host = urlsplit(seed).hostname or "localhost"
            for start, end, master, *_ in slots:
                if int(start) <= self.slot <= int(end):
                    host = master[0].decode() if master[0] else seed_host
                    await self._point_to(with_host(self.target.connect_url, host, int(master[1])))
                    return
            last = RedisConnectionError(f"no master serves slot {self.slot} yet")
        assert last is not None
        raise last

    async def _redirect(self, error: ResponseError) -> None:
        if isinstance(error, (MovedError, AskError)):
            await self._point_to(with_host(self.target.connect_url, error.host, int(error.port)))
        else:  # TRYAGAIN / CLUSTERDOWN: a migration or failover is under way
            await asyncio.sleep(0.1)
            with contextlib.suppress(*_CONNECTION_ERRORS, RedisError):
                await self._discover()

    async def _point_to(self, node_url: str) -> None:
        if node_url == self.node_url and self._factory is not None:
            return
        log.info(
            "Redis Cluster: namespace %r is served by %s", self.namespace, redact_url(node_url)
        )
        self.node_url = node_url
        self._stale.update(self._open)  # in use now: they go back to the pool afterwards
        await self._drop_connections()
        old, self._factory = self._factory, self._make_factory(node_url)
        if old is not None:
            await old.aclose()
        if self._subscriber is not None:
            self._subscriber.reconnect()


def _pack(conn: AbstractConnection, commands: Sequence[Command]) -> list[bytes]:
    """RESP for the commands; hiredis packs in C, about 20x faster than redis-py's Python."""
    if _hiredis_pack is not None:
        try:
            return [c.data if isinstance(c, Packed) else _hiredis_pack(tuple(c)) for c in commands]
        except TypeError:  # an argument type hiredis does not pack: let redis-py say why
            pass
    return [c.data if isinstance(c, Packed) else b"".join(conn.pack_command(*c)) for c in commands]


def _make_connection(factory: redis.asyncio.ConnectionPool) -> AbstractConnection:
    conn: AbstractConnection = factory.make_connection()  # type: ignore[no-untyped-call]
    return conn


async def _connect(conn: AbstractConnection) -> None:
    await conn.connect()  # type: ignore[no-untyped-call]


class _SlotMoved(Exception):  # noqa: N818 - control flow, not an error
    """The node unsubscribed a channel we still want: its slot moved to another master."""


def _is_script(command: Command) -> bool:
    name = command.name if isinstance(command, Packed) else command[0]
    return (name.decode() if isinstance(name, bytes) else str(name)).upper() in ("EVALSHA", "EVAL")


def _not_run(reply: Any, retry: bool) -> bool:
    """True if the reply says its command did not run (or stopped early where `retry`)."""
    if isinstance(reply, (NoScriptError, *_REDIRECT_ERRORS)):
        return True
    # A script stopped at a key migrated away, or by the cluster going down, after its
    # writes so far: run again only if it is safe to repeat.
    return (
        retry
        and isinstance(reply, ResponseError)
        and any(m in str(reply) for m in _SCRIPT_CLUSTER_ERRORS)
    )


_SCRIPT_CLUSTER_ERRORS = ("access a non local key", "while the cluster is down")


async def _read_with_timeout(conn: AbstractConnection, timeout: float) -> Any:
    # Not read_response(timeout=): it returns None on expiry, as for a nil reply, and
    # keeps the connection. Cancelling the read makes redis-py drop the connection, so a
    # late reply can never be taken for the next command's.
    try:
        async with _timeout(timeout):
            return await conn.read_response(disable_decoding=True)
    except asyncio.TimeoutError:
        raise RedisTimeoutError(f"no reply within {timeout:.1f}s") from None


# -- pub/sub -----------------------------------------------------------------------------

Handler = Callable[[bytes | None], None]
"""Called with a message's payload, or None when messages may have been missed (reconnect)."""


class Subscriber:
    """One pub/sub connection shared by a link's storages; see the module docstring.

    `subscribe(channel, handler)` returns a future resolved once the server confirmed the
    subscription, so a caller that waits for it and reads the key afterwards never misses
    a publish. SUBSCRIBE and UNSUBSCRIBE go out through one FIFO outbox, in call order, so
    a channel left and joined again quickly ends up subscribed. After a reconnect every
    channel is subscribed again and, once confirmed, its handlers are called with None:
    publishes made while the connection was down were missed.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        sharded = link.cluster
        self._sub = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsub = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._sub_kind = b"ssubscribe" if sharded else b"subscribe"
        self._msg_kind = b"smessage" if sharded else b"message"
        self._unsub_kind = b"sunsubscribe" if sharded else b"unsubscribe"
        self._leaving: collections.Counter[bytes] = collections.Counter()
        """Channels this side unsubscribed whose confirmation has not come yet."""
        self._handlers: dict[bytes, list[Handler]] = {}
        self._confirmed: set[bytes] = set()
        self._resync: set[bytes] = set()
        self._confirm: dict[bytes, list[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None
        self._outbox: list[tuple[bytes, bytes]] = []
        self._sender: asyncio.Task[None] | None = None
        self._dropping: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def subscribe(self, channel: str, handler: Handler) -> asyncio.Future[None] | None:
        """Deliver the channel's messages to `handler` from now on.

        Returns a future resolved when the server confirmed the subscription (None if it
        already was); until then a publish on the channel may not reach the handler.
        """
        ch = channel.encode()
        handlers = self._handlers.setdefault(ch, [])
        handlers.append(handler)
        if self._task is None and not self._closing:
            self._task = asyncio.ensure_future(self._run())
        if ch in self._confirmed:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm.setdefault(ch, []).append(fut)
        if len(handlers) == 1:
            # Not connected: the reader subscribes every channel when it (re)connects.
            self._post(self._sub, ch)
        return fut

    def unsubscribe(self, channel: str, handler: Handler) -> None:
        """Stop delivering to `handler`; the last handler of a channel unsubscribes it."""
        ch = channel.encode()
        handlers = self._handlers.get(ch)
        if handlers is None:
            return
        with contextlib.suppress(ValueError):
            handlers.remove(handler)
        if handlers:
            return
        del self._handlers[ch]
        self._confirmed.discard(ch)
        self._resync.discard(ch)
        for fut in self._confirm.pop(ch, ()):
            if not fut.done():
                fut.cancel()
        self._post(self._unsub, ch)  # a late message on the channel is simply dropped

    def _post(self, command: bytes, ch: bytes) -> None:
        if self._conn is None or self._closing:
            return
        if command == self._unsub:
            self._leaving[ch] += 1
        self._outbox.append((command, ch))
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_outbox())

    async def _send_outbox(self) -> None:
        try:
            while self._outbox and self._conn is not None:
                conn, batch = self._conn, self._outbox
                self._outbox = []
                # Consecutive commands of one kind go out as one command with many channels.
                packed: list[bytes] = []
                start = 0
                for i in range(1, len(batch) + 1):
                    if i == len(batch) or batch[i][0] != batch[start][0]:
                        packed += _pack(conn, [(batch[start][0], *(c for _, c in batch[start:i]))])
                        start = i
                try:
                    await conn.send_packed_command(packed, check_health=False)
                except Exception:
                    return  # the reader reconnects and subscribes every channel again
        finally:
            self._sender = None

    def reconnect(self) -> None:
        """Drop the connection; the reader reconnects and resubscribes (after a redirect)."""
        conn = self._conn
        if conn is not None and self._dropping is None:
            self._dropping = asyncio.ensure_future(self._drop(conn))

    async def _drop(self, conn: AbstractConnection) -> None:
        try:
            await _disconnect_quietly(conn)  # the reader's read fails: it reconnects
        finally:
            self._dropping = None

    async def _run(self) -> None:
        delay = 0.05
        first = True
        while not self._closing:
            conn = self.link.new_connection()
            try:
                await _connect(conn)
                # No await between these lines: subscribe() either finds no connection
                # (and its channel is in this list) or posts after it. Publishes before a
                # confirmation may be missed: handlers re-read then (see _on_reply).
                self._outbox = []
                self._leaving.clear()
                self._conn = conn
                channels = list(self._handlers)
                if not first:
                    self._resync.update(channels)
                first = False
                if channels:
                    packed = _pack(conn, [(self._sub, *channels)])
                    await conn.send_packed_command(packed, check_health=False)
                delay = 0.05
                while True:
                    self._on_reply(await conn.read_response(disable_decoding=True))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.closing:
                    return
                if isinstance(exc, (MovedError, _SlotMoved)) and self.link.cluster:
                    # The slot (a migration or failover) moved: subscribe on its new master.
                    log.info("Redis Cluster: pub/sub follows slot %d", self.link.slot)
                    with contextlib.suppress(*_CONNECTION_ERRORS, RedisError):
                        if isinstance(exc, MovedError):
                            url = with_host(self.link.target.connect_url, exc.host, int(exc.port))
                            await self.link._point_to(url)
                        else:
                            await self.link._discover()
                else:
                    log.warning(
                        "Redis pub/sub connection to %s lost (%s); reconnecting in %.2fs",
                        self.link.redacted,
                        exc,
                        delay,
                    )
            finally:
                self._confirmed.clear()
                self._conn = None
                await _disconnect_quietly(conn)
            first = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    @property
    def closing(self) -> bool:
        """True once close() was called."""
        return self._closing

    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind, ch = reply[0], reply[1]
        if kind == self._msg_kind:
            self._dispatch(ch, reply[2])
        elif kind == self._unsub_kind:
            if self._leaving[ch] > 0:
                self._leaving[ch] -= 1
                if not self._leaving[ch]:
                    del self._leaving[ch]
            elif ch in self._handlers:
                # Not asked for: a Cluster node unsubscribes the channels of a slot it
                # no longer serves (sharded pub/sub after a migration or failover).
                raise _SlotMoved(ch)
        elif kind == self._sub_kind and ch in self._handlers:
            self._confirmed.add(ch)
            for fut in self._confirm.pop(ch, ()):
                if not fut.done():
                    fut.set_result(None)
            if ch in self._resync:
                self._resync.discard(ch)
                self._dispatch(ch, None)

    def _dispatch(self, ch: bytes, payload: bytes | None) -> None:
        for handler in list(self._handlers.get(ch, ())):
            try:
                handler(payload)
            except Exception:
                log.exception("a pub/sub handler failed")

    async def close(self) -> None:
        """Stop the reader and close the connection."""
        self._closing = True
        tasks = [t for t in (self._task, self._sender, self._dropping) if t is not None]
        self._task = self._sender = self._dropping = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for futs in self._confirm.values():
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        self._confirm.clear()
        self._handlers.clear()


async def _disconnect_quietly(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


# -- registry ----------------------------------------------------------------------------

_registry: dict[tuple[Any, ...], RedisLink] = {}


def _registry_key(target: RedisTarget, namespace: str) -> tuple[Any, ...]:
    loop = asyncio.get_running_loop()
    # On a Cluster another namespace may live on another node: one link per namespace.
    return (target.url, namespace if target.cluster else None, id(loop), os.getpid())


def acquire(target: RedisTarget, namespace: str) -> RedisLink:
    """This loop's link for the URL (and namespace on a Cluster); pair with release()."""
    key = _registry_key(target, namespace)
    link = _registry.get(key)
    if link is None or link._closed:
        link = RedisLink(target, namespace)
        _registry[key] = link
    link.refs += 1
    return link


# -- components --------------------------------------------------------------------------


class RedisComponent:
    """What the redis broker, storage and global config share: URL, keys, lifecycle, errors."""

    error_class: type[QTasksError] = QTasksError
    """Raised (with the redacted URL) in place of redis-py errors."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
    ) -> None:
        self.target = parse_url(url)
        self.namespace = namespace
        self.config = config if config is not None else QueueConfig()
        self.keys = Keys(namespace)
        self._link: RedisLink | None = None

    @classmethod
    def from_url(cls: type[C], url: str, *, namespace: str, config: QueueConfig) -> C:
        """Build from `redis://[user:password@]host:port/db`, `rediss://...` or `unix://...`."""
        return cls(url, namespace=namespace, config=config)

    @property
    def url(self) -> str:
        """The URL this component was built from (with the password: do not log it)."""
        return self.target.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r}, namespace={self.namespace!r})"

    async def start(self) -> None:
        """Join this loop's link to the server and load the scripts; fails early if down."""
        if self._link is not None:
            return
        link = acquire(self.target, self.namespace)
        try:
            await link.open()
        except RedisError as exc:
            await self._release(link)
            raise self._error(exc) from exc
        except BaseException:
            await self._release(link)
            raise
        self._link = link

    async def stop(self) -> None:
        """Leave the link; the last component on it closes the connections."""
        link, self._link = self._link, None
        if link is not None:
            await self._release(link)

    @staticmethod
    async def _release(link: RedisLink) -> None:
        link.release()
        if link.refs <= 0:
            await link.close()

    @property
    def link(self) -> RedisLink:
        """The open link; an error naming the component if start() was not called."""
        if self._link is None:
            raise self.error_class(f"{self!r} is not started; await its start() first")
        return self._link

    def _error(self, exc: BaseException) -> QTasksError:
        return self.error_class(f"Redis at {redact_url(self.url)}: {type(exc).__name__}: {exc}")

    async def _run(
        self,
        commands: Sequence[Command],
        *,
        retry: bool = True,
        read_timeout: float | None = None,
    ) -> list[Any]:
        """Replies of commands sent in one round trip; any error reply is raised.

        `read_timeout` bounds the wait for a reply (give one for blocking commands).
        """
        link = self.link
        try:
            replies = await link.run(commands, retry=retry, read_timeout=read_timeout)
        except RedisError as exc:
            raise self._error(exc) from exc
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise self._error(reply) from reply
        return replies

    async def _call(self, *args: Any, retry: bool = True) -> Any:
        link = self.link
        try:
            return await link.call(*args, retry=retry)
        except RedisError as exc:
            raise self._error(exc) from exc

    async def _eval(
        self, s: Script, keys: Sequence[Any], args: Sequence[Any], *, retry: bool = True
    ) -> Any:
        link = self.link
        try:
            return await link.eval(s, keys, args, retry=retry)
        except RedisError as exc:
            raise self._error(exc) from exc


class Batcher(Generic[T]):
    """Coalesces concurrent calls into few writes (automatic pipelining).

    While fewer than `max_in_flight` writes are in flight, a caller writes its own item at
    once (no added latency). Items that arrive when that many are in flight wait in a
    queue; each time a write returns, a new one takes the queue's head (up to `max_items`
    in `size`), so up to `max_in_flight` batches are on the wire at once and the server
    works on one while the next is prepared. Every caller gets its own item's outcome.

    The caller whose item fills a batch writes it at once, itself (up to twice
    `max_in_flight` writes then), so the server works while the rest are still queued.
    If that caller is cancelled during the write, the other items are queued again and
    written again: `write` must be harmless to repeat (enqueue's is: see the broker).

    A queued caller awaits a bare future, not a coroutine of its own: with thousands of
    calls queued at once (`asyncio.gather`), every object each one keeps alive is scanned
    by the garbage collector again and again, which cost more than the writes.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Any]],
        max_items: int = 1000,
        max_in_flight: int = 4,
        size: Callable[[T], int] | None = None,
    ) -> None:
        self._write = write
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._size: Callable[[T], int] = size or _size
        self._in_flight = 0
        # Two deques, not one of (item, future) pairs: a pair is one more object per call
        # for the garbage collector to scan.
        self._pending: collections.deque[T] = collections.deque()
        self._futures: collections.deque[asyncio.Future[None]] = collections.deque()
        self._pending_size = 0
        self._writers: set[asyncio.Task[None]] = set()
        self._starting = 0
        """Writers started that have not taken their batch yet."""

    def submit(self, item: T) -> Awaitable[None]:
        """Write `item` (alone or with others): await the result, which raises what the
        write raised. Cancelling the wait before the item is written drops it.

        Await the result at once: a write of the item alone takes its place among the
        writes in flight now, so that calls made before any is awaited still coalesce.
        """
        if self._in_flight < self._max_in_flight and not self._pending:
            self._in_flight += 1
            return self._write_alone(item)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(item)
        self._futures.append(fut)
        self._pending_size += self._size(item)
        if (
            self._pending_size - self._max_items * self._starting >= self._max_items
            and self._in_flight < 2 * self._max_in_flight
        ):
            # A full batch: this caller writes it now, in its own step. A background
            # writer would start only after every other ready callback: with thousands of
            # calls gathered at once, the server would sit idle until all were queued.
            self._in_flight += 1
            items, futs = self._cut()
            return self._write_inline(items, futs, fut)
        self._kick()
        return fut

    async def _write_alone(self, item: T) -> None:
        try:
            await self._write([item])
        finally:
            self._in_flight -= 1
            self._kick()

    async def _write_inline(
        self, items: list[T], futs: list[asyncio.Future[None]], own: asyncio.Future[None]
    ) -> None:
        try:
            await self._write(items)
        except asyncio.CancelledError:
            # This caller was cancelled mid-write, which may or may not have happened: the
            # others' items go back to the head of the queue (see `write` in the class doc).
            for item, fut in zip(reversed(items), reversed(futs), strict=True):
                if fut is not own and not fut.done():
                    self._pending.appendleft(item)
                    self._futures.appendleft(fut)
                    self._pending_size += self._size(item)
            raise
        except Exception as exc:
            _resolve(futs, exc)
        else:
            _resolve(futs, None)
        finally:
            self._in_flight -= 1
            self._kick()
        await own

    def _kick(self) -> None:
        # A writer takes its batch when it starts, so items queued until then join it.
        while self._pending_size > self._max_items * self._starting and (
            self._in_flight < self._max_in_flight
        ):
            self._in_flight += 1
            self._starting += 1
            writer = asyncio.ensure_future(self._write_next())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)

    def _cut(self) -> tuple[list[T], list[asyncio.Future[None]]]:
        pending, futures = self._pending, self._futures
        size_of = self._size
        items: list[T] = []
        futs: list[asyncio.Future[None]] = []
        size = 0
        while pending and (not items or size < self._max_items):
            item = pending.popleft()
            fut = futures.popleft()
            n = size_of(item)
            self._pending_size -= n
            if fut.done():  # its caller was cancelled before it was written: drop it
                continue
            size += n
            items.append(item)
            futs.append(fut)
        return items, futs

    async def _write_next(self) -> None:
        self._starting -= 1
        items, futs = self._cut()
        try:
            if items:
                try:
                    await self._write(items)
                except Exception as exc:
                    _resolve(futs, exc)
                else:
                    _resolve(futs, None)
        except asyncio.CancelledError:  # the loop is shutting down: fail this batch and the rest
            for fut in (*futs, *self._futures):
                if not fut.done():
                    fut.cancel()
            self._pending.clear()
            self._futures.clear()
            self._pending_size = 0
            raise
        finally:
            self._in_flight -= 1
        self._kick()  # more came while this write was in flight

    async def close(self) -> None:
        """Wait for the writes under way to end."""
        while self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)


def _resolve(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    """Tell each caller still waiting how its batch's write went."""
    for fut in futures:
        if not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


def _size(item: Any) -> int:
    size = getattr(item, "size", None)
    return int(size) if size is not None else 1
