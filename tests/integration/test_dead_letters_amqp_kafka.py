"""Dead letters end to end on the RabbitMQ and Kafka brokers, with a real in-process worker.

A task failing for good, an unknown task and undecodable bytes are set aside by the
worker (which keeps running what comes behind them); a dead letter is retried under its
uuid and the rest dropped. Then what is each broker's own: RabbitMQ expires letters on
the server (`x-message-ttl`) and keeps them as persistent messages; Kafka keeps them as
records keyed by uuid and drops them with tombstones. Results go to SQLite in tmp_path
(these brokers keep none); each test has its own namespace, whose queues or topics are
deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest

from qtasks import QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.interfaces import Broker, Delivery
from qtasks.message import DeadLetter, Envelope
from qtasks.runtime.worker import Worker

from ..kafka_server import kafka_url
from ..servers import RABBITMQ_URL, require_server

FAST = QueueConfig(
    poll_interval_seconds=0.01,
    heartbeat_interval_seconds=0.2,
    worker_lost_after_seconds=2.0,
    sweep_interval_seconds=0.2,
    default_retry_backoff_seconds=0.01,
)
WAIT = 30.0
RAW = b"\xff\xfe not a task message"

BROKERS = [
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("kafka", marks=pytest.mark.kafka),
]


def broker_url(kind: str) -> str:
    if kind == "rabbitmq":
        parts = urlsplit(RABBITMQ_URL)
        require_server("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
        return RABBITMQ_URL
    return kafka_url(partitions=2)


@pytest.fixture(params=BROKERS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_app(kind: str, tmp_path: Path) -> AsyncIterator[Callable[..., QueueTasks]]:
    """`make_app(config=...)`: apps of one namespace; their queues/topics deleted after."""
    url = broker_url(kind)
    namespace = f"qtasks-dl-{uuid.uuid4().hex[:10]}"
    storage_url = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    apps: list[QueueTasks] = []

    def build(config: QueueConfig = FAST) -> QueueTasks:
        app = QueueTasks(namespace, broker_url=url, storage_url=storage_url, config=config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        try:
            await app.start()
            broker: Any = app.broker  # RabbitMQBroker or KafkaBroker: both can delete
            await broker.delete_queues(["default", "q", "t"])
        finally:
            await app.stop()


async def letters_until(app: QueueTasks, count: int) -> list[DeadLetter]:
    """The app's dead letters once there are `count` (the record is stored just before)."""
    deadline = time.monotonic() + WAIT
    while True:
        letters = await app.dead_letters()
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.05)


async def total_until_zero(broker: Broker, queue: str) -> int:
    """The queue's total once it is 0 (Kafka commits right after the acks), or at WAIT."""
    deadline = time.monotonic() + WAIT
    while True:
        (stats,) = await broker.queue_stats([queue])
        if stats.total == 0 or time.monotonic() > deadline:
            return stats.total
        await asyncio.sleep(0.05)


async def take(broker: Broker, count: int) -> list[Delivery]:
    """`count` deliveries of queue "q" (a Kafka consumer first joins its group)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        got += await broker.fetch(["q"], count - len(got), 1.0)
    assert len(got) == count
    return got


def envelope(body: bytes, queue: str = "q") -> Envelope:
    return Envelope(str(uuid.uuid4()), queue, 0, None, time.time(), body)


async def test_worker_dead_letters_then_retry_and_drop(
    kind: str, make_app: Callable[..., QueueTasks]
) -> None:
    app = make_app()
    runs: list[int] = []
    healed = {"now": False}

    @app.task(retry=2, retry_backoff=0.01)
    async def flaky(n: int) -> int:
        runs.append(n)
        if not healed["now"]:
            raise ValueError(f"boom {n}")
        return n * 2

    @app.task
    async def fine(n: int) -> int:
        return n + 100

    await app.start()
    failing = await flaky.add_task(7)
    unknown = await app.add_task("nope")
    assert failing is not None
    assert unknown is not None
    # Straight through the broker, as a foreign producer would; valid tasks come behind it.
    await app.broker.publish([envelope(RAW, "default")])
    behind = [await fine.add_task(i) for i in range(3)]

    worker = Worker(concurrency=1)
    await worker.start(app)
    try:
        for i, record in enumerate(behind):
            done = await app.wait(record.uuid, WAIT)
            assert (done.status, done.returning) == (TaskStatusEnum.SUCCESS, i + 100)
        failed = await app.wait(failing.uuid, WAIT)
        assert failed.status is TaskStatusEnum.ERROR
        lost = await app.wait(unknown.uuid, WAIT)
        assert (lost.status, lost.error_type) == (TaskStatusEnum.ERROR, "UnknownTask")

        letters = await letters_until(app, 3)
        assert len(letters) == 3, letters
        assert [x.dead_at for x in letters] == sorted((x.dead_at for x in letters), reverse=True)
        by_uuid = {x.uuid: x for x in letters}
        poison = by_uuid[str(failing.uuid)]
        assert runs == [7, 7, 7], "the first run and two retries, then set aside"
        assert (poison.reason, poison.name, poison.queue) == ("failed", "flaky", "default")
        assert "ValueError: boom 7" in poison.detail
        assert "Traceback" in poison.detail
        nameless = by_uuid[str(unknown.uuid)]
        assert (nameless.reason, nameless.name) == ("unknown_task", "nope")
        (raw,) = [x for x in letters if x.body == RAW]
        assert raw.reason not in ("", "failed", "unknown_task"), raw
        assert raw.detail
        assert await app.dead_letters(uuids=[failing.uuid]) == [poison]

        assert await total_until_zero(app.broker, "default") == 0
        (stats,) = await app.broker.queue_stats(["default"])
        assert stats.dead_lettered == 3

        healed["now"] = True
        assert await app.retry_dead_letters([failing.uuid]) == [str(failing.uuid)]
        again = await app.wait(failing.uuid, WAIT)
        assert (again.status, again.returning) == (TaskStatusEnum.SUCCESS, 14)
        assert runs == [7, 7, 7, 7], "run again under the same uuid"
        assert {x.uuid for x in await app.dead_letters()} == {nameless.uuid, raw.uuid}

        assert sorted(await app.drop_dead_letters()) == sorted([nameless.uuid, raw.uuid])
        assert await app.dead_letters() == []
        assert await total_until_zero(app.broker, "default") == 0
        (stats,) = await app.broker.queue_stats(["default"])
        assert stats.dead_lettered == 0
    finally:
        await worker.stop()


async def test_expired_dead_letters_are_not_listed_and_get_removed(
    kind: str, make_app: Callable[..., QueueTasks]
) -> None:
    # An hour on the server, so only the read-side check can drop the letter dated
    # two minutes ago: reads skip it and drops remove it without reporting it.
    app = make_app(dataclasses.replace(FAST, dead_letter_ttl_seconds=60.0))
    await app.start()
    broker = app.broker
    await broker.publish([envelope(b"m0"), envelope(b"m1")])
    got = await take(broker, 2)
    now = time.time()
    old, new = (
        DeadLetter(uuid=str(uuid.uuid4()), queue="q", reason="failed", body=d.body, dead_at=t)
        for d, t in zip(got, (now - 120.0, now), strict=True)
    )
    await broker.dead_letter([(got[0], old), (got[1], new)])
    assert [x.uuid for x in await broker.dead_letters(["q"])] == [new.uuid]
    assert await broker.dead_letters(["q"], uuids=[old.uuid]) == []
    (stats,) = await broker.queue_stats(["q"])
    assert stats.dead_lettered == 1
    assert await broker.drop_dead_letters(["q"]) == [new.uuid]
    assert await broker.dead_letters(["q"]) == []


async def test_a_duplicate_letter_is_listed_once_and_the_newer_one_outlives_a_retry(
    make_app: Callable[..., QueueTasks],
) -> None:
    # A crash between storing a letter and settling its message runs the task again, and
    # it may fail again: two letters under one uuid. The newest is the one listed, and
    # a retry's clean-up (dead_at_most = the letter it retried) leaves the newer one.
    app = make_app()
    await app.start()
    broker = app.broker
    await broker.publish([envelope(b"first"), envelope(b"second")])
    got = await take(broker, 2)
    same, now = str(uuid.uuid4()), time.time()
    older = DeadLetter(uuid=same, queue="q", reason="failed", body=b"1", dead_at=now - 2)
    newer = DeadLetter(uuid=same, queue="q", reason="failed", body=b"2", dead_at=now)
    await broker.dead_letter([(got[0], older)])
    await broker.dead_letter([(got[1], newer)])
    assert await broker.dead_letters(["q"]) == [newer]
    # RabbitMQ deletes the older copy (and says so); Kafka's newer record already replaced it.
    assert await broker.drop_dead_letters(["q"], [same], now - 1) in ([], [same])
    assert await broker.dead_letters(["q"]) == [newer]
    (stats,) = await broker.queue_stats(["q"])
    assert stats.dead_lettered == 1
    assert await broker.drop_dead_letters(["q"], [same]) == [same]
    assert await broker.dead_letters(["q"]) == []


@pytest.mark.parametrize("kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_rabbitmq_letters_are_persistent_and_expire_on_the_server(
    make_app: Callable[..., QueueTasks],
) -> None:
    from qtasks.brokers.rabbitmq import RabbitMQBroker

    app = make_app()
    await app.start()
    broker = app.broker
    assert isinstance(broker, RabbitMQBroker)
    await broker.publish([envelope(b"kept"), envelope(b"")])
    got = await take(broker, 2)
    letters = [
        DeadLetter(
            uuid=str(uuid.uuid4()),
            queue="q",
            reason="empty",
            body=d.body,
            priority=-3,
            dead_at=time.time(),
        )
        for d in got
    ]
    await broker.dead_letter(list(zip(got, letters, strict=True)))
    session = broker._session
    assert session is not None
    # Peek at the raw messages: persistent, the packed letter, the uuid as message_id.
    async with broker._side_channel(session) as channel:
        dead = await channel.get_queue(broker.dead_queue_name("q"), ensure=False)
        raw = [await dead.get(no_ack=False) for _ in letters]
        for message, letter in zip(raw, letters, strict=True):
            assert message.delivery_mode == 2
            assert message.message_id == letter.uuid
            assert msgspec.msgpack.decode(message.body, type=DeadLetter) == letter
    assert sorted(await broker.dead_letters(["q"]), key=lambda x: x.body) == sorted(
        letters, key=lambda x: x.body
    ), "peeking put them back"

    # Another process configured with a short TTL: a dead queue declared with another
    # x-message-ttl is used as it is (a warning, not an error)...
    short = make_app(dataclasses.replace(FAST, dead_letter_ttl_seconds=0.5))
    await short.start()
    shorter = short.broker
    assert isinstance(shorter, RabbitMQBroker)
    (stats,) = await shorter.queue_stats(["q"])
    assert stats.dead_lettered == 2
    # ...and a new one gets it: RabbitMQ itself drops the letters (the count is the
    # server's; nothing reads them meanwhile).
    await shorter.publish([envelope(b"brief", "t")])
    (d,) = await shorter.fetch(["t"], 1, WAIT)
    letter = DeadLetter(
        uuid=str(uuid.uuid4()), queue="t", reason="failed", body=d.body, dead_at=time.time()
    )
    await shorter.dead_letter([(d, letter)])
    (stats,) = await shorter.queue_stats(["t"])
    assert stats.dead_lettered in (0, 1)
    deadline = time.monotonic() + WAIT
    while (await shorter.queue_stats(["t"]))[0].dead_lettered and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await shorter.queue_stats(["t"]))[0].dead_lettered == 0


@pytest.mark.parametrize("kind", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_rabbitmq_dead_letter_of_a_lost_connection_is_skipped(
    make_app: Callable[..., QueueTasks],
) -> None:
    # Its delivery tag means nothing on a new channel, and RabbitMQ has the message
    # back: no letter, no ack; whoever gets the message again sets it aside.
    from qtasks.brokers.rabbitmq import RabbitMQBroker

    first, second = make_app(), make_app()
    await first.start()
    await second.start()
    one, two = first.broker, second.broker
    assert isinstance(one, RabbitMQBroker)
    assert isinstance(two, RabbitMQBroker)
    await one.publish([envelope(b"poison")])
    (taken,) = await take(one, 1)
    session = one._session
    assert session is not None
    assert session.connection.transport is not None
    amqp = session.connection.transport.connection
    amqp._reader_task.cancel()  # type: ignore[attr-defined]
    amqp._writer_task.cancel()  # type: ignore[attr-defined]
    (again,) = await take(two, 1)
    assert again.body == b"poison"
    letter = DeadLetter(
        uuid=str(uuid.uuid4()), queue="q", reason="failed", body=b"poison", dead_at=time.time()
    )
    await one.dead_letter([(taken, letter)])
    assert await two.dead_letters(["q"]) == []
    await two.dead_letter([(again, letter)])
    assert await one.dead_letters(["q"]) == [letter], "the first broker reconnects to read"
    assert await two.fetch(["q"], 1, 0.2) == []


@pytest.mark.parametrize("kind", [pytest.param("kafka", marks=pytest.mark.kafka)])
async def test_kafka_letters_are_keyed_records_and_drops_are_tombstones(
    make_app: Callable[..., QueueTasks],
) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

    from qtasks.brokers.kafka import KafkaBroker

    app = make_app()
    await app.start()
    broker = app.broker
    assert isinstance(broker, KafkaBroker)
    await broker.publish([envelope(b"a"), envelope(b"")])
    got = await take(broker, 2)
    letters = [
        DeadLetter(uuid=str(uuid.uuid4()), queue="q", reason="x", body=d.body, dead_at=time.time())
        for d in got
    ]
    await broker.dead_letter(list(zip(got, letters, strict=True)))
    assert await broker.drop_dead_letters(["q"], [letters[0].uuid]) == [letters[0].uuid]
    assert await broker.dead_letters(["q"]) == [letters[1]], "an empty body is still a letter"

    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(broker.dead_topic("q"), 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[Any] = []
        deadline = time.monotonic() + WAIT
        while len(records) < 3 and time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=200)
            records += batches.get(tp, [])
    finally:
        await consumer.stop()
    assert [(r.key.decode(), r.value is None) for r in records] == [
        (letters[0].uuid, False),
        (letters[1].uuid, False),
        (letters[0].uuid, True),
    ]
