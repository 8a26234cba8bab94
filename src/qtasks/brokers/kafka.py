"""The Kafka broker (`kafka://host:port[,host:port...]` URLs), on aiokafka.

Kafka is a log, not a queue: a consumer group divides a topic's partitions among its
members, and each member only moves a committed offset forward. How qtasks maps onto it:

* Topics. A qtasks queue is three "band" topics `<namespace>.<queue>.b0/.b1/.b2`
  (`partitions` partitions each, default 8: the parallelism) plus 16 delay topics
  `<namespace>.<queue>.delay.<k>` (one partition each), created on first use. Every
  worker of an app is a member of ONE consumer group, `qtasks.<namespace>`, so each
  message goes to one member; members share the partitions, and Kafka moves them when
  workers come and go. A process joins the group at its first `fetch` (in the
  background: a join takes seconds) or at `start` with `?queues=a,b`; processes that
  only enqueue never join.
* Priorities (separate topics per band, weighted). Priority < 0 goes to band 0, 0 to band
  1, > 0 to band 2 (`band_limits=(0, 1)`: where the next band starts). A fetch hands out
  lowest priority first among what it holds, except that each lower band with work
  waiting keeps a share of every batch by its weight (`band_weights=(4, 2, 1)`: while
  all three bands have work, band 1 gets at least 2/7 and band 2 at least 1/7 of what
  is handed out, accumulated across fetches), so a flood of urgent tasks cannot starve
  the rest. Within a band, order is per partition (Kafka's), and what a fetch holds is
  sorted by priority then age.
* Offsets (tasks finish out of order). Each partition's offsets that were received and
  not finished are tracked; the committed offset is the lowest unfinished one (or the
  next to read when none is), committed after each ack batch. A worker that dies
  therefore loses nothing: the next owner reads from there. The price: tasks that
  finished above a lower unfinished one run again after a crash or a move of the
  partition (at-least-once; keep tasks idempotent).
* Rebalances. When partitions are taken away, what is safe is committed first and the
  messages held but not started are dropped (Kafka gives them to the new owner). Tasks
  of a revoked partition that are running finish, but their acks cannot be committed
  any more and the new owner runs them again (documented duplicate). A partition that
  comes straight back keeps its bookkeeping, so nothing held here is handed out twice.
* Delays and retries (the delay topics), with no worker's wall clock. A message due
  later goes to the delay topic whose wait (4**k ms) is the longest not above the
  remaining delay (see `qtasks.brokers._delays`). The producer turns the eta into that
  remaining delay once, on its own clock, and the record carries what is left after the
  topic's wait (`qtasks-rest-us`). The member that owns the topic's partition holds the
  record for the topic's wait measured on ITS MONOTONIC CLOCK from when the record
  arrived (never before: the record was produced before it arrived), then sends it on to
  the next delay topic with the rest counted down, or to its band topic once nothing is
  left, and commits. Record timestamps are not used: CreateTime is the producing
  worker's wall clock, and LogAppendTime (the broker's) needs a topic setting that some
  servers ignore (tansu does) plus an estimate of the broker's current time, which a
  consumer is never told. So a skewed worker clock changes nothing; what is not counted
  (a hop's produce and fetch, a few ms plus the fetch wait on servers that answer only
  when it is over; a record waiting unread because its member is busy, paused at 5000
  held records, or joining the group) makes a delay late, never early: well under a
  second in all when members keep up. A rebalance or a clean stop first sends every
  record held here on with what is left of its wait as measured here, so the next owner
  does not start the wait over. A crash cannot: the next owner reads the dead member's
  held records again and starts their waits over, so they are late by what they had
  waited there; to bound that, a record of a topic whose wait is over 5 minutes is sent
  on after a quarter of the wait with what is left (a crash costs at most that quarter).
  The absolute eta is still written (`qtasks-eta-us`) for tools and for workers of older
  versions during a rolling upgrade; a delay-topic record from an older producer (eta
  only) is read on this member's clock once and sent on to the bucket for what is left.
  `requeue` (a retry) produces the next attempt, awaits the broker's ack, then finishes
  the old offset.
* What Kafka cannot do, and what this broker does instead: there is no per-message
  ack (offset tracking above); no give-back of one message to another consumer, so
  `release` keeps the message uncommitted and hands it out again from here (after `stop`
  the next owner of the partition reads it); no delivery counter (next point); no native
  delays or priorities (both above). Queue sizes are the group's lag over the queue's
  topics (waiting, delayed, running and finished-but-not-yet-committed messages).
* Delivery counts (so a task that kills its worker ends as a `worker_lost` dead letter
  instead of crash-looping). A record carries the deliveries counted before it was
  produced (header `qtasks-deliveries`: 0 for a new message and for a retry, the old
  count for a message sent back unrun); Kafka counts nothing, so each member also keeps,
  per band partition it owns, how many times each offset at or above the committed one
  was handed to a worker, and persists that "handed mark" before handing a record out:
  a short JSON list of `[start, end, count]` runs, keyed `<topic>:<partition>` in the
  queue's compacted topic `<namespace>.<queue>.marks` (one partition). `delivery_count`
  is the header plus this count. A fetch that hands out records not handed here yet
  first produces the new marks of their partitions (one record per partition, all
  awaited together, acks=all): one produce round trip per fetch, not per message. A new
  owner of a partition (after a crash or a rebalance) reads the latest marks of its
  queues at assignment (a reader with no group, kept across rebalances, reading only
  what was added since) before taking in any record of it, so a replayed record comes
  with the previous count + 1, which it persists before handing it out. `release` takes
  its hand-out back (written with the next mark of the partition, or when the partition
  is revoked or the member stops), so a clean hand-back does not count; after a crash
  it does (counted once too many, never too few). Counts below the committed offset are
  dropped. Why not the offset commit's metadata string, which Kafka stores with each
  partition's offset: tansu accepts it and returns it empty, and Kafka caps it (4 KiB
  by default, `offset.metadata.max.bytes`). The marks have their own producer with no
  linger: a fetch waits for the write (about 0.6 ms on tansu; a no-op drain is about
  15-30% slower than without counting, tasks that do work lose less). Accepted
  imprecisions: records that finished above the committed offset are counted again
  when replayed (the worker skips those already final); what a worker had fetched but
  not started when it died counts as handed; marks are written only for partitions
  this member owns, so a record handed out while its partition is being revoked is not
  counted, and a member that lost a partition without knowing it yet may write one
  stale mark.
* Dead letters. Each queue has a dead topic `<namespace>.<queue>.dead` (one partition,
  created on first use with `cleanup.policy=compact,delete` and `retention.ms` =
  `dead_letter_ttl_seconds`, or `compact` alone when the TTL is None). A letter is a
  record keyed by the task uuid whose value is the whole `DeadLetter` packed with
  msgpack (so every field round-trips, and a letter for an empty message is never
  mistaken for a tombstone). `dead_letter` produces the letters (acks=all), then
  finishes the original offsets through `ack`, so the commit moves past them: a crash in
  between leaves a duplicate letter (the later one wins), never a lost one. Listing reads
  the dead topic from its start up to the end offsets taken first, with a consumer of no
  group, and folds the records by key: a later letter replaces an earlier one, a
  tombstone (empty value) deletes it, and letters older than the TTL are skipped
  (retention removes them later, a segment at a time). `drop_dead_letters` produces
  tombstones; compaction then removes both. Each listing, drop and `queue_stats` (its
  `dead_lettered` is the live count) reads the whole dead topic: fine for letters kept
  for operators, not for a hot path.
* No results: pair this broker with a storage (`storage_url='redis://...'` or
  `'sqlite:///...'`). The idempotent producer and transactions are not used.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import msgspec
from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.abc import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

from qtasks._aio import wait_event
from qtasks.brokers._delays import BUCKET_LEVELS, bucket_wait_ms, next_hop
from qtasks.config import QueueConfig
from qtasks.errors import BrokerError, ConfigurationError
from qtasks.interfaces import Broker, Delivery, QueueStats
from qtasks.message import DeadLetter
from qtasks.urls import redact_url

if TYPE_CHECKING:
    from qtasks.message import Envelope

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "QueueTasks"
DEFAULT_PARTITIONS = 8
DEFAULT_BAND_LIMITS = (0, 1)
DEFAULT_BAND_WEIGHTS = (4, 2, 1)

_H_QUEUE = "qtasks-queue"
_H_PRIORITY = "qtasks-priority"
_H_CREATED = "qtasks-created-us"
_H_ETA = "qtasks-eta-us"  # the producer's eta: for older workers and tools, not read
_H_REST = "qtasks-rest-us"  # what is left to wait once this delay topic's wait is over
_H_DELIVERIES = "qtasks-deliveries"
_H_UUID = "qtasks-uuid"
_H_REASON = "qtasks-reason"

_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
_TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
_MAX_POLL_RECORDS = 500
_POLL_MS = 500
_SETTLE_QUIET_SECONDS = 0.01
_ASSIGNMENT_WAIT_SECONDS = 60.0
_DEAD_SCAN_SECONDS = 30.0
_MARKS_SCAN_SECONDS = 30.0
"""How long a new owner reads marks at assignment before going on without them."""
_MAX_HELD_DELAYED = 5000
"""Records of one delay partition held here at most; beyond it the partition is paused
(memory), and what waits unread in it meanwhile is that much later."""
_CHECKPOINT_MIN_WAIT_SECONDS = 300.0
"""Delay topics with a longer wait send a held record on after a quarter of it (with what
is left), so a crash costs at most that quarter of the wait, not all of it."""


def _us(seconds: float) -> bytes:
    return str(round(seconds * 1_000_000)).encode()


def _int_header(headers: dict[str, bytes], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _mark_key(tp: Any) -> bytes:
    return f"{tp.topic}:{tp.partition}".encode()


class _Mark(msgspec.Struct):
    """A partition's handed mark as persisted: [start, end, count] runs of offsets."""

    handed: list[tuple[int, int, int]] = []


def _encode_mark(counts: dict[int, int], floor: int | None) -> bytes:
    """Runs of consecutive offsets with one count (offsets below `floor` are done with)."""
    runs: list[list[int]] = []
    for offset in sorted(counts):
        if floor is not None and offset < floor:
            continue
        count = counts[offset]
        if runs and runs[-1][1] == offset and runs[-1][2] == count:
            runs[-1][1] = offset + 1
        else:
            runs.append([offset, offset + 1, count])
    return msgspec.json.encode(_Mark([(a, b, c) for a, b, c in runs]))


def _decode_mark(raw: bytes) -> dict[int, int]:
    try:
        mark = msgspec.json.decode(raw, type=_Mark)
    except msgspec.DecodeError:
        log.warning("ignored a Kafka handed mark that does not decode: %r", raw[:100])
        return {}
    return {o: c for start, end, c in mark.handed if c > 0 for o in range(start, end)}


@dataclasses.dataclass(frozen=True)
class _Outgoing:
    """One record to produce to a band or delay topic (an envelope or a delayed hop)."""

    queue: str
    priority: int
    created_at: float
    eta: float | None
    """The eta as the producer set it (written in a header, never compared with a clock)."""
    wait_us: int | None
    """Microseconds left to wait from now (None: no delay); `_send_one` picks the topic."""
    body: bytes
    deliveries: int
    uuid: str

    @classmethod
    def of(cls, envelope: Envelope, deliveries: int, now: float) -> _Outgoing:
        """An envelope to produce; its eta becomes a remaining delay on this clock, once."""
        e = envelope
        wait = None if e.eta is None else round((e.eta - now) * 1_000_000)
        return cls(e.queue, e.priority, e.created_at, e.eta, wait, e.body, deliveries, e.uuid)


@dataclasses.dataclass(frozen=True)
class _Topic:
    """What a topic of this broker holds: a queue's band, or one of its delay buckets."""

    queue: str
    band: int | None
    delay_level: int | None


class _Partition:
    """Bookkeeping of one partition this consumer owns: which offsets are not finished."""

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.open: set[int] = set()
        self._heap: list[int] = []
        self.done: set[int] = set()
        """Finished offsets at or above `committed`: skipped if the partition is read again."""
        self.next_offset: int | None = None
        self.committed: int | None = None
        self.lost = False
        """Taken away by a rebalance: acks of its deliveries are no-ops."""
        self.counts: dict[int, int] = {}
        """Offset -> times handed to a worker (by earlier owners too), at or above `committed`."""
        self.changes = 0
        self.written = 0
        """`changes` as of the last persisted mark: they differ while a release is unwritten."""
        self.loading: asyncio.Future[None] | None = None
        """Reading the partition's mark at assignment: nothing is taken in before it is done."""

    def count(self, offset: int, step: int) -> int:
        count = self.counts.get(offset, 0) + step
        if count > 0:
            self.counts[offset] = count
        else:
            self.counts.pop(offset, None)
        self.changes += 1
        return count

    @property
    def dirty(self) -> bool:
        return self.changes != self.written

    def hold(self, offset: int) -> None:
        self.open.add(offset)
        heapq.heappush(self._heap, offset)
        if self.next_offset is None or offset >= self.next_offset:
            self.next_offset = offset + 1

    def finish(self, offset: int) -> None:
        if offset in self.open:
            self.open.discard(offset)
            self.done.add(offset)

    def drop(self, offset: int) -> None:
        """Forget a held offset without finishing it: Kafka delivers it again."""
        self.open.discard(offset)

    def seen(self, offset: int) -> bool:
        if offset in self.open or offset in self.done:
            return True
        return self.committed is not None and offset < self.committed

    def safe(self) -> int | None:
        """The offset to commit: the lowest unfinished one, else the next to read."""
        while self._heap and self._heap[0] not in self.open:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else self.next_offset

    def committed_to(self, offset: int) -> None:
        self.committed = offset
        self.done = {o for o in self.done if o >= offset}
        if self.counts:
            self.counts = {o: c for o, c in self.counts.items() if o >= offset}


@dataclasses.dataclass(eq=False)
class _Receipt:
    """What `Delivery.receipt` holds: the partition and offset of the record."""

    part: _Partition
    offset: int
    band: int
    before: int = 0
    """Deliveries counted before the record was produced (its `qtasks-deliveries`)."""
    handed: bool = False
    counted: bool = False
    """This hand-out is in `part.counts` (taken back by a release)."""
    settled: bool = False


@dataclasses.dataclass(eq=False)
class _Held:
    """A delay-topic record waiting here until its bucket's wait is over."""

    part: _Partition
    offset: int
    due: float
    """On this process's monotonic clock: received + the topic's bucket wait."""
    rest_us: int
    """What is left to wait after that (0: due then)."""
    checkpoint: float
    """On the monotonic clock: when to send it on with what is left though not due yet
    (a long wait measured here is lost if this process dies); `due` for short waits."""
    queue: str
    value: bytes
    headers: dict[str, bytes]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Routes aiokafka's rebalance callbacks to the broker."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.broker._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.broker._on_assigned(list(assigned))


class KafkaBroker(Broker):
    """The broker of `kafka://` URLs; see the module docstring."""

    def __init__(
        self,
        bootstrap_servers: str = "localhost:9092",
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
        partitions: int = DEFAULT_PARTITIONS,
        band_limits: Sequence[int] = DEFAULT_BAND_LIMITS,
        band_weights: Sequence[int] = DEFAULT_BAND_WEIGHTS,
        queues: Sequence[str] = (),
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        fetch_max_wait_ms: int = 100,
    ) -> None:
        if not namespace or not _TOPIC_CHARS.match(namespace):
            raise ConfigurationError(
                f"the Kafka broker needs a namespace (the app name) made of letters, digits,"
                f" '.', '_' and '-' (it prefixes topic names), got {namespace!r}"
            )
        if len(band_weights) != len(band_limits) + 1 or any(w <= 0 for w in band_weights):
            raise ConfigurationError("band_weights needs one positive weight per band")
        if list(band_limits) != sorted(band_limits):
            raise ConfigurationError("band_limits must be in increasing order")
        if partitions < 1:
            raise ConfigurationError("partitions must be at least 1")
        self.bootstrap_servers = bootstrap_servers
        self.url = f"kafka://{bootstrap_servers}"
        self.namespace = namespace
        self.config = config or QueueConfig()
        self.partitions = partitions
        self.band_limits = tuple(band_limits)
        self.band_weights = tuple(band_weights)
        self.group_id = f"qtasks.{namespace}"
        self.eager_queues = list(queues)
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._reset()

    def _reset(self) -> None:
        self._producer: Any = None
        self._admin: Any = None
        self._consumer: Any = None
        self._offsets_consumer: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._topics: dict[str, _Topic] = {}
        self._created: set[str] = set()
        self._creating: dict[str, asyncio.Task[None]] = {}
        self._dead_created: set[str] = set()
        self._dead_lock = asyncio.Lock()
        self._marks_created: set[str] = set()
        self._marks_producer: Any = None
        self._marks_send_lock = asyncio.Lock()
        self._marks_reader: Any = None
        self._marks_read: set[Any] = set()
        self._marks: dict[bytes, bytes] = {}
        """The latest mark of each partition key, as far as the reader has read."""
        self._marks_lock = asyncio.Lock()
        self._subscribed: set[str] = set()
        self._owned: dict[Any, _Partition] = {}
        self._limbo: dict[Any, _Partition] = {}
        bands = len(self.band_weights)
        self._buffers: list[collections.deque[Delivery]] = [
            collections.deque() for _ in range(bands)
        ]
        self._credit = [0.0] * bands
        self._held: dict[Any, collections.deque[_Held]] = {}
        self._paused: set[Any] = set()
        self._want = self.config.max_tasks_process + self.config.resolved_prefetch()
        self._arrived = asyncio.Event()
        self._assigned = asyncio.Event()
        self._burst_at = 0.0
        self._last_arrival = 0.0
        self._commit_lock = asyncio.Lock()
        self._subscribe_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, namespace: str, config: QueueConfig) -> KafkaBroker:
        """Build from `kafka://host:port[,host2:port2][?partitions=8&...]`.

        Query parameters: partitions, session_timeout_ms, heartbeat_interval_ms,
        fetch_max_wait_ms, and queues (comma-separated): join the group for them at
        start instead of at the first fetch. Only for processes that consume: a member
        that never fetches keeps its share of the partitions waiting.
        """
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigurationError(f"{redact_url(url)} names no Kafka server (kafka://host:port)")
        params = dict(parse_qsl(parts.query))
        known = {
            "partitions",
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "fetch_max_wait_ms",
            "queues",
        }
        unknown = set(params) - known
        if unknown:
            raise ConfigurationError(
                f"unknown Kafka URL parameter(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        try:
            numbers = {k: int(v) for k, v in params.items() if k != "queues"}
        except ValueError as exc:
            raise ConfigurationError(f"bad parameter in {redact_url(url)}: {exc}") from None
        return cls(
            parts.netloc,
            namespace=namespace,
            config=config,
            queues=[q for q in params.get("queues", "").split(",") if q],
            partitions=numbers.get("partitions", DEFAULT_PARTITIONS),
            session_timeout_ms=numbers.get("session_timeout_ms", 10_000),
            heartbeat_interval_ms=numbers.get("heartbeat_interval_ms", 3_000),
            fetch_max_wait_ms=numbers.get("fetch_max_wait_ms", 100),
        )

    # -- names -------------------------------------------------------------------------

    def band_of(self, priority: int) -> int:
        """The band (0 = most urgent) of a qtasks priority."""
        band = 0
        for limit in self.band_limits:
            if priority >= limit:
                band += 1
        return band

    def band_topic(self, queue: str, band: int) -> str:
        """The topic of one priority band of a queue."""
        return f"{self.namespace}.{queue}.b{band}"

    def delay_topic(self, queue: str, level: int) -> str:
        """The delay topic of bucket `level` of a queue."""
        return f"{self.namespace}.{queue}.delay.{level}"

    def dead_topic(self, queue: str) -> str:
        """The topic keeping the dead letters of a queue."""
        return f"{self.namespace}.{queue}.dead"

    def marks_topic(self, queue: str) -> str:
        """The compacted topic keeping the handed marks of a queue's band partitions."""
        return f"{self.namespace}.{queue}.marks"

    def _queue_topics(self, queue: str) -> list[str]:
        if not _TOPIC_CHARS.match(queue):
            raise ConfigurationError(
                f"queue name {queue!r} is not usable in a Kafka topic name "
                f"(letters, digits, '.', '_' and '-')"
            )
        topics = [self.band_topic(queue, b) for b in range(len(self.band_weights))]
        topics += [self.delay_topic(queue, k) for k in range(BUCKET_LEVELS)]
        return topics

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the producer; with `queues` given, also join the group now."""
        if self._producer is not None:
            return
        self._arrived = asyncio.Event()
        self._assigned = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._subscribe_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._dead_lock = asyncio.Lock()
        self._marks_lock = asyncio.Lock()
        self._marks_send_lock = asyncio.Lock()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=False,
            linger_ms=1,
            client_id=f"qtasks-{self.consumer_id}",
            # aiokafka's own 1 MiB cap would refuse what max_payload_bytes allows
            max_request_size=_request_size(self.config.max_payload_bytes),
        )
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            await producer.start()
            await admin.start()
        except KafkaError as exc:
            await _quietly(producer.stop())
            await _quietly(admin.close())
            raise BrokerError(
                f"cannot connect to Kafka at {self.bootstrap_servers}: {exc!r}"
            ) from exc
        self._producer, self._admin = producer, admin
        if self.eager_queues:
            await self._subscribe(self.eager_queues)
            await self.wait_assigned(_ASSIGNMENT_WAIT_SECONDS)

    async def wait_assigned(self, timeout: float) -> bool:
        """Wait until this member has its partitions and knows where to read them from.

        False if that took longer than `timeout` seconds (it goes on in the background).
        """
        await wait_event(self._assigned, timeout)
        consumer = self._consumer
        if not self._assigned.is_set() or consumer is None:
            return False
        # Positions are looked up lazily, partition by partition; do it now, all at once.
        try:
            await asyncio.gather(*(consumer.position(tp) for tp in consumer.assignment()))
        except KafkaError as exc:
            log.info("looking up Kafka positions failed (%r); they follow on first fetch", exc)
        return True

    async def stop(self) -> None:
        """Commit what is safe, leave the group (its partitions move on) and disconnect."""
        await self._stop_consumer()
        clients = (self._offsets_consumer, self._marks_reader, self._marks_producer)
        for client in (*clients, self._producer):
            if client is not None:
                await _quietly(client.stop())
        if self._admin is not None:
            await _quietly(self._admin.close())
        self._reset()

    # -- topics ------------------------------------------------------------------------

    async def _ensure_topics(self, queues: Iterable[str]) -> None:
        """Create the band and delay topics of these queues (once per process).

        Concurrent callers share one creation per queue (a burst of add_task calls
        would otherwise send one request each).
        """
        wanted = [q for q in dict.fromkeys(queues) if q not in self._created]
        if not wanted:
            return
        tasks = []
        for queue in wanted:
            task = self._creating.get(queue)
            if task is None:
                task = asyncio.ensure_future(self._create_topics(queue))
                self._creating[queue] = task
                task.add_done_callback(self._created_callback(queue))
            tasks.append(task)
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    def _created_callback(self, queue: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(task: asyncio.Task[None]) -> None:
            if self._creating.get(queue) is task:
                del self._creating[queue]

        return forget

    async def _create_topics(self, queue: str) -> None:
        wanted = [queue]
        new: list[Any] = []
        for queue in wanted:
            for topic in self._queue_topics(queue):
                self._topics[topic] = self._describe(queue, topic)
                count = 1 if self._topics[topic].delay_level is not None else self.partitions
                new.append(NewTopic(topic, count, 1))
        admin = self._require(self._admin)
        try:
            response = await admin.create_topics(new)
        except KafkaError as exc:
            raise BrokerError(f"creating Kafka topics failed: {exc!r}") from exc
        for topic, code, message in (e[:3] for e in response.topic_errors):
            if code not in (0, _TOPIC_EXISTS):
                raise BrokerError(f"creating Kafka topic {topic!r} failed: {code} {message}")
        self._created.update(wanted)

    def _describe(self, queue: str, topic: str) -> _Topic:
        suffix = topic[len(self.namespace) + len(queue) + 2 :]
        if suffix.startswith("delay."):
            return _Topic(queue, None, int(suffix[len("delay.") :]))
        return _Topic(queue, int(suffix[1:]), None)

    @staticmethod
    def _require(client: Any) -> Any:
        if client is None:
            raise BrokerError("the Kafka broker is not started; await its start() first")
        return client

    # -- publishing --------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Produce every message, then await the broker's acks together."""
        if not envelopes:
            return
        now = time.time()
        errors = await self._produce([_Outgoing.of(e, 0, now) for e in envelopes])
        failed = [e for e in errors if e is not None]
        if failed:
            raise BrokerError(
                f"Kafka did not take {len(failed)} of {len(envelopes)} messages: {failed[0]!r}"
            ) from failed[0]

    async def _produce(self, items: Sequence[_Outgoing]) -> list[BaseException | None]:
        """Send items to their band or delay topics; errors per item."""
        producer = self._require(self._producer)
        await self._ensure_topics(item.queue for item in items)
        futures: list[Any] = []
        # One caller at a time hands messages to the producer: when a batch is full,
        # aiokafka's send waits for it, and thousands of concurrent add_task calls all
        # waiting on the same batch wake together over and over.
        async with self._send_lock:
            for item in items:
                futures.append(await self._send_one(producer, item))
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _send_one(self, producer: Any, item: _Outgoing) -> Any:
        """Queue one record in the producer; a future of the broker's answer."""
        level, rest = (None, 0) if item.wait_us is None else next_hop(item.wait_us)
        if level is None:
            topic = self.band_topic(item.queue, self.band_of(item.priority))
        else:
            topic = self.delay_topic(item.queue, level)
        headers = [
            (_H_QUEUE, item.queue.encode()),
            (_H_PRIORITY, str(item.priority).encode()),
            (_H_CREATED, _us(item.created_at)),
            (_H_DELIVERIES, str(item.deliveries).encode()),
            (_H_UUID, item.uuid.encode()),
        ]
        if item.eta is not None:
            headers.append((_H_ETA, _us(item.eta)))
        if level is not None:
            headers.append((_H_REST, str(rest).encode()))
        try:
            return await producer.send(topic, value=item.body, headers=headers)
        except KafkaError as exc:
            return _failed(exc)

    # -- consuming ---------------------------------------------------------------------

    async def _subscribe(self, queues: Sequence[str]) -> None:
        """Consume these queues too; the group join runs in the background.

        A new set of queues means a new consumer (aiokafka is reliable only when the
        subscription is made before start): the old one commits what is safe and leaves,
        and what it held comes back through the new one. Workers consume one fixed set.
        """
        if set(queues) <= self._subscribed:
            return
        async with self._subscribe_lock:
            wanted = self._subscribed | set(queues)
            if wanted == self._subscribed:
                return
            self._require(self._producer)
            await self._ensure_topics(sorted(wanted))
            await self._ensure_marks_topics(sorted(wanted))
            await self._start_marks_producer()
            if self._consumer is not None or self._poller is not None:
                log.info("consuming more queues: leaving the Kafka group to join it again")
                await self._stop_consumer()
            topics = [t for q in sorted(wanted) for t in self._queue_topics(q)]
            self._subscribed = wanted
            self._assigned.clear()
            self._poller = asyncio.ensure_future(self._consume(topics))

    async def _consume(self, topics: list[str]) -> None:
        """Start a group member for `topics` (retrying with backoff), then poll it."""
        backoff = 0.1
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                group_id=self.group_id,
                client_id=f"qtasks-{self.consumer_id}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                fetch_max_wait_ms=self.fetch_max_wait_ms,
                max_poll_records=_MAX_POLL_RECORDS,
            )
            consumer.subscribe(topics=topics, listener=_Listener(self))
            self._consumer = consumer
            try:
                await consumer.start()  # returns once the group gave us our partitions
            except asyncio.CancelledError:
                await _quietly(consumer.stop())
                self._consumer = None
                raise
            except Exception as exc:
                await _quietly(consumer.stop())
                self._consumer = None
                log.warning("joining the Kafka group failed (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            break
        await self._poll_loop(consumer)

    async def _stop_consumer(self) -> None:
        """Stop polling, commit what is safe, leave the group and forget what was held."""
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            held = [h for queue in self._held.values() for h in queue]
            self._held.clear()
            await self._send_on(held, time.monotonic())  # what is left of their waits
            await self._write_dirty(list(self._owned.values()))  # releases: not counted
            await self._commit(list(self._owned.values()), consumer)
        for part in self._owned.values():
            part.lost = True
        self._owned.clear()  # leaving: the revoke callback has nothing left to do
        if consumer is not None:
            await _quietly(consumer.stop())
        for band in self._buffers:
            band.clear()
        self._held.clear()
        self._paused.clear()
        self._subscribed = set()

    async def _on_revoked(self, revoked: list[Any]) -> None:
        """Commit what is safe, then give back what was held here but not handed out."""
        parts = [self._owned.pop(tp) for tp in revoked if tp in self._owned]
        # Delayed records held here go on with what is left of their waits, measured
        # here: the next owner would otherwise start each wait over.
        for held in await self._send_on(
            [h for p in parts for h in self._held.pop(p.tp, ())], time.monotonic()
        ):
            held.part.drop(held.offset)  # not taken: the next owner reads it again (later)
        await self._write_dirty(parts)  # releases: the next owner must not count them
        await self._commit(parts)
        gone = {id(p) for p in parts}
        for band in self._buffers:
            keep = [d for d in band if id(d.receipt.part) not in gone]
            for d in band:
                if id(d.receipt.part) in gone:
                    d.receipt.part.drop(d.receipt.offset)
            band.clear()
            band.extend(keep)
        for part in parts:
            part.next_offset = None  # Kafka reads again from the committed offset
            self._paused.discard(part.tp)
            self._limbo[part.tp] = part

    async def _on_assigned(self, assigned: list[Any]) -> None:
        new: list[_Partition] = []
        for tp in assigned:
            part = self._limbo.pop(tp, None)
            if part is None:  # a partition that comes straight back keeps its counts
                part = _Partition(tp)
                topic = self._topics.get(tp.topic)
                if topic is not None and topic.band is not None:
                    new.append(part)
            self._owned[tp] = part
        for part in self._limbo.values():
            part.lost = True
        if self._limbo:
            log.info(
                "%d Kafka partitions moved to other workers; their running tasks may run "
                "again there",
                len(self._limbo),
            )
        self._limbo.clear()
        if new:
            # The poll loop waits for this before taking in records of these partitions
            # (aiokafka may fetch them before this callback returns).
            loading = asyncio.ensure_future(self._load_marks(new))
            for part in new:
                part.loading = loading
            await asyncio.shield(loading)
        self._assigned.set()

    async def _load_marks(self, parts: list[_Partition]) -> None:
        """Give new partitions the counts their last owners persisted (never raises)."""
        queues = sorted({self._topics[p.tp.topic].queue for p in parts})
        try:
            async with self._marks_lock:
                await asyncio.wait_for(self._read_marks(queues), _MARKS_SCAN_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "reading Kafka handed marks failed (%r): replays in %d partitions start their "
                "delivery counts over",
                exc,
                len(parts),
            )
        for part in parts:
            raw = self._marks.get(_mark_key(part.tp))
            if raw:
                part.counts = _decode_mark(raw)

    async def _read_marks(self, queues: list[str]) -> None:
        """Read the marks topics of `queues` on from where the reader is, up to their ends."""
        await self._ensure_marks_topics(queues)
        tps = {TopicPartition(self.marks_topic(q), 0) for q in queues}
        reader = self._marks_reader
        if reader is None or not tps <= self._marks_read:
            # A new topic to read: start over with all of them (assign() forgets places).
            if reader is not None:
                await _quietly(reader.stop())
            self._marks_reader = None
            self._marks.clear()
            reader = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=f"qtasks-{self.consumer_id}-marks",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms,
            )
            await reader.start()
            self._marks_reader = reader
            self._marks_read = tps | self._marks_read
            reader.assign(list(self._marks_read))
            await reader.seek_to_beginning(*self._marks_read)
        ends = await reader.end_offsets(list(tps))
        async for _, records in _read_to_ends(reader, ends):
            for record in records:
                if record.key is not None:
                    self._marks[bytes(record.key)] = bytes(record.value or b"")

    async def _start_marks_producer(self) -> None:
        """The producer of handed marks: a fetch waits for its ack, so no linger (the
        main producer's 1 ms linger made a mark write take about 2.4 ms, not 0.6, on
        tansu, and cut a no-op drain by about 40%)."""
        if self._marks_producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=False,
            linger_ms=0,
            client_id=f"qtasks-{self.consumer_id}-marks",
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await _quietly(producer.stop())
            raise BrokerError(
                f"cannot connect to Kafka at {self.bootstrap_servers}: {exc!r}"
            ) from exc
        self._marks_producer = producer

    async def _write_marks(self, parts: Sequence[_Partition]) -> list[BaseException | None]:
        """Persist each partition's counts as its mark (awaiting Kafka's ack); errors per
        partition. Marks of one queue share one topic partition, so they land in order."""
        if not parts:
            return []
        producer = self._marks_producer
        if producer is None:  # not consuming (any more): nothing of ours to count
            return [BrokerError("the Kafka broker is not consuming")] * len(parts)
        futures: list[Any] = []
        versions: list[int] = []
        async with self._marks_send_lock:
            for part in parts:
                # Encoded when sent: a later send of this partition carries a newer state.
                value = _encode_mark(part.counts, part.committed)
                versions.append(part.changes)
                topic = self.marks_topic(self._topics[part.tp.topic].queue)
                try:
                    futures.append(await producer.send(topic, key=_mark_key(part.tp), value=value))
                except KafkaError as exc:
                    futures.append(_failed(exc))
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r if isinstance(r, BaseException) else None for r in results]
        for part, version, error in zip(parts, versions, errors, strict=True):
            if error is None:
                part.written = max(part.written, version)
        return errors

    async def _write_dirty(self, parts: Sequence[_Partition]) -> None:
        """Persist marks changed since last written (by releases); failures are logged."""
        dirty = [p for p in parts if p.dirty and not p.lost]
        for error in await self._write_marks(dirty):
            if error is not None:
                log.info("writing a Kafka handed mark failed (%r)", error)
                break

    async def _count_handed(self, chosen: list[Delivery]) -> list[Delivery]:
        """Count the hand-out of records not handed here yet and persist the marks of
        their partitions before they are handed out (the deliveries whose mark Kafka did
        not take go back to the buffer)."""
        fresh: list[Delivery] = []
        parts: dict[int, _Partition] = {}
        for d in chosen:
            r = d.receipt
            if not r.counted:
                r.counted = True
                fresh.append(d)
                if self._owns(r):  # mid-rebalance: handed out uncounted (documented)
                    parts[id(r.part)] = r.part
                r.part.count(r.offset, 1)
            d.delivery_count = r.before + r.part.counts.get(r.offset, 1)
        if not parts:
            return chosen
        owners = list(parts.values())
        errors = await self._write_marks(owners)
        failed = {id(p) for p, e in zip(owners, errors, strict=True) if e is not None}
        if not failed:
            return chosen
        back = [d for d in fresh if id(d.receipt.part) in failed]
        for d in reversed(back):
            r = d.receipt
            r.part.count(r.offset, -1)
            r.counted = r.handed = False
            if self._owns(r):
                self._buffers[r.band].appendleft(d)
            else:
                r.settled = True
                r.part.drop(r.offset)  # whoever owns the partition now reads it again
        error = next(e for e in errors if e is not None)
        kept = [d for d in chosen if id(d.receipt.part) not in failed]
        if not kept:
            raise BrokerError(f"Kafka did not take the handed marks: {error!r}") from error
        log.warning("Kafka did not take %d handed marks (%r); kept back", len(failed), error)
        return kept

    async def _poll_loop(self, consumer: Any) -> None:
        backoff = 0.1
        while True:
            self._apply_backpressure(consumer)
            try:
                batches = await consumer.getmany(
                    timeout_ms=self._poll_timeout_ms(), max_records=_MAX_POLL_RECORDS
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the consumer reconnects by itself; keep polling
                log.warning("polling Kafka failed (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            loading = {
                id(p.loading): p.loading
                for p in (self._owned.get(tp) for tp in batches)
                if p is not None and p.loading is not None and not p.loading.done()
            }
            if loading:
                await asyncio.gather(*loading.values(), return_exceptions=True)
            arrived = 0
            was_empty = not any(self._buffers)
            for tp, records in batches.items():
                part = self._owned.get(tp)
                topic = self._topics.get(tp.topic)
                if part is None or topic is None:
                    continue
                for record in records:
                    if part.seen(record.offset):
                        continue
                    part.hold(record.offset)
                    arrived += self._take_in(part, topic, record)
            await self._forward_due()
            if arrived:
                now = asyncio.get_running_loop().time()
                if was_empty:
                    self._burst_at = now
                self._last_arrival = now
                self._arrived.set()

    def _take_in(self, part: _Partition, topic: _Topic, record: Any) -> int:
        headers = {k: bytes(v) for k, v in (record.headers or ())}
        if topic.delay_level is not None:
            # The wait is measured from now on this process's monotonic clock: the record
            # was produced before it arrived, so its wait can only end late, never early.
            received = time.monotonic()
            rest = _int_header(headers, _H_REST)
            wait = bucket_wait_ms(topic.delay_level) / 1000
            checkpoint = received + (wait / 4 if wait > _CHECKPOINT_MIN_WAIT_SECONDS else wait)
            if rest is not None:
                due = received + wait
            else:
                # From an older version (an absolute eta only): read it on this clock,
                # once, and send it on at once to the bucket for what is left.
                eta = _int_header(headers, _H_ETA)
                due = checkpoint = received
                rest = 0 if eta is None else eta - round(time.time() * 1_000_000)
            held = _Held(
                part,
                record.offset,
                due,
                max(rest, 0),
                checkpoint,
                topic.queue,
                bytes(record.value or b""),
                headers,
            )
            self._held.setdefault(part.tp, collections.deque()).append(held)
            return 0
        band = topic.band or 0
        priority = _int_header(headers, _H_PRIORITY)
        created = _int_header(headers, _H_CREATED)
        before = max(_int_header(headers, _H_DELIVERIES) or 0, 0)
        delivery = Delivery(
            bytes(record.value or b""),
            _Receipt(part, record.offset, band, before),
            topic.queue,
            priority if priority is not None else 0,
            created / 1_000_000 if created is not None else record.timestamp / 1000,
            before + part.counts.get(record.offset, 0) + 1,  # set again when handed out
        )
        self._buffers[band].append(delivery)
        return 1

    def _poll_timeout_ms(self) -> int:
        timeout = _POLL_MS
        now = time.monotonic()
        for queue in self._held.values():
            if queue:
                timeout = min(timeout, max(0, int((queue[0].checkpoint - now) * 1000) + 1))
        return timeout

    def _apply_backpressure(self, consumer: Any) -> None:
        """Pause band partitions whose band holds enough, and delay partitions holding many."""
        assignment = set(consumer.assignment())
        pause: set[Any] = set()
        full = _MAX_HELD_DELAYED
        for tp in assignment:
            topic = self._topics.get(tp.topic)
            if topic is None:
                continue
            if topic.band is not None and len(self._buffers[topic.band]) >= self._want:
                pause.add(tp)
            elif topic.delay_level is not None and len(self._held.get(tp, ())) >= full:
                # Paused only when enough is held (memory): a record's wait starts when
                # it arrives here, so one left unread would only be later.
                pause.add(tp)
        if pause != self._paused:
            if self._paused - pause:
                consumer.resume(*(self._paused - pause))
            if pause - self._paused:
                consumer.pause(*(pause - self._paused))
            self._paused = pause

    async def _forward_due(self) -> None:
        """Send delayed messages whose bucket wait is over on to their next hop (and those
        at their checkpoint on to the bucket for what is left)."""
        now = time.monotonic()
        due: list[_Held] = []
        for queue in self._held.values():
            # Received in order with one wait per topic: due and checkpoint times are too.
            while queue and queue[0].checkpoint <= now:
                due.append(queue.popleft())
        if not due:
            return
        failed = await self._send_on(due, now)
        for held in reversed(failed):
            # Keep it at the head: the next poll tries again.
            self._held.setdefault(held.part.tp, collections.deque()).appendleft(held)
        await self._commit(list({id(h.part): h.part for h in due if h not in failed}.values()))

    async def _send_on(self, helds: Sequence[_Held], now: float) -> list[_Held]:
        """Produce held delay records on with what they still have to wait (the rest of
        their bucket's wait on this monotonic clock, plus their rest) and finish their
        offsets (no commit); the ones Kafka did not take."""
        if not helds:
            return []
        items = []
        for held in helds:
            h = held.headers
            created = _int_header(h, _H_CREATED)
            eta = _int_header(h, _H_ETA)
            # Rounded up: never a microsecond short of the wait measured here.
            left = held.rest_us + max(0, math.ceil((held.due - now) * 1_000_000))
            items.append(
                _Outgoing(
                    held.queue,
                    _int_header(h, _H_PRIORITY) or 0,
                    created / 1_000_000 if created is not None else time.time(),
                    eta / 1_000_000 if eta is not None else None,
                    left,
                    held.value,
                    _int_header(h, _H_DELIVERIES) or 0,
                    h.get(_H_UUID, b"").decode(errors="replace"),
                )
            )
        try:
            errors: list[BaseException | None] = await self._produce(items)
        except (BrokerError, KafkaError) as exc:  # no producer, or a topic not created
            errors = [exc] * len(items)
        failed: list[_Held] = []
        for held, error in zip(helds, errors, strict=True):
            if error is None:
                held.part.finish(held.offset)
            else:
                log.warning("moving a delayed Kafka message on failed: %r", error)
                failed.append(held)
        return failed

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        """Hand out up to max_count held messages, waiting for the poller up to timeout."""
        names = set(queues)
        if max_count <= 0:
            return []
        if not names:
            await asyncio.sleep(max(timeout, 0.0))
            return []
        await self._subscribe(sorted(names))
        self._want = max(self._want, max_count)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            if any(d.queue in names for band in self._buffers for d in band):
                await self._settle()
                chosen = self._pick(names, max_count)
                return await self._count_handed(chosen) if chosen else []
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            self._arrived.clear()
            await wait_event(self._arrived, remaining)

    async def _settle(self) -> None:
        """Let a burst that began on an empty buffer end before choosing from it.

        After an idle spell the records of several partitions (bands) come in separate
        fetch responses, up to one fetch wait apart on servers that answer only when it
        is over. So right after the first of them, wait for a quiet spell (at most four
        of them) and choose among all. A busy worker, whose buffer is never empty, does
        not wait.
        """
        quiet = 2 * min(self.fetch_max_wait_ms, 50) / 1000 + _SETTLE_QUIET_SECONDS
        loop = asyncio.get_running_loop()
        end = self._burst_at + 4 * quiet
        while True:
            now = loop.time()
            until = min(max(self._burst_at, self._last_arrival) + quiet, end)
            if now >= until:
                return
            await asyncio.sleep(until - now)

    def _pick(self, names: set[str], max_count: int) -> list[Delivery]:
        """Lowest priority first, with each lower band's weighted share kept for it."""
        waiting = [
            sorted((d for d in band if d.queue in names), key=lambda d: (d.priority, d.created_at))
            for band in self._buffers
        ]
        active = [b for b, items in enumerate(waiting) if items]
        total = sum(self.band_weights[b] for b in active)
        quota = [0] * len(waiting)
        for b in active[1:]:
            self._credit[b] += max_count * self.band_weights[b] / total
            quota[b] = min(int(self._credit[b]), len(waiting[b]))
        for b, items in enumerate(waiting):
            if not items:
                self._credit[b] = 0.0  # no banking of shares while a band has nothing
        chosen: list[Delivery] = []
        for b in active[1:]:
            chosen += waiting[b][: quota[b]]
            self._credit[b] -= quota[b]
        rest = sorted(
            (d for b in active for d in waiting[b][quota[b] :]),
            key=lambda d: (d.priority, d.created_at),
        )
        chosen += rest[: max_count - len(chosen)]
        taken = {id(d) for d in chosen}
        for band in self._buffers:
            if any(id(d) in taken for d in band):
                keep = [d for d in band if id(d) not in taken]
                band.clear()
                band.extend(keep)
        for d in chosen:
            d.receipt.handed = True
        if self._consumer is not None:
            self._apply_backpressure(self._consumer)  # room again: resume paused bands now
        return sorted(chosen, key=lambda d: (d.priority, d.created_at))

    # -- settling ----------------------------------------------------------------------

    def _owns(self, receipt: _Receipt) -> bool:
        part = receipt.part
        return not part.lost and self._owned.get(part.tp) is part

    # A partition in the middle of a rebalance (revoked, not yet known to come back) is
    # neither owned nor lost: its offsets are still finished or dropped here, so that
    # if it comes back its bookkeeping is right; only commits wait for the assignment.

    @staticmethod
    def _receipts(deliveries: Sequence[Delivery]) -> list[_Receipt]:
        receipts = [d.receipt for d in deliveries]
        for r in receipts:
            if not isinstance(r, _Receipt):
                raise TypeError(f"not a Kafka delivery receipt: {r!r}")
        return receipts

    async def _commit(self, parts: Sequence[_Partition], consumer: Any = None) -> None:
        """Commit each partition's safe offset where it moved; failures wait for the next."""
        consumer = consumer if consumer is not None else self._consumer
        if consumer is None or not parts:
            return
        offsets: dict[Any, int] = {}
        for part in parts:
            safe = part.safe()
            if safe is not None and safe != part.committed and not part.lost:
                offsets[part.tp] = safe
        if not offsets:
            return
        async with self._commit_lock:
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:
                # A rebalance is under way or the partition moved: the next commit (or
                # the revoke callback) carries the offset, or the new owner redelivers.
                log.info("committing Kafka offsets failed (%r); will retry", exc)
                return
        for part in parts:
            if part.tp in offsets:
                part.committed_to(offsets[part.tp])

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Finish the offsets and commit each partition up to its lowest unfinished one."""
        parts: dict[int, _Partition] = {}
        for receipt in self._receipts(deliveries):
            if receipt.settled:
                continue
            receipt.settled = True
            part = receipt.part
            if part.lost:
                continue  # moved to another member, which runs it again (documented)
            part.finish(receipt.offset)
            if self._owns(receipt):
                parts[id(part)] = part
        await self._commit(list(parts.values()))

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand the messages out again from here (Kafka cannot give one to another member).

        They stay uncommitted, so after `stop` (or a rebalance) the partition's next
        owner reads them. The marks are written before this returns: a worker gives
        messages back before it runs a redelivered one alone, and if that one kills it,
        the ones given back must not count as handed out.
        """
        uncounted: dict[int, _Partition] = {}
        for d in deliveries:
            receipt = d.receipt
            if not isinstance(receipt, _Receipt):
                raise TypeError(f"not a Kafka delivery receipt: {receipt!r}")
            if receipt.settled or not receipt.handed or receipt.part.lost:
                continue
            receipt.handed = False
            if receipt.counted:
                # Given back unrun: not a delivery.
                receipt.counted = False
                receipt.part.count(receipt.offset, -1)
                if self._owns(receipt):
                    uncounted[id(receipt.part)] = receipt.part
            if self._owns(receipt):
                self._buffers[receipt.band].appendleft(d)
            else:
                # Mid-rebalance: forget it here; whoever gets the partition reads it again.
                receipt.settled = True
                receipt.part.drop(receipt.offset)
        self._arrived.set()
        await self._write_dirty(list(uncounted.values()))

    async def requeue(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Produce each next attempt, await Kafka's ack, then finish the old offset."""
        receipts = self._receipts([d for d, _ in items])
        live = [
            (d, e)
            for (d, e), r in zip(items, receipts, strict=True)
            if not r.settled and not r.part.lost
        ]
        for r in receipts:
            if not r.settled and r.part.lost:
                r.settled = True  # the partition moved: its new owner runs the old attempt
        if not live:
            return
        now = time.time()
        errors = await self._produce([_Outgoing.of(e, e.deliveries, now) for _, e in live])
        confirmed = [d for (d, _), err in zip(live, errors, strict=True) if err is None]
        await self.ack(confirmed)
        failed = [err for err in errors if err is not None]
        if failed:
            raise BrokerError(
                f"Kafka did not take {len(failed)} of {len(live)} retries: {failed[0]!r}"
            ) from failed[0]

    # -- dead letters ------------------------------------------------------------------

    async def dead_letter(self, items: Sequence[tuple[Delivery, DeadLetter]]) -> None:
        """Produce each letter to its dead topic, await Kafka's ack, then finish the offset."""
        receipts = self._receipts([d for d, _ in items])
        live: list[tuple[Delivery, DeadLetter]] = []
        for (d, letter), r in zip(items, receipts, strict=True):
            if r.settled:
                continue
            if r.part.lost:
                r.settled = True  # the partition moved: its new owner runs it again
                continue
            live.append((d, letter))
        if not live:
            return
        errors = await self._produce_dead(
            [
                (letter.queue, letter.uuid, msgspec.msgpack.encode(letter), letter.reason)
                for _, letter in live
            ]
        )
        confirmed = [d for (d, _), err in zip(live, errors, strict=True) if err is None]
        await self.ack(confirmed)
        failed = [err for err in errors if err is not None]
        if failed:
            raise BrokerError(
                f"Kafka did not take {len(failed)} of {len(live)} dead letters: {failed[0]!r}"
            ) from failed[0]

    async def dead_letters(
        self, queues: Sequence[str], limit: int = 100, uuids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters of `queues`, newest first (a scan of their dead topics)."""
        names = list(dict.fromkeys(queues))
        wanted = None if uuids is None else set(uuids)
        if not names or limit <= 0 or wanted == set():
            return []
        cutoff = self._dead_cutoff()
        found = [
            letter
            for letters in (await self._scan_dead(names)).values()
            for letter in letters.values()
            if letter.dead_at >= cutoff and (wanted is None or letter.uuid in wanted)
        ]
        found.sort(key=lambda x: x.dead_at, reverse=True)
        return found[:limit]

    async def drop_dead_letters(
        self,
        queues: Sequence[str],
        uuids: Sequence[str] | None = None,
        dead_at_most: float | None = None,
    ) -> list[str]:
        """Produce a tombstone for each letter of `queues` (only `uuids`, only those dead
        at or before `dead_at_most` if given: a later letter under the uuid stays)."""
        names = list(dict.fromkeys(queues))
        wanted = None if uuids is None else set(uuids)
        if not names or wanted == set():
            return []
        cutoff = self._dead_cutoff()
        dropped: list[str] = []
        tombstones: list[tuple[str, str, bytes | None, str]] = []
        for queue, letters in (await self._scan_dead(names)).items():
            for uuid, letter in letters.items():
                if wanted is not None and uuid not in wanted:
                    continue
                if dead_at_most is not None and letter.dead_at > dead_at_most:
                    continue  # the latest record of the uuid: a tombstone would delete it
                tombstones.append((queue, uuid, None, ""))
                if letter.dead_at >= cutoff:
                    dropped.append(uuid)  # expired ones go too, without being reported
        errors = await self._produce_dead(tombstones)
        failed = [err for err in errors if err is not None]
        if failed:
            raise BrokerError(
                f"Kafka did not take {len(failed)} of {len(tombstones)} tombstones: {failed[0]!r}"
            ) from failed[0]
        return dropped

    def _dead_cutoff(self) -> float:
        ttl = self.config.dead_letter_ttl_seconds
        return float("-inf") if ttl is None else time.time() - ttl

    async def _produce_dead(
        self, items: Sequence[tuple[str, str, bytes | None, str]]
    ) -> list[BaseException | None]:
        """Send (queue, uuid, value, reason) records to dead topics, keyed by uuid; errors
        per item. A value of None is a tombstone."""
        if not items:
            return []
        producer = self._require(self._producer)
        await self._ensure_dead_topics(item[0] for item in items)
        futures: list[Any] = []
        async with self._send_lock:
            for queue, uuid, value, reason in items:
                headers = [(_H_UUID, uuid.encode()), (_H_QUEUE, queue.encode())]
                if reason:
                    headers.append((_H_REASON, reason.encode()))
                try:
                    futures.append(
                        await producer.send(
                            self.dead_topic(queue), key=uuid.encode(), value=value, headers=headers
                        )
                    )
                except KafkaError as exc:
                    futures.append(_failed(exc))
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _ensure_dead_topics(self, queues: Iterable[str]) -> None:
        """Create the dead topics of these queues (once per process)."""
        wanted = [q for q in dict.fromkeys(queues) if q not in self._dead_created]
        if not wanted:
            return
        for queue in wanted:
            self._queue_topics(queue)  # ConfigurationError for a name Kafka cannot use
        async with self._dead_lock:
            wanted = [q for q in wanted if q not in self._dead_created]
            if not wanted:
                return
            ttl = self.config.dead_letter_ttl_seconds
            configs = {"cleanup.policy": "compact"}
            if ttl is not None:
                configs = {"cleanup.policy": "compact,delete", "retention.ms": str(int(ttl * 1000))}
            # A server that refuses the settings: the topic without them still works
            # (letters are then kept until dropped, reads skip old ones).
            await self._create_compacted([self.dead_topic(q) for q in wanted], configs)
            self._dead_created.update(wanted)

    async def _ensure_marks_topics(self, queues: Iterable[str]) -> None:
        """Create the marks topics of these queues (once per process)."""
        wanted = [q for q in dict.fromkeys(queues) if q not in self._marks_created]
        if not wanted:
            return
        # Without compaction (a server refusing it) the topic only grows: the reader
        # keeps its place, so a rebalance reads what was added since the last one.
        await self._create_compacted(
            [self.marks_topic(q) for q in wanted], {"cleanup.policy": "compact"}
        )
        self._marks_created.update(wanted)

    async def _create_compacted(self, topics: list[str], configs: dict[str, str]) -> None:
        """Create one-partition topics with `configs`, or without them if the server
        refuses them (logged)."""
        admin = self._require(self._admin)
        refused: list[str] = []
        try:
            response = await admin.create_topics(
                [NewTopic(t, 1, 1, topic_configs=configs) for t in topics]
            )
            for topic, code, _ in (e[:3] for e in response.topic_errors):
                if code not in (0, _TOPIC_EXISTS):
                    refused.append(topic)
            if refused:
                response = await admin.create_topics([NewTopic(t, 1, 1) for t in refused])
        except KafkaError as exc:
            raise BrokerError(f"creating Kafka topics {topics} failed: {exc!r}") from exc
        if refused:
            for topic, code, message in (e[:3] for e in response.topic_errors):
                if code not in (0, _TOPIC_EXISTS):
                    raise BrokerError(f"creating Kafka topic {topic!r} failed: {code} {message}")
            log.warning("Kafka refused the settings %s for %s", configs, refused)

    async def _scan_dead(self, queues: list[str]) -> dict[str, dict[str, DeadLetter]]:
        """Each queue's letters by uuid (expired ones included): its dead topic read from
        the start up to the end offsets taken first, later records replacing earlier ones
        and tombstones deleting them."""
        await self._ensure_dead_topics(queues)
        admin = self._require(self._admin)
        by_topic = {self.dead_topic(q): q for q in queues}
        out: dict[str, dict[str, DeadLetter]] = {q: {} for q in queues}
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"qtasks-{self.consumer_id}-dead",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )
        foreign = 0
        try:
            await consumer.start()
            tps = []
            for meta in await admin.describe_topics(list(by_topic)):
                numbers = [p.get("partition") for p in meta.get("partitions") or ()]
                for number in [n for n in numbers if isinstance(n, int)] or [0]:
                    tps.append(TopicPartition(meta["topic"], number))
            ends = await consumer.end_offsets(tps)
            pending = {tp for tp in tps if ends.get(tp, 0) > 0}
            if pending:
                consumer.assign(list(pending))
                await consumer.seek_to_beginning(*pending)
            deadline = time.monotonic() + _DEAD_SCAN_SECONDS
            async for tp, records in _read_to_ends(consumer, ends, deadline, "dead letters"):
                letters = out[by_topic[tp.topic]]
                for record in records:
                    # By key, as compaction keeps them: the last record of a key wins.
                    key = bytes(record.key or b"").decode(errors="replace")
                    if not record.value:
                        letters.pop(key, None)  # a tombstone
                        continue
                    try:
                        letter = msgspec.msgpack.decode(bytes(record.value), type=DeadLetter)
                    except msgspec.DecodeError:
                        foreign += 1
                        continue
                    letters[key] = letter
        except KafkaError as exc:
            raise BrokerError(f"reading Kafka dead letters failed: {exc!r}") from exc
        finally:
            await _quietly(consumer.stop())
        if foreign:
            log.warning(
                "%d records in Kafka dead-letter topics are not qtasks dead letters", foreign
            )
        return out

    # -- inspection --------------------------------------------------------------------

    async def queue_sizes(self, queues: Sequence[str]) -> dict[str, int]:
        """The group's lag over each queue's topics: waiting, delayed and unfinished."""
        names = list(dict.fromkeys(queues))
        if not names:
            return {}
        await self._ensure_topics(names)
        admin = self._require(self._admin)
        if self._offsets_consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers)
            await consumer.start()
            self._offsets_consumer = consumer
        tps: dict[Any, str] = {}
        for queue in names:
            for topic in self._queue_topics(queue):
                count = 1 if self._topics[topic].delay_level is not None else self.partitions
                for p in range(count):
                    tps[TopicPartition(topic, p)] = queue
        try:
            committed = await admin.list_consumer_group_offsets(self.group_id, partitions=list(tps))
            ends = await self._offsets_consumer.end_offsets(list(tps))
            starts = await self._offsets_consumer.beginning_offsets(list(tps))
        except KafkaError as exc:
            raise BrokerError(f"reading Kafka offsets failed: {exc!r}") from exc
        sizes = dict.fromkeys(names, 0)
        consumer = self._consumer
        for tp, queue in tps.items():
            meta = committed.get(tp)
            start = meta.offset if meta is not None and meta.offset >= 0 else starts.get(tp, 0)
            end = int(ends.get(tp, 0))
            part = self._owned.get(tp)
            if part is not None and consumer is not None:
                # Where this member reads, the fetch responses' high watermark and what it
                # received are exact; some servers (tansu) answer ListOffsets with the
                # last batch's first offset + 1.
                end = max(end, int(consumer.highwater(tp) or 0), part.next_offset or 0)
            sizes[queue] += max(end - int(start), 0)
        return sizes

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Totals (the group's lag) and the live dead letters of each queue (a scan)."""
        stats = await super().queue_stats(queues)
        if stats:
            cutoff = self._dead_cutoff()
            scanned = await self._scan_dead(list(dict.fromkeys(s.queue for s in stats)))
            for entry in stats:
                letters = scanned[entry.queue].values()
                entry.dead_lettered = sum(1 for x in letters if x.dead_at >= cutoff)
        return stats

    async def delete_queues(self, queues: Sequence[str]) -> None:
        """Delete the topics behind these qtasks queues, dead ones too (for tests and tools)."""
        admin = self._require(self._admin)
        topics = [t for q in queues for t in self._queue_topics(q)]
        topics += [self.dead_topic(q) for q in queues]
        topics += [self.marks_topic(q) for q in queues]
        with contextlib.suppress(KafkaError):
            await admin.delete_topics(topics)
        self._created.difference_update(queues)
        self._dead_created.difference_update(queues)
        self._marks_created.difference_update(queues)


async def _read_to_ends(
    consumer: Any, ends: dict[Any, int], deadline: float | None = None, what: str = "a topic"
) -> AsyncIterator[tuple[Any, list[Any]]]:
    """Batches of the assigned partitions in `ends` until each reached its end offset.

    The batch that holds the end offset comes whole, so a server answering ListOffsets
    short (tansu: the last batch's first offset + 1) is fine. BrokerError past
    `deadline` (monotonic)."""
    pending = {tp for tp, end in ends.items() if end > 0}
    while True:
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        if not pending:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise BrokerError(f"reading Kafka {what} took too long")
        batches = await consumer.getmany(*pending, timeout_ms=_POLL_MS)
        for tp, records in batches.items():
            yield tp, records


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception as exc:
        log.debug("ignored while closing a Kafka client: %r", exc)


def _failed(exc: BaseException) -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _request_size(max_payload_bytes: int | None) -> int:
    """The producer's max_request_size: room for a message of max_payload_bytes and its
    headers (None, no limit: 1 GiB, about what a broker's message.max.bytes can be)."""
    if max_payload_bytes is None:
        return 1 << 30
    return max(max_payload_bytes + 64 * 1024, 1024 * 1024)
