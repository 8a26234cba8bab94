"""The RabbitMQ broker against a real server: a worker end to end, faults, and its mapping rules.

The broker-only rules every broker shares are in tests/contract/; here is what is
RabbitMQ's own: priorities mapped onto x-max-priority, delay buckets, prefetch, lost
connections, and the app refusing to run it without a result storage.
"""

from __future__ import annotations

import asyncio
import collections
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from qtasks import ConfigurationError, QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers import rabbitmq as rabbitmq_module
from qtasks.brokers._delays import BUCKET_LEVELS, bucket_for, bucket_wait_ms, next_hop
from qtasks.brokers.rabbitmq import RabbitMQBroker, amqp_priority
from qtasks.errors import Retry
from qtasks.global_configs.sqlite import SqliteGlobalConfig
from qtasks.message import Envelope
from qtasks.runtime.worker import Worker
from qtasks.storages.sqlite import SqliteStorage

from ..servers import RABBITMQ_URL, require_server

FAST = {
    "heartbeat_interval_seconds": 0.2,
    "sweep_interval_seconds": 0.2,
    "worker_lost_after_seconds": 2.0,
    "poll_interval_seconds": 0.01,
}


def drop_connection(broker: RabbitMQBroker) -> None:
    """Cut the broker's socket without an AMQP goodbye (a network failure, a dead peer)."""
    session = broker._session
    assert session is not None
    assert session.connection.transport is not None
    amqp = session.connection.transport.connection
    amqp._reader_task.cancel()  # type: ignore[attr-defined]
    amqp._writer_task.cancel()  # type: ignore[attr-defined]


# -- rules that need no server ---------------------------------------------------------------


def test_priority_mapping_is_lower_first_and_clamped() -> None:
    # qtasks runs lower numbers first; RabbitMQ serves higher ones first.
    assert [amqp_priority(p, 10) for p in (-7, -5, -1, 0, 1, 5, 9)] == [10, 10, 6, 5, 4, 0, 0]
    ranks = [amqp_priority(p, 10) for p in range(-5, 6)]
    assert ranks == sorted(ranks, reverse=True)
    assert len(set(ranks)) == 11, "-5..5 are distinct levels with the default max_priority"
    assert amqp_priority(0, 255) == 127


def test_delay_buckets_never_deliver_early() -> None:
    assert bucket_for(0) is None
    assert bucket_for(-1) is None
    assert bucket_for(0.0004) == 0  # rounded up to the 1 ms bucket
    for seconds in (0.001, 0.3, 1.0, 7.5, 3600.0, 86_400.0 * 30):
        level = bucket_for(seconds)
        assert level is not None
        assert bucket_wait_ms(level) <= seconds * 1000
        if level < BUCKET_LEVELS - 1:
            assert bucket_wait_ms(level + 1) > seconds * 1000
    assert bucket_for(86_400.0 * 30) == BUCKET_LEVELS - 1


def test_a_countdown_waits_its_delay_and_under_a_millisecond_more() -> None:
    for remaining_us in (1, 400, 999, 1000, 1001, 1_500_000, 4_250_000, 3_600_000_000, 10**13):
        waited = hops = 0
        rest = remaining_us
        while True:
            level, after = next_hop(rest)
            if level is None:
                break
            assert 0 <= after < rest or rest < 1000
            waited += bucket_wait_ms(level) * 1000
            hops += 1
            rest = after
        assert waited >= remaining_us, "never early"
        assert waited < remaining_us + 1000, "late by under 1 ms of bucket waits"
        assert hops <= 3 * BUCKET_LEVELS
    assert next_hop(0) == (None, 0)
    assert next_hop(-5) == (None, 0)
    assert next_hop(1_500_000) == (5, 1_500_000 - 1_024_000)


def skewed_time(seconds: float) -> types.SimpleNamespace:
    """A stand-in for the `time` module whose wall clock is `seconds` off (monotonic is not)."""
    return types.SimpleNamespace(
        time=lambda: time.time() + seconds, monotonic=time.monotonic, sleep=time.sleep
    )


def test_url_parameters() -> None:
    broker = RabbitMQBroker.from_url(
        "amqps://u:secret@host:5671/vh?max_priority=20&heartbeat=30&connect_timeout=2",
        namespace="ns",
        config=QueueConfig(),
    )
    assert broker.max_priority == 20
    assert broker.connect_timeout_seconds == 2.0
    assert broker.url == "amqps://u:secret@host:5671/vh?heartbeat=30"
    with pytest.raises(ConfigurationError, match="max_priority"):
        RabbitMQBroker.from_url("amqp://h/?max_priority=0", namespace="ns", config=QueueConfig())
    with pytest.raises(ConfigurationError, match="bad parameter"):
        RabbitMQBroker.from_url("amqp://h/?max_priority=x", namespace="ns", config=QueueConfig())


def test_the_app_wants_a_result_storage(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="storage_url=") as info:
        QueueTasks("x", broker_url="amqp://guest:secret@localhost/")
    assert "secret" not in str(info.value)
    assert "redis://" in str(info.value)
    assert "sqlite:///" in str(info.value)
    app = QueueTasks(
        "x", broker_url="amqp://localhost/", storage_url=f"sqlite:///{tmp_path / 'r.db'}"
    )
    assert isinstance(app.broker, RabbitMQBroker)
    assert isinstance(app.storage, SqliteStorage)
    assert isinstance(app.global_config, SqliteGlobalConfig), "global config follows storage"


# -- against the server ----------------------------------------------------------------------

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def rabbitmq_url() -> str:
    parts = urlsplit(RABBITMQ_URL)
    require_server("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    return RABBITMQ_URL


MakeApp = Callable[..., QueueTasks]


@pytest.fixture
async def make_app(tmp_path: Path, rabbitmq_url: str) -> AsyncIterator[MakeApp]:
    """Apps on RabbitMQ (a fresh namespace each) with SQLite results; queues deleted after."""
    apps: list[QueueTasks] = []

    def build(**config: Any) -> QueueTasks:
        name = f"qtasks-it-{uuid.uuid4().hex[:10]}"
        app = QueueTasks(
            name,
            broker_url=rabbitmq_url,
            storage_url=f"sqlite:///{tmp_path / (name + '.sqlite3')}",
            config=QueueConfig(**{**FAST, **config}),
        )
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.stop()
        janitor = RabbitMQBroker.from_url(rabbitmq_url, namespace=app.name, config=QueueConfig())
        await janitor.start()
        broker = app.broker
        assert isinstance(broker, RabbitMQBroker)
        await janitor.delete_queues(sorted(broker.declared_queues | {"default"}))
        await janitor.stop()


async def test_a_worker_runs_priorities_retries_delays_and_survives_poison(
    make_app: MakeApp,
) -> None:
    app = make_app(max_tasks_process=1, prefetch=0, default_retry_backoff_seconds=0.1)
    order: list[str] = []
    attempts: collections.Counter[str] = collections.Counter()

    @app.task
    async def record(label: str) -> str:
        order.append(label)
        return label

    @app.task(retry=3, retry_backoff=0.2)
    async def flaky(label: str) -> str:
        attempts[label] += 1
        if attempts[label] < 3:
            raise Retry("not yet")
        return f"{label} after {attempts[label]}"

    await app.start()
    low = [await app.add_task("record", f"low{i}", priority=5) for i in range(5)]
    urgent = await app.add_task("record", "urgent", priority=-3)
    retried = await app.add_task("flaky", "f")
    later = await app.add_task("record", "later", delay=0.6)
    await app.broker.publish([Envelope(str(uuid.uuid4()), "default", 0, None, 0.0, b"\xff{no")])
    assert urgent is not None
    assert retried is not None
    assert later is not None

    worker = Worker()
    await worker.start(app)
    try:
        done = await app.wait(urgent.uuid, timeout=10)
        assert done.returning == "urgent"
        final = await app.wait(retried.uuid, timeout=10)
        assert final.status == TaskStatusEnum.SUCCESS
        assert final.returning == "f after 3"
        assert final.attempts == 3
        late = await app.wait(later.uuid, timeout=10)
        assert late.started_at is not None
        assert later.eta is not None
        assert late.started_at >= later.eta, "a delayed task never starts early"
        assert late.started_at < later.eta + 1.0
        for record in low:
            assert record is not None
            assert (await app.wait(record.uuid, timeout=10)).status == TaskStatusEnum.SUCCESS
    finally:
        await worker.stop(grace_seconds=5)
    # One slot and no prefetch: RabbitMQ hands out its highest level first.
    assert order.index("urgent") == 0, order
    assert order[1:6] == [f"low{i}" for i in range(5)], "equal priorities in publish order"


async def test_poison_message_is_recorded_and_the_worker_goes_on(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    async def echo(x: int) -> int:
        return x

    await app.start()
    bad = str(uuid.uuid4())
    await app.broker.publish([Envelope(bad, "default", 0, None, time.time(), b"\x00\xffjunk")])
    good = await app.add_task("echo", 7)
    assert good is not None
    worker = Worker()
    await worker.start(app)
    try:
        assert (await app.wait(good.uuid, timeout=10)).returning == 7
        assert await app.broker.queue_sizes(["default"]) == {"default": 0}
    finally:
        await worker.stop(grace_seconds=5)


async def test_prefetch_follows_the_workers_room(make_app: MakeApp) -> None:
    app = make_app(max_tasks_process=3, prefetch=2)

    @app.task
    async def nap() -> None:
        await asyncio.sleep(0.2)

    await app.start()
    for _ in range(20):
        await app.add_task("nap")
    worker = Worker()
    await worker.start(app)
    try:
        await asyncio.sleep(0.3)
        broker = app.broker
        assert isinstance(broker, RabbitMQBroker)
        session = broker._session
        assert session is not None
        assert session.prefetch == 3 + 2, "concurrency + prefetch, no more"
        assert sum(session.held.values()) <= 5
    finally:
        await worker.stop(grace_seconds=5)


async def test_a_lost_connection_loses_nothing(make_app: MakeApp) -> None:
    app = make_app(max_tasks_process=4)
    runs: collections.Counter[int] = collections.Counter()

    @app.task
    async def work(i: int) -> int:
        runs[i] += 1
        await asyncio.sleep(0.02)
        return i

    await app.start()
    records = [await app.add_task("work", i) for i in range(60)]
    worker = Worker()
    await worker.start(app)
    try:
        while len(runs) < 15:
            await asyncio.sleep(0.01)
        broker = app.broker
        assert isinstance(broker, RabbitMQBroker)
        drop_connection(broker)
        for i, record in enumerate(records):
            assert record is not None
            final = await app.wait(record.uuid, timeout=30)
            assert final.status == TaskStatusEnum.SUCCESS
            assert final.returning == i
        # The redelivered ones were published again (to count the lost delivery), so
        # they run again from the back of the queue, after their results were stored.
        deadline = time.monotonic() + 10
        while await app.broker.queue_sizes(["default"]) != {"default": 0}:
            assert time.monotonic() < deadline, "redeliveries left in the queue"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop(grace_seconds=5)
    assert set(runs) == set(range(60)), "nothing lost"
    # Only tasks in flight at the cut may run twice (their acks were not sent).
    assert sum(runs.values()) - 60 <= 4 + QueueConfig().resolved_prefetch()
    assert await app.broker.queue_sizes(["default"]) == {"default": 0}


def envelope(body: bytes, *, eta: float | None = None, deliveries: int = 0) -> Envelope:
    return Envelope(str(uuid.uuid4()), "q", 0, eta, time.time(), body, deliveries=deliveries)


async def test_each_lost_consumer_counts_one_delivery(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message whose consumer dies with it (a worker killed by its task) comes back
    counted once more each time, so `max_deliveries` ends a crash loop; the count is
    stored in the message, so a fresh consumer sees it too."""
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"

    def new() -> RabbitMQBroker:
        return RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())

    brokers = [new() for _ in range(4)]
    for broker in brokers:
        await broker.start()
    first, second, third, fresh = brokers
    try:
        # One of them was delayed: its copies must stay due on a consumer whose clock
        # is behind (the eta is never read again once the message was due).
        await first.publish([envelope(b"x"), envelope(b"later", eta=time.time() + 0.05)])
        taken = await first.fetch(["q"], 2, 5.0)
        while len(taken) < 2:
            taken += await first.fetch(["q"], 2, 5.0)
        assert {d.body: d.delivery_count for d in taken} == {b"x": 1, b"later": 1}
        drop_connection(first)
        monkeypatch.setattr(rabbitmq_module, "time", skewed_time(-30.0))
        again = await second.fetch(["q"], 2, 5.0)
        while len(again) < 2:
            again += await second.fetch(["q"], 2, 5.0)
        assert {d.body: d.delivery_count for d in again} == {b"x": 2, b"later": 2}
        await first.ack(taken)  # stale: skipped, never sent on a new channel
        drop_connection(second)
        thrice = await third.fetch(["q"], 2, 5.0)
        while len(thrice) < 2:
            thrice += await third.fetch(["q"], 2, 5.0)
        assert {d.body: d.delivery_count for d in thrice} == {b"x": 3, b"later": 3}
        await third.stop()  # handed out, neither settled nor released: counts, like a crash
        last = await fresh.fetch(["q"], 2, 5.0)
        while len(last) < 2:
            last += await fresh.fetch(["q"], 2, 5.0)
        assert {d.body: d.delivery_count for d in last} == {b"x": 4, b"later": 4}
        await fresh.ack(last)
        assert await fresh.fetch(["q"], 2, 0.2) == []
        assert await fresh.queue_sizes(["q"]) == {"q": 0}
    finally:
        await fresh.delete_queues(["q"])
        for broker in brokers:
            await broker.stop()


async def test_a_release_does_not_count(rabbitmq_url: str) -> None:
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    mine, peer, fresh = (
        RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
        for _ in range(3)
    )
    await mine.start()
    await peer.start()
    try:
        await mine.publish([envelope(b"r")])
        (got,) = await mine.fetch(["q"], 1, 5.0)
        assert got.delivery_count == 1
        await mine.release([got])
        (back,) = await peer.fetch(["q"], 1, 5.0)
        assert (back.body, back.delivery_count) == (b"r", 1)
        drop_connection(peer)  # a crash counts: 2 from here
        (lost,) = await mine.fetch(["q"], 1, 5.0)
        assert lost.delivery_count == 2
        await mine.release([lost])
        await fresh.start()
        (kept,) = await fresh.fetch(["q"], 1, 5.0)
        assert (kept.body, kept.delivery_count) == (b"r", 2)
        await fresh.ack([kept])
        assert await fresh.fetch(["q"], 1, 0.2) == []
        assert await fresh.queue_sizes(["q"]) == {"q": 0}
    finally:
        await mine.delete_queues(["q"])
        for broker in (mine, peer, fresh):
            await broker.stop()


async def test_a_stop_gives_back_what_arrived_without_counting(rabbitmq_url: str) -> None:
    """Deliveries pushed beyond what fetch took (prefetch room) go back uncounted."""
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    mine = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    peer = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    await mine.start()
    await peer.start()
    try:
        assert await mine.fetch(["q"], 10, 0.05) == []  # consuming, with room for 10
        await peer.publish([envelope(b"a"), envelope(b"b"), envelope(b"c")])
        (one,) = await mine.fetch(["q"], 1, 5.0)
        await asyncio.sleep(0.1)
        assert len(mine._buffer) == 2, "the other two arrived and wait in the buffer"
        await mine.ack([one])
        await mine.stop()
        rest = await peer.fetch(["q"], 10, 5.0)
        while len(rest) < 2:
            rest += await peer.fetch(["q"], 10, 5.0)
        assert sorted(d.body for d in rest) == sorted({b"a", b"b", b"c"} - {one.body})
        assert [d.delivery_count for d in rest] == [1, 1]
        await peer.ack(rest)
    finally:
        await peer.delete_queues(["q"])
        await mine.stop()
        await peer.stop()


async def test_a_requeue_counts_from_the_envelope(rabbitmq_url: str) -> None:
    """A retry starts over (deliveries=0); a deferral keeps the count it carries."""
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    await broker.start()
    try:
        await broker.publish([envelope(b"try1")])
        (first,) = await broker.fetch(["q"], 1, 5.0)
        await broker.requeue([(first, envelope(b"try2", deliveries=0))])
        (second,) = await broker.fetch(["q"], 1, 5.0)
        assert (second.body, second.delivery_count) == (b"try2", 1)
        await broker.requeue([(second, envelope(b"deferred", deliveries=3))])
        (third,) = await broker.fetch(["q"], 1, 5.0)
        assert (third.body, third.delivery_count) == (b"deferred", 4)
        await broker.ack([third])
        assert await broker.queue_sizes(["q"]) == {"q": 0}
    finally:
        await broker.delete_queues(["q"])
        await broker.stop()


async def test_another_max_priority_is_a_clear_error(rabbitmq_url: str) -> None:
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    ten = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    five = RabbitMQBroker.from_url(
        rabbitmq_url + "?max_priority=5", namespace=namespace, config=QueueConfig()
    )
    await ten.start()
    await five.start()
    try:
        await ten.publish([Envelope(str(uuid.uuid4()), "q", 0, None, time.time(), b"x")])
        with pytest.raises(ConfigurationError, match="x-max-priority=5"):
            await five.publish([Envelope(str(uuid.uuid4()), "q", 0, None, time.time(), b"y")])
        # The failed declaration cost that broker its connection; it comes back by itself.
        assert await five.fetch(["other"], 1, 0.1) == []
    finally:
        await ten.delete_queues(["q"])
        await five.delete_queues(["other"])
        await ten.stop()
        await five.stop()


async def test_unreachable_server_is_a_broker_error_after_backoff() -> None:
    broker = RabbitMQBroker(
        "amqp://guest:guest@127.0.0.1:1/", namespace="x", connect_timeout_seconds=0.5
    )
    started = time.monotonic()
    with pytest.raises(Exception, match="cannot connect to RabbitMQ") as info:
        await broker.start()
    assert type(info.value).__name__ == "BrokerError"
    assert time.monotonic() - started < 3.0


async def test_a_deleted_queue_is_consumed_again(rabbitmq_url: str) -> None:
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    janitor = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    await broker.start()
    await janitor.start()
    try:
        assert await broker.fetch(["q"], 1, 0.1) == []  # consuming now
        await janitor.delete_queues(["q"])  # RabbitMQ cancels the consumer
        await asyncio.sleep(0.1)
        await janitor.publish([Envelope(str(uuid.uuid4()), "q", 0, None, time.time(), b"back")])
        (got,) = await broker.fetch(["q"], 1, 5.0)
        assert got.body == b"back"
        await broker.ack([got])
    finally:
        await janitor.delete_queues(["q"])
        await broker.stop()
        await janitor.stop()


@pytest.mark.parametrize("skew", [30.0, -30.0])
async def test_delays_do_not_depend_on_the_consumers_clock(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """Published on a true clock, consumed (and retried) by a worker 30 s off: the bucket
    TTLs count the delay down, so it is neither early (+30 s) nor held back (-30 s)."""
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    await broker.start()
    try:
        eta = time.time() + 1.2
        await broker.publish([Envelope(str(uuid.uuid4()), "q", 0, eta, time.time(), b"d")])
        monkeypatch.setattr(rabbitmq_module, "time", skewed_time(skew))
        (got,) = await broker.fetch(["q"], 1, 5.0)
        arrived = time.time()
        assert got.body == b"d"
        assert eta <= arrived < eta + 0.5, arrived - eta
        # A retry's eta is set on the worker's (skewed) clock: its backoff is kept exactly.
        retry_eta = rabbitmq_module.time.time() + 0.6
        await broker.requeue([(got, Envelope(str(uuid.uuid4()), "q", 0, retry_eta, 0.0, b"r"))])
        requeued = time.time()
        (again,) = await broker.fetch(["q"], 1, 5.0)
        assert again.body == b"r"
        assert requeued + 0.6 <= time.time() < requeued + 1.1
        assert again.delivery_count == 1, "a retry starts its count over"
        await broker.ack([again])
        assert await broker.queue_sizes(["q"]) == {"q": 0}
    finally:
        await broker.delete_queues(["q"])
        await broker.stop()


async def test_a_message_in_the_old_format_keeps_its_eta(rabbitmq_url: str) -> None:
    """In flight across an upgrade: an absolute eta header, no rest (read on this clock)."""
    namespace = f"qtasks-it-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQBroker.from_url(rabbitmq_url, namespace=namespace, config=QueueConfig())
    await broker.start()
    try:
        assert await broker.fetch(["q"], 1, 0.05) == []  # declared and consuming
        session = broker._session
        assert session is not None
        eta = time.time() + 0.8
        headers = {
            "x-qtasks-queue": "q",
            "x-qtasks-priority": "0",
            "x-qtasks-created-us": round(time.time() * 1e6),
            "x-qtasks-deliveries": 0,
            "x-qtasks-eta-us": round(eta * 1e6),
        }
        old = aio_pika.Message(b"old", headers=headers, message_id=str(uuid.uuid4()))
        await session.publisher.default_exchange.publish(old, broker.queue_name("q"))
        (got,) = await broker.fetch(["q"], 1, 5.0)
        assert got.body == b"old"
        assert eta <= time.time() < eta + 0.5
        await broker.ack([got])
    finally:
        await broker.delete_queues(["q"])
        await broker.stop()
