"""The RabbitMQ broker (`amqp://` and `amqps://` URLs), on aio-pika.

How qtasks maps onto RabbitMQ (3.8 or newer, no plugins):

* Queues. A qtasks queue is a durable classic queue named `<namespace>.<queue>` with
  `x-max-priority`. Messages are persistent and published with publisher confirms: a
  batch is written at once and its confirms awaited together, so `publish` returns only
  when RabbitMQ has stored every message (BrokerError otherwise).
* Priorities. RabbitMQ serves HIGHER numbers first, 0..max_priority; qtasks runs LOWER
  numbers first. qtasks priority p is sent as `clamp(max_priority // 2 - p, 0,
  max_priority)`: with the default max_priority=10, priorities -5..5 are ten distinct
  levels around the default 0, and anything beyond runs with -5 or 5 (in publish order).
  Set `?max_priority=N` (1..255; RabbitMQ advises small numbers) for more levels; an
  existing queue keeps the value it was created with (changing it is a clear error).
  `Delivery.priority` is the original qtasks priority, carried in a header.
* Consuming. `fetch` consumes every queue it is asked for on one channel and waits for
  the server's pushes (no polling). The channel's prefetch (basic.qos, channel-wide) is
  raised to "deliveries held and not settled + max_count" (never lowered: a worker asks
  for the same sum every time), so RabbitMQ sends what the worker has room for (its
  concurrency plus prefetch) and holds nothing back from other workers. Acks are manual
  and sent only when the worker settles a delivery, after its result was stored.
  Deliveries are handed out lowest priority then oldest first; across several queues
  that order holds for what has arrived (right after a consumer starts, `fetch` lets
  the first burst arrive before choosing).
* Delays, without plugins, on the server's clock. A message due later waits in one of
  its queue's delay buckets `<namespace>.<queue>.delay.<k>`: durable queues with
  `x-message-ttl` = 4**k ms that dead-letter into the work queue (see
  `qtasks.brokers._delays`). With one TTL per queue, RabbitMQ expires a bucket's
  messages in FIFO order, none before its TTL, on the server's clock. The producer turns
  the eta into a remaining delay once, on its own clock, and the message carries what is
  left once out of its bucket (`x-qtasks-rest-us`), so a message reaching the work queue
  with a rest above 0 is sent on to the next bucket by the consumer (publish, confirm,
  ack), its rest counted down by that bucket's TTL, and never handed to the worker
  early. No worker's wall clock is read, so a skewed one changes nothing. A hop's round
  trip (a few ms) and any wait in the work queue before a consumer takes the message
  (a backlog, higher priorities first) add to the delay and are not counted down: a
  delay is late by the sum over its hops (about one per power of four of it), which is
  well under a second while consumers keep up. So delays need a consumer of the queue
  to make progress, like everything else. The absolute eta is still written
  (`x-qtasks-eta-us`) for tools and for workers of older versions during a rolling
  upgrade, which compare it with their own clocks as before; a message from an older
  producer (eta only) is converted by the first new consumer, reading the eta on its
  clock once.
* Retries and release. `requeue` publishes the next attempt (to the work queue or a
  bucket), awaits its confirm, then acks the old message; its count starts from
  `Envelope.deliveries` (0 for a retry). `release` publishes the message again as it
  came, uncounted, awaits the confirm and acks it (not basic.nack(requeue=True): see
  below), with the top priority so it goes back to the head of the queue; one whose
  copy is not confirmed is nacked back instead and counts once more. `stop` gives back
  the same way what RabbitMQ pushed within the prefetch and `fetch` never handed out.
* Delivery count (`Delivery.delivery_count`: how many times a worker was handed the
  message, this time included; `max_deliveries` ends a crash loop with it). Classic
  queues keep no count and a message cannot be changed where it lies, so the count is
  in the message: its `x-qtasks-deliveries` header holds the deliveries counted before
  it was published, and an arrival counts `header + 1`. A message that arrives flagged
  `redelivered` (its consumer died, or lost its connection, with it unacked) is not
  handed out as it is: the consumer publishes a copy with the header one higher (the
  delivery that died counts), awaits the confirm and acks the original, like a delay
  hop (a "recount"). The copy arrives unflagged, so each lost consumer adds exactly
  one, kept in the message for whoever takes it next; the flag itself was a count of 2
  however many workers a task killed, and such a task crash-looped. The copy (and a
  released message's copy) is sent with RabbitMQ's top priority, so it goes back to the
  head of the queue where it was, as a nack would put it, instead of behind the whole
  backlog (an orphan waited out a queue of thousands); `Delivery.priority` still gives
  its own priority, from the header. A redelivered message still waiting for its eta was
  never handed out: it moves on uncounted. Deliveries lost with a consumer before
  `fetch` handed them out count too (so "at least" after a lost connection). The copy
  may come back to the same consumer before the original's ack is sent: `fetch` holds
  it until then, else a task that kills its worker would take the ack with it and leave
  two copies. Workers of older versions read the header as before and count the flag
  once more. Not chosen: quorum queues count deliveries themselves (`x-delivery-count`)
  but had no priorities before RabbitMQ 4.0 (and have two levels since), and a queue
  cannot change its type; counting in the result storage would cost a write per
  delivery, which a release would have to undo.
* Lost connections. The next call that needs the server reconnects, with exponential
  backoff (0.1 s doubling to 5 s) for up to `connect_timeout_seconds`, and consumers are
  recreated. Deliveries taken before the loss are stale: RabbitMQ has already put them
  back, so their acks, releases and requeues are skipped, never sent on the new channel
  (where the same delivery tag means another message), and they are delivered again
  (at-least-once). One window is left: a connection lost (or a process killed)
  between the confirm of a copy (a requeue, a release, a delay hop or a recount) and
  the original's ack leaves both messages, and both run (at-least-once), each with its
  count. A copy that was not confirmed is nacked back after a pause (a delay hop or a
  recount) or at once (a release): its header is unchanged, and the `redelivered` flag
  that nack sets makes only a recount that had not happened yet, so nothing counts twice
  (except a failed release: it counts once).
* Dead letters. Each app has a durable direct exchange `<namespace>.dead` routing to a
  durable queue per qtasks queue, `<namespace>.<queue>.dead` (binding key: the qtasks
  queue), with `x-message-ttl` = `dead_letter_ttl_seconds`, so RabbitMQ expires old
  letters itself (no server TTL when it is None or above RabbitMQ's limit of about 49
  days; a dead queue that exists with another TTL is used as it is, with a warning).
  Reads also skip and remove letters older than the TTL. Operators may bind more queues
  to the exchange (an archive, an alert). A letter is a persistent message whose body is
  the whole `DeadLetter` packed with msgpack (not the original body with the fields in
  headers: a traceback can be larger than a frame, AMQP header floats lose precision and
  pamqp cannot encode small negatives; packed, every field round-trips exactly);
  `message_id` is the task uuid and two headers give its queue and reason for tools.
  `dead_letter` publishes on the channel of the delivery's connection with confirms (one
  batch), then acks the deliveries whose letters were confirmed: a lost connection in
  between leaves a duplicate letter (listed once: the newest per uuid), never a lost
  one. Listing reads a dead queue with basic.get without ack on a channel of its own and
  closes it, which puts every letter back in its place: one round trip per letter, so it
  is for operators, not hot paths, and while it runs other readers see fewer letters.
  Dropping reads the same way and acks the letters it drops. The count in
  `queue_stats` is the dead queue's message count.
* Queue sizes count ready messages (as RabbitMQ reports them), delayed ones in the
  buckets and this process's unsettled deliveries (not those on their way to the dead
  letters). Other consumers' unacked messages are
  not visible through AMQP (the management API would show them).
* No results: pair this broker with a storage (`storage_url='redis://...'` or
  `'sqlite:///...'`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)

from qtasks._aio import wait_event
from qtasks.brokers._delays import BUCKET_LEVELS, bucket_wait_ms, next_hop
from qtasks.config import QueueConfig
from qtasks.errors import BrokerError, ConfigurationError
from qtasks.interfaces import Broker, Delivery, QueueStats
from qtasks.message import DeadLetter
from qtasks.urls import redact_url

if TYPE_CHECKING:
    from aio_pika.abc import AbstractQueue

    from qtasks.message import Envelope

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_NAMESPACE = "QueueTasks"
DEFAULT_MAX_PRIORITY = 10
DEFAULT_CONSUMER_TIMEOUT_SECONDS = 1800.0
"""RabbitMQ's own default consumer_timeout (30 min since 3.8.15): past it, the server closes
the channel of a delivery still unacked and delivers the message again."""

_H_QUEUE = "x-qtasks-queue"
_H_PRIORITY = "x-qtasks-priority"
_H_CREATED = "x-qtasks-created-us"  # epoch microseconds: AMQP floats are single precision
_H_ETA = "x-qtasks-eta-us"  # the producer's eta: for older workers and tools, not read
_H_REST = "x-qtasks-rest-us"  # what is left to wait once out of the bucket (0: due then)
_H_DELIVERIES = "x-qtasks-deliveries"
_H_REASON = "x-qtasks-reason"

_MAX_TTL_MS = 0xFFFFFFFF  # RabbitMQ refuses a larger x-message-ttl

_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 5.0
_SETTLE_QUIET_SECONDS = 0.005
_SETTLE_MAX_SECONDS = 0.05
_HOP_RETRY_SECONDS = 1.0
_STOP_HOPS_SECONDS = 5.0


def amqp_priority(priority: int, max_priority: int) -> int:
    """RabbitMQ's priority (higher first, 0..max_priority) for a qtasks one (lower first)."""
    return min(max(max_priority // 2 - priority, 0), max_priority)


def _to_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _from_us(value: object) -> float | None:
    return value / 1_000_000 if isinstance(value, int) else None


def _stored_count(headers: dict[str, Any]) -> int:
    """Deliveries counted before the message was last published (its header)."""
    value = headers.get(_H_DELIVERIES)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _created_at(message: AbstractIncomingMessage) -> float:
    created = _from_us((message.headers or {}).get(_H_CREATED))
    if created is not None:
        return created
    return message.timestamp.timestamp() if message.timestamp else time.time()


def _rest_us(headers: dict[str, Any]) -> int:
    """Microseconds a message that just reached the work queue must still wait (0: due).

    The rest header, counted down by the bucket TTLs; no clock is read. A message
    published by an older version carries only its absolute eta: read on this clock,
    once, it becomes a rest like any other.
    """
    rest = headers.get(_H_REST)
    if isinstance(rest, int) and not isinstance(rest, bool):
        return rest
    eta = _from_us(headers.get(_H_ETA))
    return 0 if eta is None else _to_us(eta - time.time())


@dataclasses.dataclass(frozen=True)
class _Outgoing:
    """One message to publish, whatever it came from (an envelope or a delayed hop)."""

    queue: str
    priority: int
    created_at: float
    eta: float | None
    """The eta as the producer set it (written in a header, never compared with a clock)."""
    wait_us: int | None
    """Microseconds left to wait from now (None: no delay); `_send` picks the bucket."""
    body: bytes
    deliveries: int
    message_id: str | None
    first: bool = False
    """Sent with RabbitMQ's top priority: a message that was at the head of its queue
    already (a recount or a give-back) goes back there, not behind the whole backlog."""

    @classmethod
    def of(cls, envelope: Envelope, deliveries: int, now: float) -> _Outgoing:
        """An envelope to publish; its eta becomes a remaining delay on this clock, once."""
        e = envelope
        wait = None if e.eta is None else _to_us(e.eta - now)
        return cls(e.queue, e.priority, e.created_at, e.eta, wait, e.body, deliveries, e.uuid)


class _Session:
    """One connection with its two channels; replaced as a whole when anything is lost."""

    def __init__(
        self,
        connection: AbstractConnection,
        publisher: AbstractChannel,
        consumer: AbstractChannel,
        raw_consumer: Any,
    ) -> None:
        self.connection = connection
        self.publisher = publisher
        self.consumer = consumer
        self.raw_consumer = raw_consumer
        """The aiormq channel under `consumer`: its `consumers` are the live consumer tags."""
        self.closed = False
        self.declared: set[str] = set()
        self.declaring: dict[str, asyncio.Task[list[int]]] = {}
        self.consuming: dict[str, tuple[AbstractQueue, str]] = {}
        self.prefetch = 0
        self.held: collections.Counter[str] = collections.Counter()
        """Per qtasks queue: deliveries received and not yet acked/nacked (unacked here)."""
        self.dead_declared: set[str] = set()
        self.dead_declaring: dict[str, asyncio.Task[None]] = {}
        self.dead_exchange: AbstractExchange | None = None
        self.dying: collections.Counter[str] = collections.Counter()
        """Per qtasks queue: held deliveries on their way to the dead letters (not counted
        in `queue_sizes`: their fate is settled, only the broker round trips are left)."""


@dataclasses.dataclass(eq=False)
class _Receipt:
    """What `Delivery.receipt` holds: the aio-pika message and the session it came on."""

    message: AbstractIncomingMessage
    session: _Session
    queue: str
    settled: bool = False


class RabbitMQBroker(Broker):
    """The broker of `amqp://` and `amqps://` URLs; see the module docstring."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        config: QueueConfig | None = None,
        max_priority: int = DEFAULT_MAX_PRIORITY,
        connect_timeout_seconds: float = 30.0,
        consumer_timeout_seconds: float | None = DEFAULT_CONSUMER_TIMEOUT_SECONDS,
    ) -> None:
        if not 1 <= max_priority <= 255:
            raise ConfigurationError(f"max_priority must be within 1..255, got {max_priority}")
        if not namespace:
            raise ConfigurationError("the RabbitMQ broker needs a non-empty namespace")
        self.url = url
        self.namespace = namespace
        self.config = config or QueueConfig()
        self.max_priority = max_priority
        self.connect_timeout_seconds = connect_timeout_seconds
        self.claim_limit_seconds = consumer_timeout_seconds
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.declared_queues: set[str] = set()
        """Every qtasks queue this broker declared (for `delete_queues` in tests and tools)."""
        self._session: _Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock = asyncio.Lock()
        self._dead_lock = asyncio.Lock()
        self._arrived = asyncio.Event()
        self._arrivals = 0
        self._buffer: list[Delivery] = []
        self._hops: set[asyncio.Task[None]] = set()
        self._hopping: dict[str, set[asyncio.Task[None]]] = {}
        """Hops in progress per message id: from before the copy is published until the
        original is acked (see `_after_hops`)."""
        self._closers: set[asyncio.Task[None]] = set()
        self._backoff = _FIRST_BACKOFF_SECONDS
        self._connected_before = False

    @classmethod
    def from_url(cls, url: str, *, namespace: str, config: QueueConfig) -> RabbitMQBroker:
        """Build from `amqp[s]://user:password@host:port/vhost[?max_priority=N]`.

        `consumer_timeout=SECONDS` tells qtasks the server's consumer_timeout (RabbitMQ's
        default, 1800, is assumed; `none` when the server has it off). Other query
        parameters (heartbeat, ssl options, ...) go to aio-pika as they are.
        """
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        names = {"max_priority", "connect_timeout", "consumer_timeout"}
        ours = {k: v for k, v in query if k in names}
        rest = urlencode([(k, v) for k, v in query if k not in ours])
        try:
            max_priority = int(ours.get("max_priority", DEFAULT_MAX_PRIORITY))
            connect_timeout = float(ours.get("connect_timeout", 30.0))
            raw_timeout = ours.get("consumer_timeout", str(DEFAULT_CONSUMER_TIMEOUT_SECONDS))
            consumer_timeout = None if raw_timeout.lower() == "none" else float(raw_timeout)
        except ValueError as exc:
            raise ConfigurationError(f"bad parameter in {redact_url(url)}: {exc}") from None
        return cls(
            urlunsplit(parts._replace(query=rest)),
            namespace=namespace,
            config=config,
            max_priority=max_priority,
            connect_timeout_seconds=connect_timeout,
            consumer_timeout_seconds=consumer_timeout,
        )

    # -- names -------------------------------------------------------------------------

    def queue_name(self, queue: str) -> str:
        """The RabbitMQ queue behind a qtasks queue."""
        return f"{self.namespace}.{queue}"

    def bucket_name(self, queue: str, level: int) -> str:
        """The delay bucket `level` of a qtasks queue."""
        return f"{self.namespace}.{queue}.delay.{level}"

    def dead_exchange_name(self) -> str:
        """The exchange every dead letter of this app is published to."""
        return f"{self.namespace}.dead"

    def dead_queue_name(self, queue: str) -> str:
        """The queue keeping the dead letters of a qtasks queue."""
        return f"{self.namespace}.{queue}.dead"

    def _priority_of(self, message: AbstractIncomingMessage) -> int:
        """The qtasks priority from our header, else mapped back from the AMQP one."""
        raw = (message.headers or {}).get(_H_PRIORITY)
        if isinstance(raw, bytes):
            raw = raw.decode("ascii", "replace")
        try:
            return int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return self.max_priority // 2 - (message.priority or 0)

    # -- connection --------------------------------------------------------------------

    def _bind_loop(self) -> None:
        # A sync app may stop and start again on another loop: loop-bound objects follow.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._connect_lock = asyncio.Lock()
            self._dead_lock = asyncio.Lock()
            self._arrived = asyncio.Event()

    async def start(self) -> None:
        """Connect (retrying with backoff for up to `connect_timeout_seconds`)."""
        self._bind_loop()
        await self._live_session(self.connect_timeout_seconds)

    async def stop(self) -> None:
        """Stop consuming, finish moving delayed messages on, then close the connection.

        Closing gives every delivery still held (buffered or handed out) back to RabbitMQ.
        """
        session, self._session = self._session, None
        if session is None or session.closed:
            self._buffer.clear()
            return
        for queue, tag in list(session.consuming.values()):
            with contextlib.suppress(AMQPError, OSError, RuntimeError, asyncio.TimeoutError):
                await queue.cancel(tag)
        if self._hops:
            _, pending = await asyncio.wait(list(self._hops), timeout=_STOP_HOPS_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        unfetched = [d.receipt for d in self._buffer if d.receipt.session is session]
        self._buffer = [d for d in self._buffer if d.receipt.session is not session]
        if unfetched:
            # Pushed within the prefetch but never handed out: closing would give them
            # back flagged redelivered, and every deploy would count a delivery of them.
            try:
                await asyncio.wait_for(self._give_back(unfetched), _STOP_HOPS_SECONDS)
            except asyncio.TimeoutError:
                log.warning("giving back %d unfetched messages timed out", len(unfetched))
        session.closed = True
        try:
            await session.connection.close()
        except Exception as exc:
            log.warning("closing the RabbitMQ connection failed: %r", exc)
        if self._closers:
            await asyncio.gather(*list(self._closers), return_exceptions=True)

    async def _live_session(self, timeout: float) -> _Session:
        session = self._session
        if session is not None and not session.closed:
            return session
        self._bind_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        async with self._connect_lock:
            while True:
                session = self._session
                if session is not None and not session.closed:
                    return session
                try:
                    session = await self._connect()
                except (AuthenticationError, ProbableAuthenticationError) as exc:
                    raise BrokerError(
                        f"RabbitMQ at {redact_url(self.url)} refused the login: {exc}"
                    ) from exc
                except (AMQPError, OSError, asyncio.TimeoutError) as exc:
                    delay = self._backoff * random.uniform(0.8, 1.2)
                    self._backoff = min(self._backoff * 2, _MAX_BACKOFF_SECONDS)
                    if loop.time() + delay > deadline:
                        raise BrokerError(
                            f"cannot connect to RabbitMQ at {redact_url(self.url)}: {exc!r}"
                        ) from exc
                    log.warning(
                        "connecting to RabbitMQ at %s failed (%r); retrying in %.1fs",
                        redact_url(self.url),
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                self._backoff = _FIRST_BACKOFF_SECONDS
                if self._connected_before:
                    log.info("reconnected to RabbitMQ at %s", redact_url(self.url))
                self._connected_before = True
                self._session = session
                return session

    async def _connect(self) -> _Session:
        connection = await aio_pika.connect(
            self.url,
            timeout=min(self.connect_timeout_seconds, 10.0),
            client_properties={"connection_name": f"qtasks {self.namespace} {self.consumer_id}"},
        )
        try:
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            consumer = await connection.channel(publisher_confirms=False)
            raw = await consumer.get_underlay_channel()
        except BaseException:
            await connection.close()
            raise
        session = _Session(connection, publisher, consumer, raw)

        def lost(sender: object, exc: BaseException | None = None) -> None:
            self._lost(session, exc)

        connection.close_callbacks.add(lost)
        publisher.close_callbacks.add(lost)
        consumer.close_callbacks.add(lost)

        def cancelled(frame: Any) -> None:
            self._arrived.set()  # wake fetchers: _subscribe consumes the queue again

        callbacks = getattr(raw, "on_consumer_cancel_callbacks", None)  # aiormq >= 7
        if callbacks is not None:
            callbacks.add(cancelled)
        return session

    def _lost(self, session: _Session, exc: BaseException | None) -> None:
        """The connection or a channel closed under us: drop the session and what it held."""
        if session.closed:
            return
        session.closed = True
        if self._session is session:
            self._session = None
        self._buffer = [d for d in self._buffer if d.receipt.session is not session]
        log.warning(
            "lost the RabbitMQ connection to %s (%r); %d unsettled deliveries go back to "
            "the server and come again; reconnecting on next use",
            redact_url(self.url),
            exc,
            sum(session.held.values()),
        )
        if not session.connection.is_closed:
            # A channel alone failed: close the rest so the server takes everything back.
            closer = asyncio.ensure_future(self._close_quietly(session.connection))
            self._closers.add(closer)
            closer.add_done_callback(self._closers.discard)
        self._arrived.set()

    @staticmethod
    async def _close_quietly(connection: AbstractConnection) -> None:
        with contextlib.suppress(Exception):
            await connection.close()

    # -- declaring ---------------------------------------------------------------------

    async def _ensure_declared(self, session: _Session, queue: str) -> None:
        """Declare once per session, however many publishes ask at the same time."""
        if queue in session.declared:
            return
        task = session.declaring.get(queue)
        if task is None:
            task = asyncio.ensure_future(self._declare(session, queue))
            session.declaring[queue] = task
            task.add_done_callback(lambda _: session.declaring.pop(queue, None))
        await asyncio.shield(task)

    async def _declare(self, session: _Session, queue: str) -> list[int]:
        """Declare a work queue and its delay buckets; their ready-message counts."""
        work = self.queue_name(queue)
        channel = session.publisher
        declarations = [
            channel.declare_queue(
                work, durable=True, arguments={"x-max-priority": self.max_priority}
            )
        ]
        declarations += [
            channel.declare_queue(
                self.bucket_name(queue, level),
                durable=True,
                arguments={
                    "x-message-ttl": bucket_wait_ms(level),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": work,
                },
            )
            for level in range(BUCKET_LEVELS)
        ]
        results = await asyncio.gather(*declarations, return_exceptions=True)
        for result in results:
            if isinstance(result, ChannelPreconditionFailed):
                raise ConfigurationError(
                    f"RabbitMQ queue {work!r} (or one of its delay buckets) exists with "
                    f"other arguments ({result}); this broker declares x-max-priority="
                    f"{self.max_priority}: use the value it was created with or delete it"
                ) from result
            if isinstance(result, BaseException):
                raise BrokerError(f"declaring RabbitMQ queue {work!r} failed: {result!r}")
        session.declared.add(queue)
        self.declared_queues.add(queue)
        counts: list[int] = []
        for result in results:
            assert not isinstance(result, BaseException)
            declared = result.declaration_result
            counts.append(int(declared.message_count or 0))
        return counts

    # -- publishing --------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish with confirms; BrokerError if RabbitMQ did not confirm every message."""
        if not envelopes:
            return
        session = await self._live_session(self.connect_timeout_seconds)
        now = time.time()
        items = [_Outgoing.of(e, 0, now) for e in envelopes]
        errors = [err for err in await self._send(session, items) if err is not None]
        if errors:
            raise BrokerError(
                f"RabbitMQ did not confirm {len(errors)} of {len(items)} messages: {errors[0]!r}"
            ) from errors[0]

    async def _send(
        self, session: _Session, items: Sequence[_Outgoing]
    ) -> list[BaseException | None]:
        """Publish every item at once, then await the confirms together; errors per item."""
        missing = {i.queue for i in items} - session.declared
        if missing:
            await asyncio.gather(*(self._ensure_declared(session, q) for q in missing))
        exchange = session.publisher.default_exchange
        publishes = []
        for item in items:
            level, rest = (None, 0) if item.wait_us is None else next_hop(item.wait_us)
            if level is None:
                routing_key = self.queue_name(item.queue)
            else:
                routing_key = self.bucket_name(item.queue, level)
            message = self._message(item, None if item.wait_us is None else rest)
            publishes.append(exchange.publish(message, routing_key, mandatory=True))
        results = await asyncio.gather(*publishes, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    def _message(self, item: _Outgoing, rest_us: int | None) -> aio_pika.Message:
        headers: dict[str, Any] = {
            _H_QUEUE: item.queue,
            _H_PRIORITY: str(item.priority),  # text: pamqp 3 cannot encode small negatives
            _H_CREATED: _to_us(item.created_at),
            _H_DELIVERIES: item.deliveries,
        }
        if item.eta is not None:
            headers[_H_ETA] = _to_us(item.eta)
        if rest_us is not None:
            headers[_H_REST] = rest_us
        return aio_pika.Message(
            item.body,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=self.max_priority
            if item.first
            else amqp_priority(item.priority, self.max_priority),
            message_id=item.message_id,
        )

    # -- consuming ---------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        """Claim up to max_count due messages, waiting for RabbitMQ's pushes up to timeout."""
        names = list(dict.fromkeys(queues))
        if max_count <= 0:
            return []
        if not names:
            await asyncio.sleep(max(timeout, 0.0))
            return []
        self._bind_loop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        settle = False
        while True:
            session = await self._live_session(max(deadline - loop.time(), 1.0))
            if await self._subscribe(session, names, max_count):
                # Declaring and consuming took round trips: wait the full timeout for
                # the pushes from here, not what is left of it.
                settle = True
                deadline = loop.time() + max(timeout, 0.0)
            if any(d.queue in names for d in self._buffer):
                if settle:
                    await self._settle()
                await self._after_hops(names)
                return self._take(names, max_count)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            self._arrived.clear()
            await wait_event(self._arrived, remaining)

    async def _subscribe(self, session: _Session, names: list[str], max_count: int) -> bool:
        """Set the prefetch for this fetch and consume every queue; True if one was new."""
        buffered = sum(1 for d in self._buffer if d.queue in names)
        want = sum(session.held.values()) - buffered + max_count
        # Only ever raised (a round trip each time): for a worker, held + room is its
        # constant concurrency + prefetch, so this settles on that at once.
        if want > session.prefetch:
            await session.consumer.set_qos(prefetch_count=want, global_=True)
            session.prefetch = want
        started = False
        for name in names:
            entry = session.consuming.get(name)
            if entry is not None and entry[1] not in session.raw_consumer.consumers:
                # The server ended this consumer (its queue was deleted): consume again.
                del session.consuming[name]
                session.declared.discard(name)
            elif entry is not None:
                continue
            await self._ensure_declared(session, name)
            queue = await session.consumer.declare_queue(
                self.queue_name(name),
                durable=True,
                arguments={"x-max-priority": self.max_priority},
            )
            tag = await queue.consume(self._on_message(session, name), no_ack=False)
            session.consuming[name] = (queue, tag)
            started = True
        return started

    def _on_message(
        self, session: _Session, queue: str
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            self._arrive(session, queue, message)

        return on_message

    def _arrive(self, session: _Session, queue: str, message: AbstractIncomingMessage) -> None:
        if session.closed:
            return  # the server has it back already
        session.held[queue] += 1
        receipt = _Receipt(message, session, queue)
        headers = message.headers or {}
        before = _stored_count(headers)
        rest = _rest_us(headers)
        if rest > 0:
            # Early: no worker has had it yet, redelivered or not, so nothing to count.
            self._start_hop(receipt, rest, before)
            return
        if message.redelivered:
            # Its consumer died with it (or gave it up unacked): that delivery counts,
            # and only a new message can carry the count to whoever gets it next.
            self._start_hop(receipt, 0, before + 1)
            return
        priority = self._priority_of(message)
        created = _created_at(message)
        delivery = Delivery(message.body, receipt, queue, priority, created, before + 1)
        self._buffer.append(delivery)
        self._arrivals += 1
        self._arrived.set()

    def _start_hop(self, receipt: _Receipt, wait_us: int, deliveries: int) -> None:
        hop = asyncio.ensure_future(self._hop(receipt, wait_us, deliveries))
        self._hops.add(hop)
        hop.add_done_callback(self._hops.discard)
        key = receipt.message.message_id
        if key:
            self._hopping.setdefault(key, set()).add(hop)

            def done(task: asyncio.Task[None]) -> None:
                tasks = self._hopping.get(key)
                if tasks is not None:
                    tasks.discard(task)
                    if not tasks:
                        del self._hopping[key]

            hop.add_done_callback(done)

    async def _after_hops(self, names: list[str]) -> None:
        """Wait until no buffered message of `names` is the copy of a hop whose original
        is not acked yet.

        The copy can reach this very consumer before the hop's ack is sent. Handed out
        then, a task that kills its worker (the crash loop a recount is there to end)
        would take the ack with it, and its original would come back as a second copy.
        """
        while self._hopping:  # almost always empty: no scan of the buffer per fetch
            pending = {
                task
                for d in self._buffer
                if d.queue in names
                for task in self._hopping.get(d.receipt.message.message_id or "", ())
            }
            if not pending:
                return
            await asyncio.wait(pending)

    async def _settle(self) -> None:
        # Right after basic.consume the server pushes a burst; let it end (a quiet gap or
        # a cap) so one fetch chooses among all of it instead of whatever came first.
        loop = asyncio.get_running_loop()
        end = loop.time() + _SETTLE_MAX_SECONDS
        while loop.time() < end:
            seen = self._arrivals
            await asyncio.sleep(_SETTLE_QUIET_SECONDS)
            if self._arrivals == seen:
                return

    def _take(self, names: list[str], max_count: int) -> list[Delivery]:
        matching = sorted(
            (d for d in self._buffer if d.queue in names), key=lambda d: (d.priority, d.created_at)
        )
        out = matching[:max_count]
        taken = {id(d) for d in out}
        self._buffer = [d for d in self._buffer if id(d) not in taken]
        return out

    def _copy(self, receipt: _Receipt, wait_us: int, deliveries: int) -> _Outgoing:
        """The message of `receipt` to publish again, `wait_us` from now, with a count.

        `wait_us` 0 still writes a rest of 0: without it a consumer would read the eta
        header on its own clock again (see `_rest_us`).
        """
        message = receipt.message
        return _Outgoing(
            receipt.queue,
            self._priority_of(message),
            _created_at(message),
            _from_us((message.headers or {}).get(_H_ETA)),
            wait_us,
            message.body,
            deliveries,
            message.message_id,
            # Not a delayed hop: its bucket dead-letters into the work queue with this.
            first=wait_us == 0,
        )

    async def _hop(self, receipt: _Receipt, wait_us: int, deliveries: int) -> None:
        """Publish a message again (on to its next delay bucket, or to its work queue
        with a new count), await the confirm, then ack the one it replaces."""
        item = self._copy(receipt, wait_us, deliveries)
        try:
            (error,) = await self._send(receipt.session, [item])
        except Exception as exc:
            error = exc
        if error is not None:
            what = "moving a delayed message on" if wait_us > 0 else "recounting a redelivery"
            log.warning("%s failed (%r); it comes back to retry", what, error)
            await asyncio.sleep(_HOP_RETRY_SECONDS)
            # Its header is unchanged and it comes back flagged redelivered, which it was
            # already or which a delayed message ignores: the retry counts nothing twice.
            await self._settle_receipts([receipt], requeue=True)
            return
        await self._settle_receipts([receipt], requeue=None)

    async def _give_back(self, receipts: Sequence[_Receipt]) -> None:
        """Publish each message again as it came (its stored count unchanged), await the
        confirms, then ack; one not confirmed is nacked back instead (and so counts once).

        Not basic.nack(requeue=True): the message would come back flagged redelivered,
        which `_arrive` takes for a consumer that died with it.
        """
        stale = [r for r in receipts if not r.settled and r.session.closed]
        if stale:
            await self._settle_receipts(stale, requeue=None)  # sends nothing: logs them
        live = [r for r in receipts if not r.settled and not r.session.closed]
        if not live:
            return
        session = live[0].session  # every live receipt is of the one live session
        # The header, not the count handed out: that is the header + 1 (see `_arrive`).
        items = [self._copy(r, 0, _stored_count(r.message.headers or {})) for r in live]
        errors: list[BaseException | None]
        try:
            errors = await self._send(session, items)
        except Exception as exc:
            errors = [exc] * len(items)
        await self._settle_receipts(
            [r for r, err in zip(live, errors, strict=True) if err is None], requeue=None
        )
        failed = [r for r, err in zip(live, errors, strict=True) if err is not None]
        if failed:
            first = next(err for err in errors if err is not None)
            log.warning(
                "RabbitMQ did not confirm %d of %d messages given back (%r); they go back "
                "by basic.nack and will count one delivery more",
                len(failed),
                len(live),
                first,
            )
            await self._settle_receipts(failed, requeue=True)

    # -- settling ----------------------------------------------------------------------

    async def _settle_receipts(self, receipts: Sequence[_Receipt], *, requeue: bool | None) -> int:
        """Ack (requeue=None) or nack receipts still valid on a live session; how many were.

        Receipts from a lost session are skipped: RabbitMQ has taken those messages back
        and delivers them again, and their tags mean nothing on a new channel.
        """
        done = stale = 0
        for receipt in receipts:
            if receipt.settled:
                continue
            if receipt.session.closed:
                stale += 1
                continue
            # Settled BEFORE the await: aiormq queues the frame first, so a caller
            # cancelled here (a worker's flush at shutdown) has sent it anyway, and sending
            # it again when that caller retries would be an unknown delivery tag, for which
            # RabbitMQ closes the channel and takes back everything unacked on it.
            receipt.settled = True
            receipt.session.held[receipt.queue] -= 1
            try:
                if requeue is None:
                    await receipt.message.ack()
                else:
                    await receipt.message.nack(requeue=requeue)
            except (AMQPError, OSError, RuntimeError) as exc:
                # The channel went away mid-batch: the server has these back.
                log.debug("settling a RabbitMQ delivery failed: %r", exc)
                stale += 1
                continue
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                # Not this task: the connection's reader, cancelled as it closes, fails
                # the frame's drain with its CancelledError. Raised, it would end the
                # caller (a worker's result writer) for what is only a lost connection.
                log.debug("settling a RabbitMQ delivery failed: its connection closed")
                stale += 1
                continue
            done += 1
        if stale:
            log.info(
                "%d deliveries from a lost RabbitMQ connection were not settled; "
                "RabbitMQ delivers them again",
                stale,
            )
        return done

    @staticmethod
    def _receipts(deliveries: Sequence[Delivery]) -> list[_Receipt]:
        receipts = [d.receipt for d in deliveries]
        for r in receipts:
            if not isinstance(r, _Receipt):
                raise TypeError(f"not a RabbitMQ delivery receipt: {r!r}")
        return receipts

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack finished messages (skipping ones from a lost connection: they come again)."""
        await self._settle_receipts(self._receipts(deliveries), requeue=None)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Publish each message again, uncounted, for any consumer; then ack the original.

        This process stops consuming those queues first: its consumer still has prefetch
        room and would otherwise take the messages straight back. The next fetch
        consumes again (the worker releases only when it stops).
        """
        receipts = self._receipts(deliveries)
        live = [r for r in receipts if not r.settled and not r.session.closed]
        for queue in {r.queue for r in live}:
            session = live[0].session
            consumer = session.consuming.pop(queue, None)
            if consumer is not None:
                with contextlib.suppress(AMQPError, OSError, RuntimeError, asyncio.TimeoutError):
                    await consumer[0].cancel(consumer[1])
        await self._give_back(receipts)
        self._arrived.set()

    async def requeue(self, items: Sequence[tuple[Delivery, Envelope]]) -> None:
        """Publish each next attempt, await its confirm, then ack the message it replaces."""
        receipts = self._receipts([d for d, _ in items])
        live = [
            (d, e)
            for (d, e), r in zip(items, receipts, strict=True)
            if not r.settled and not r.session.closed
        ]
        if not live:
            return
        session = live[0][0].receipt.session
        now = time.time()
        # The envelope says where the count starts: 0 for a retry (a new attempt), the
        # count so far for a message sent back unrun.
        outgoing = [_Outgoing.of(e, e.deliveries, now) for _, e in live]
        errors = await self._send(session, outgoing)
        confirmed = [d.receipt for (d, _), err in zip(live, errors, strict=True) if err is None]
        await self._settle_receipts(confirmed, requeue=None)
        failed = [err for err in errors if err is not None]
        if failed:
            raise BrokerError(
                f"RabbitMQ did not confirm {len(failed)} of {len(live)} retries: {failed[0]!r}"
            ) from failed[0]

    # -- dead letters ------------------------------------------------------------------

    async def dead_letter(self, items: Sequence[tuple[Delivery, DeadLetter]]) -> None:
        """Publish each letter on its delivery's connection, await the confirms, then ack.

        Deliveries from a lost connection are skipped: RabbitMQ has them back and delivers
        them again. A delivery is acked only once its letter is confirmed.
        """
        receipts = self._receipts([d for d, _ in items])
        groups: dict[int, list[tuple[_Receipt, DeadLetter]]] = {}
        stale: list[_Receipt] = []
        for (_, letter), receipt in zip(items, receipts, strict=True):
            if receipt.settled:
                continue
            if receipt.session.closed:
                stale.append(receipt)
            else:
                groups.setdefault(id(receipt.session), []).append((receipt, letter))
        for group in groups.values():
            for receipt, _ in group:
                receipt.session.dying[receipt.queue] += 1
        failed: list[BaseException] = []
        total = 0
        try:
            if stale:
                await self._settle_receipts(stale, requeue=None)  # sends nothing: logs them
            for group in groups.values():
                session = group[0][0].session
                total += len(group)
                queues = {letter.queue for _, letter in group}
                exchange = await self._dead_exchange(session, queues)
                results = await asyncio.gather(
                    *(
                        exchange.publish(_letter_message(letter), letter.queue, mandatory=True)
                        for _, letter in group
                    ),
                    return_exceptions=True,
                )
                confirmed = [
                    receipt
                    for (receipt, _), result in zip(group, results, strict=True)
                    if not isinstance(result, BaseException)
                ]
                await self._settle_receipts(confirmed, requeue=None)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    # Unroutable (a dead queue deleted since): declare again next time.
                    session.dead_declared.difference_update(queues)
                failed += errors
        finally:
            for group in groups.values():
                for receipt, _ in group:
                    receipt.session.dying[receipt.queue] -= 1
        if failed:
            raise BrokerError(
                f"RabbitMQ did not confirm {len(failed)} of {total} dead letters: {failed[0]!r}"
            ) from failed[0]

    async def dead_letters(
        self, queues: Sequence[str], limit: int = 100, uuids: Sequence[str] | None = None
    ) -> list[DeadLetter]:
        """Dead letters of `queues`, newest first (read and put back: see the module doc)."""
        wanted = None if uuids is None else set(uuids)
        if limit <= 0 or wanted == set():
            return []
        newest: dict[tuple[str, str], DeadLetter] = {}
        for letter, _ in await self._visit_dead(queues, lambda _: False):
            if wanted is not None and letter.uuid not in wanted:
                continue
            key = (letter.queue, letter.uuid)
            seen = newest.get(key)
            if seen is None or letter.dead_at >= seen.dead_at:
                newest[key] = letter  # a duplicate (see dead_letter): the newest counts
        return sorted(newest.values(), key=lambda x: x.dead_at, reverse=True)[:limit]

    async def drop_dead_letters(
        self,
        queues: Sequence[str],
        uuids: Sequence[str] | None = None,
        dead_at_most: float | None = None,
    ) -> list[str]:
        """Ack the letters of `queues` (only `uuids`, only those dead at or before
        `dead_at_most` if given); the others are put back."""
        wanted = None if uuids is None else set(uuids)
        if wanted == set():
            return []

        def chosen(letter: DeadLetter) -> bool:
            if dead_at_most is not None and letter.dead_at > dead_at_most:
                return False
            return wanted is None or letter.uuid in wanted

        dropped: dict[str, None] = {}
        for letter, taken in await self._visit_dead(queues, chosen):
            if taken:
                dropped[letter.uuid] = None
        return list(dropped)

    async def _visit_dead(
        self, queues: Sequence[str], drop: Callable[[DeadLetter], bool]
    ) -> list[tuple[DeadLetter, bool]]:
        """Read every dead letter of `queues` oldest first, acking (deleting) the expired
        ones and those `drop` picks; the rest are put back by closing the
        channel. The live letters read, each with whether it was dropped.
        """
        names = list(dict.fromkeys(queues))
        if not names:
            return []
        session = await self._live_session(self.connect_timeout_seconds)
        ttl = self.config.dead_letter_ttl_seconds
        cutoff = None if ttl is None else time.time() - ttl
        out: list[tuple[DeadLetter, bool]] = []
        foreign = 0
        try:
            async with self._dead_lock:
                for queue in names:
                    await self._ensure_dead(session, queue)
                    async with self._side_channel(session) as channel:
                        dead = await channel.get_queue(self.dead_queue_name(queue), ensure=False)
                        while True:
                            message = await dead.get(no_ack=False, fail=False)
                            if message is None:
                                break
                            letter = _unpack_letter(message.body)
                            if letter is None:
                                foreign += 1  # not written by qtasks: left alone
                            elif cutoff is not None and letter.dead_at < cutoff:
                                await message.ack()  # expired (RabbitMQ's TTL may be off)
                            else:
                                taken = drop(letter)
                                if taken:
                                    await message.ack()
                                out.append((letter, taken))
                            if not message.message_count:
                                break  # that was the last one (the others are ours, unacked)
        except (AMQPError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
            raise BrokerError(f"reading RabbitMQ dead letters failed: {exc!r}") from exc
        if foreign:
            log.warning(
                "%d messages in RabbitMQ dead-letter queues are not qtasks dead letters", foreign
            )
        return out

    async def _dead_exchange(self, session: _Session, queues: set[str]) -> AbstractExchange:
        """The dead-letter exchange on the session's publisher channel, queues declared."""
        missing = queues - session.dead_declared
        if missing:
            await asyncio.gather(*(self._ensure_dead(session, q) for q in missing))
        if session.dead_exchange is None:
            session.dead_exchange = await session.publisher.get_exchange(
                self.dead_exchange_name(), ensure=False
            )
        return session.dead_exchange

    async def _ensure_dead(self, session: _Session, queue: str) -> None:
        """Declare a queue's dead-letter queue (and the exchange) once per session."""
        if queue in session.dead_declared:
            return
        task = session.dead_declaring.get(queue)
        if task is None:
            task = asyncio.ensure_future(self._declare_dead(session, queue))
            session.dead_declaring[queue] = task
            task.add_done_callback(lambda _: session.dead_declaring.pop(queue, None))
        await asyncio.shield(task)

    async def _declare_dead(self, session: _Session, queue: str) -> None:
        name = self.dead_queue_name(queue)
        arguments: dict[str, Any] = {}
        ttl = self.config.dead_letter_ttl_seconds
        if ttl is not None and 0 <= ttl * 1000 <= _MAX_TTL_MS:
            arguments["x-message-ttl"] = int(ttl * 1000 + 0.999)
        mismatch: BaseException | None = None
        # On channels of their own: a failed declaration closes its channel, and losing
        # the publisher channel would drop the whole session.
        async with self._side_channel(session) as channel:
            await channel.declare_exchange(
                self.dead_exchange_name(), aio_pika.ExchangeType.DIRECT, durable=True
            )
            try:
                dead = await channel.declare_queue(name, durable=True, arguments=arguments)
            except ChannelPreconditionFailed as exc:
                mismatch = exc
            else:
                await dead.bind(self.dead_exchange_name(), routing_key=queue)
        if mismatch is not None:
            log.warning(
                "RabbitMQ dead-letter queue %r exists with other arguments (%s); using it as "
                "it is (delete it to apply dead_letter_ttl_seconds)",
                name,
                mismatch,
            )
            async with self._side_channel(session) as channel:
                dead = await channel.declare_queue(name, passive=True)
                await dead.bind(self.dead_exchange_name(), routing_key=queue)
        session.dead_declared.add(queue)
        self.declared_queues.add(queue)

    @contextlib.asynccontextmanager
    async def _side_channel(self, session: _Session) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel: an error closes only it, and closing it puts back every
        message it took without ack (in their places)."""
        channel = await session.connection.channel(publisher_confirms=False)
        try:
            yield channel
        finally:
            with contextlib.suppress(AMQPError, OSError, RuntimeError, asyncio.TimeoutError):
                await channel.close()

    # -- inspection --------------------------------------------------------------------

    async def queue_sizes(self, queues: Sequence[str]) -> dict[str, int]:
        """Ready + delayed messages (from RabbitMQ) + this process's unsettled ones."""
        session = await self._live_session(self.connect_timeout_seconds)
        sizes: dict[str, int] = {}
        for queue in dict.fromkeys(queues):
            counts = await self._declare(session, queue)
            sizes[queue] = sum(counts) + max(session.held[queue] - session.dying[queue], 0)
        return sizes

    async def queue_stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """Totals (as `queue_sizes`) and the dead letters each queue keeps."""
        stats = await super().queue_stats(queues)
        if not stats:
            return stats
        session = await self._live_session(self.connect_timeout_seconds)
        await asyncio.gather(*(self._ensure_dead(session, q) for q in {s.queue for s in stats}))
        async with self._side_channel(session) as channel:
            for entry in stats:
                dead = await channel.declare_queue(self.dead_queue_name(entry.queue), passive=True)
                entry.dead_lettered = int(dead.declaration_result.message_count or 0)
        return stats

    async def delete_queues(self, queues: Sequence[str]) -> None:
        """Delete the RabbitMQ queues (delay buckets, dead letters) behind these qtasks
        queues, and the app's dead-letter exchange once no dead-letter queue is left."""
        session = await self._live_session(self.connect_timeout_seconds)
        for queue in queues:
            consumer = session.consuming.pop(queue, None)
            if consumer is not None:
                await consumer[0].cancel(consumer[1])
            names = [self.queue_name(queue)]
            names += [self.bucket_name(queue, level) for level in range(BUCKET_LEVELS)]
            names.append(self.dead_queue_name(queue))
            for name in names:
                await session.publisher.queue_delete(name)
            session.declared.discard(queue)
            session.dead_declared.discard(queue)
            self.declared_queues.discard(queue)
        try:
            async with self._side_channel(session) as channel:
                await channel.exchange_delete(self.dead_exchange_name(), if_unused=True)
        except ChannelPreconditionFailed:
            pass  # other queues still keep dead letters through it
        else:
            session.dead_declared.clear()  # declare again: the exchange is gone


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (always assumed before 3.11,
    which cannot tell)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is None or bool(cancelling())


def _letter_message(letter: DeadLetter) -> aio_pika.Message:
    """A dead letter as a persistent message: the packed DeadLetter, id and reason aside."""
    return aio_pika.Message(
        msgspec.msgpack.encode(letter),
        headers={_H_QUEUE: letter.queue, _H_REASON: letter.reason},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/msgpack",
        type="qtasks.dead_letter",
        message_id=letter.uuid,
        timestamp=letter.dead_at,
    )


def _unpack_letter(body: bytes) -> DeadLetter | None:
    try:
        return msgspec.msgpack.decode(body, type=DeadLetter)
    except msgspec.DecodeError:
        return None
