"""The Kafka broker against tansu: group members, offsets, bands, delays and a worker.

The rules every broker shares are in tests/contract/; here is what is Kafka's own:
partitions shared by the members of one group, commits up to the lowest unfinished
offset, weighted priority bands and delays through the delay topics.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from qtasks import ConfigurationError, QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers.kafka import KafkaBroker
from qtasks.errors import Retry
from qtasks.interfaces import Delivery
from qtasks.message import Envelope
from qtasks.runtime.worker import Worker

from ..kafka_server import kafka_url

pytestmark = pytest.mark.kafka


def env(body: str, *, queue: str = "q", priority: int = 0, eta: float | None = None) -> Envelope:
    return Envelope(str(uuid.uuid4()), queue, priority, eta, time.time(), body.encode())


MakeBroker = Callable[..., KafkaBroker]


@pytest.fixture
async def make_broker() -> AsyncIterator[Callable[..., Any]]:
    """`await make_broker(namespace, **url_params)`: started brokers, stopped at teardown."""
    brokers: list[KafkaBroker] = []

    async def make(namespace: str, **params: Any) -> KafkaBroker:
        params.setdefault("queues", "q")
        broker = KafkaBroker.from_url(
            kafka_url(**params), namespace=namespace, config=QueueConfig()
        )
        brokers.append(broker)
        await broker.start()
        return broker

    yield make
    for broker in reversed(brokers):
        await broker.stop()


def namespace() -> str:
    return f"qtasks-it-{uuid.uuid4().hex[:10]}"


async def take_all(broker: KafkaBroker, count: int, timeout: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += await broker.fetch(["q"], count - len(got), 0.5)
    return got


def test_url_parameters_and_names() -> None:
    broker = KafkaBroker.from_url(
        "kafka://h1:9092,h2:9092?partitions=3&queues=a,b&session_timeout_ms=6000",
        namespace="app",
        config=QueueConfig(),
    )
    assert broker.bootstrap_servers == "h1:9092,h2:9092"
    assert (broker.partitions, broker.eager_queues) == (3, ["a", "b"])
    assert broker.session_timeout_ms == 6000
    assert broker.group_id == "qtasks.app"
    assert [broker.band_of(p) for p in (-9, -1, 0, 1, 9)] == [0, 0, 1, 2, 2]
    assert broker.band_topic("q", 1) == "app.q.b1"
    assert broker.delay_topic("q", 4) == "app.q.delay.4"
    with pytest.raises(ConfigurationError, match="unknown Kafka URL parameter"):
        KafkaBroker.from_url("kafka://h:1?partitons=3", namespace="app", config=QueueConfig())
    with pytest.raises(ConfigurationError, match="namespace"):
        KafkaBroker.from_url("kafka://h:1", namespace="my app", config=QueueConfig())


def test_the_app_wants_a_result_storage() -> None:
    with pytest.raises(ConfigurationError, match="storage_url="):
        QueueTasks("x", broker_url="kafka://localhost:9092")


async def test_commits_stop_at_the_lowest_unfinished_offset(make_broker: Any) -> None:
    ns = namespace()
    broker = await make_broker(ns, partitions=1)
    await broker.publish([env("m0"), env("m1"), env("m2")])
    got = sorted(await take_all(broker, 3), key=lambda d: d.receipt.offset)
    assert [d.body for d in got] == [b"m0", b"m1", b"m2"]
    await broker.ack(got[1:])  # finished out of order: m0 still runs
    assert await broker.queue_sizes(["q"]) == {"q": 3}, "the commit waits for m0"
    await broker.ack(got[:1])
    assert await broker.queue_sizes(["q"]) == {"q": 0}


async def test_a_dead_member_redelivers_from_its_lowest_unfinished_offset(
    make_broker: Any,
) -> None:
    ns = namespace()
    first = await make_broker(ns, partitions=1)
    await first.publish([env(f"m{i}") for i in range(5)])
    got = sorted(await take_all(first, 5), key=lambda d: d.receipt.offset)
    await first.ack([got[0], got[2], got[4]])  # m1 and m3 unfinished
    # Stop without committing more or leaving cleanly is what a crash does; the
    # contract suite covers a plain stop. Here: the member's process is gone.
    poller = first._poller
    assert poller is not None
    poller.cancel()
    await asyncio.gather(poller, return_exceptions=True)
    first._poller = None
    first._owned.clear()
    await first._consumer.stop()
    first._consumer = None
    second = await make_broker(ns, partitions=1)
    again = await take_all(second, 4)
    # From m1 on: m1 and m3 were never finished; m2 and m4 run again (documented).
    assert sorted(d.body for d in again) == [b"m1", b"m2", b"m3", b"m4"]


async def test_members_share_partitions_and_a_rebalance_loses_nothing(make_broker: Any) -> None:
    ns = namespace()
    one = await make_broker(ns, partitions=4)
    await one.publish([env(f"a{i}") for i in range(40)])
    held = await take_all(one, 10)  # running on `one` while `two` joins
    two_task = asyncio.ensure_future(make_broker(ns, partitions=4))
    seen_one: list[bytes] = [d.body for d in held]
    seen_two: list[bytes] = []
    while not two_task.done():
        batch = await one.fetch(["q"], 5, 0.2)
        seen_one += [d.body for d in batch]
        await one.ack(batch)
    two = await two_task
    await one.ack(held)  # acks of partitions that moved are no-ops: `two` runs them again
    assert await two.wait_assigned(10)
    assert one._owned, "both members own partitions"
    assert two._owned, "both members own partitions"
    assert not set(one._owned) & set(two._owned)
    await one.publish([env(f"b{i}") for i in range(60)])

    async def drain(broker: KafkaBroker, into: list[bytes]) -> None:
        idle = 0
        while idle < 3:
            batch = await broker.fetch(["q"], 7, 0.3)
            idle = 0 if batch else idle + 1
            into += [d.body for d in batch]
            await broker.ack(batch)

    await asyncio.gather(drain(one, seen_one), drain(two, seen_two))
    everything = set(seen_one) | set(seen_two)
    assert everything == {f"a{i}".encode() for i in range(40)} | {
        f"b{i}".encode() for i in range(60)
    }, "nothing lost across the rebalance"
    later_one = [b for b in seen_one if b.startswith(b"b")]
    later_two = [b for b in seen_two if b.startswith(b"b")]
    assert later_one, "both members took part"
    assert later_two, "both members took part"
    assert not set(later_one) & set(later_two), "in the normal path no message goes to both"
    assert sorted(later_one + later_two) == sorted(f"b{i}".encode() for i in range(60))


async def test_lower_bands_keep_their_weighted_share(make_broker: Any) -> None:
    broker = await make_broker(namespace(), partitions=1)
    await broker.publish([env(f"hi{i}", priority=-1) for i in range(100)])
    await broker.publish([env(f"lo{i}", priority=5) for i in range(100)])
    await asyncio.sleep(0.3)  # let both bands arrive before choosing
    first = await broker.fetch(["q"], 50, 2.0)
    bands = collections.Counter(d.priority for d in first)
    # Weights 4 (band 0) and 1 (band 2) with both waiting: band 2 keeps 1/5 of a batch.
    assert bands[5] == 10, bands
    assert bands[-1] == 40, bands
    assert [d.priority for d in first] == sorted(d.priority for d in first)


async def test_a_delay_is_kept_to_the_millisecond_side(make_broker: Any) -> None:
    broker = await make_broker(namespace(), partitions=1)
    eta = time.time() + 1.5
    await broker.publish([env("later", eta=eta), env("now")])
    (now,) = await take_all(broker, 1)
    assert now.body == b"now"
    (later,) = await take_all(broker, 1, timeout=5.0)
    arrived = time.time()
    assert later.body == b"later"
    assert eta <= arrived < eta + 0.5
    await broker.ack([now, later])
    assert await broker.queue_sizes(["q"]) == {"q": 0}, "every hop committed"


async def test_a_worker_runs_retries_and_survives_poison(tmp_path: Path) -> None:
    name = namespace()
    app = QueueTasks(
        name,
        broker_url=kafka_url(partitions=2),
        storage_url=f"sqlite:///{tmp_path / 'results.sqlite3'}",
        config=QueueConfig(default_retry_backoff_seconds=0.1),
    )
    attempts: collections.Counter[str] = collections.Counter()

    @app.task(retry=3, retry_backoff=0.2)
    async def flaky(label: str) -> str:
        attempts[label] += 1
        if attempts[label] < 3:
            raise Retry("not yet")
        return f"{label} after {attempts[label]}"

    @app.task
    async def square(x: int) -> int:
        return x * x

    try:
        await app.start()
        await app.broker.publish([Envelope(str(uuid.uuid4()), "default", 0, None, 0.0, b"\xff")])
        retried = await app.add_task("flaky", "f")
        squares = [await app.add_task("square", i) for i in range(50)]
        worker = Worker()
        await worker.start(app)
        try:
            assert retried is not None
            final = await app.wait(retried.uuid, timeout=30)
            assert (final.status, final.returning, final.attempts) == (
                TaskStatusEnum.SUCCESS,
                "f after 3",
                3,
            )
            for i, record in enumerate(squares):
                assert record is not None
                assert (await app.wait(record.uuid, timeout=30)).returning == i * i
        finally:
            await worker.stop(grace_seconds=5)
        assert await app.broker.queue_sizes(["default"]) == {"default": 0}
    finally:
        await app.stop()
