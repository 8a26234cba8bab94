"""The Kafka broker against tansu: group members, offsets, bands, delays and a worker.

The rules every broker shares are in tests/contract/; here is what is Kafka's own:
partitions shared by the members of one group, commits up to the lowest unfinished
offset, weighted priority bands and delays through the delay topics.
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

import msgspec
import pytest

from qtasks import ConfigurationError, QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers import kafka as kafka_module
from qtasks.brokers.kafka import KafkaBroker
from qtasks.errors import Retry
from qtasks.interfaces import Delivery
from qtasks.message import Envelope
from qtasks.runtime.worker import Worker

from ..kafka_server import crash_member, kafka_url

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


crash = crash_member


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
    await crash(first)
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


def skewed_time(seconds: float) -> types.SimpleNamespace:
    """A stand-in for the `time` module whose wall clock is `seconds` off (monotonic is not)."""
    return types.SimpleNamespace(
        time=lambda: time.time() + seconds, monotonic=time.monotonic, sleep=time.sleep
    )


async def test_long_waits_are_sent_on_after_a_quarter_with_what_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No server: a record of a long-wait delay topic is held a quarter of the wait, then
    produced again with the rest of the wait (so a crash costs at most that quarter)."""
    broker = KafkaBroker("127.0.0.1:1", namespace="app")
    sent: list[Any] = []

    async def produce(items: list[Any]) -> list[None]:
        sent.extend(items)
        return [None] * len(items)

    monkeypatch.setattr(broker, "_produce", produce)
    tp = kafka_module.TopicPartition("app.q.delay.12", 0)
    part = kafka_module._Partition(tp)
    record = types.SimpleNamespace(
        offset=7, value=b"x", timestamp=0, headers=[("qtasks-rest-us", b"250")]
    )
    part.hold(7)
    broker._take_in(part, kafka_module._Topic("q", None, 12), record)
    (held,) = broker._held[tp]
    wait = 4**12 / 1000  # about 4.7 hours
    assert held.due - held.checkpoint == pytest.approx(wait * 3 / 4)
    assert held.rest_us == 250
    held.checkpoint = time.monotonic()  # pretend a quarter has passed
    await broker._forward_due()
    (item,) = sent
    left = item.wait_us - 250
    assert wait * 3 / 4 * 1e6 - 0.1e6 <= left <= wait * 1e6, "the rest of the wait, never less"
    assert 7 in part.done, "the old record is finished"
    # Short waits are held whole: their checkpoint is when they are due.
    short = types.SimpleNamespace(
        offset=8, value=b"y", timestamp=0, headers=[("qtasks-rest-us", b"0")]
    )
    part.hold(8)
    before = time.monotonic()
    broker._take_in(part, kafka_module._Topic("q", None, 5), short)
    (kept,) = broker._held[tp]
    assert kept.checkpoint == kept.due >= before + 1.024


@pytest.mark.parametrize("skew", [30.0, -30.0])
async def test_delays_do_not_depend_on_the_consumers_clock(
    make_broker: Any, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """Produced on a true clock, consumed (and retried) by a member 30 s off: each delay
    topic's wait is measured on the member's monotonic clock from the record's arrival, so
    the delay is neither early (+30 s) nor held back (-30 s)."""
    broker = await make_broker(namespace(), partitions=1)
    assert await broker.wait_assigned(20)
    eta = time.time() + 1.2
    await broker.publish([env("later", eta=eta)])
    monkeypatch.setattr(kafka_module, "time", skewed_time(skew))
    (later,) = await take_all(broker, 1, timeout=5.0)
    arrived = time.time()
    assert later.body == b"later"
    assert eta <= arrived < eta + 0.6, arrived - eta
    # A retry's eta is set on the worker's (skewed) clock: its backoff is kept.
    retry_eta = kafka_module.time.time() + 0.6
    await broker.requeue([(later, env("retry", eta=retry_eta))])
    requeued = time.time()
    (again,) = await take_all(broker, 1, timeout=5.0)
    assert again.body == b"retry"
    assert requeued + 0.6 <= time.time() < requeued + 1.2
    await broker.ack([again])
    assert await broker.queue_sizes(["q"]) == {"q": 0}, "every hop committed"


async def test_a_stopping_member_passes_on_what_its_delays_have_waited(
    make_broker: Any,
) -> None:
    """A held record's wait is measured on the holder's monotonic clock; leaving the
    group sends it on with what is left, so the next reader does not start it over."""
    broker = await make_broker(namespace(), partitions=1)
    assert await broker.wait_assigned(20)
    eta = time.time() + 6.0  # bucket 6 (4.096 s), then about 1.9 s
    await broker.publish([env("later", eta=eta)])
    await asyncio.sleep(3.0)
    assert sum(len(q) for q in broker._held.values()) == 1, "held here, not due yet"
    await broker._stop_consumer()
    stopped = time.time()
    await broker._subscribe(["q"])
    assert await broker.wait_assigned(20)
    joined = time.time()
    (later,) = await take_all(broker, 1, timeout=20.0)
    arrived = time.time()
    assert later.body == b"later"
    assert arrived >= eta, "never early"
    # What was left at the stop, from when the member read again (+ hops); starting the
    # 4 s wait over would make it about 3 s later than this.
    assert arrived < joined + (eta - stopped) + 0.8, (arrived - eta, joined - stopped)
    await broker.ack([later])
    assert await broker.queue_sizes(["q"]) == {"q": 0}


async def test_a_delayed_record_in_the_old_format_keeps_its_eta(make_broker: Any) -> None:
    """In flight across an upgrade: an absolute eta header, no rest (read on this clock)."""
    broker = await make_broker(namespace(), partitions=1)
    assert await broker.wait_assigned(20)
    eta = time.time() + 0.8
    headers = [
        ("qtasks-queue", b"q"),
        ("qtasks-priority", b"0"),
        ("qtasks-created-us", str(round(time.time() * 1e6)).encode()),
        ("qtasks-deliveries", b"0"),
        ("qtasks-uuid", str(uuid.uuid4()).encode()),
        ("qtasks-eta-us", str(round(eta * 1e6)).encode()),
    ]
    producer = broker._producer
    await (await producer.send(broker.delay_topic("q", 3), value=b"old", headers=headers))
    (got,) = await take_all(broker, 1, timeout=5.0)
    assert got.body == b"old"
    assert eta <= time.time() < eta + 0.6
    await broker.ack([got])
    assert await broker.queue_sizes(["q"]) == {"q": 0}


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


async def test_a_crash_counts_a_delivery_and_a_release_does_not(make_broker: Any) -> None:
    """Kafka keeps no delivery count: the handed mark a member persists before handing a
    record out lets the next owner count the crash replay (issue 7: no crash loops)."""
    ns = namespace()
    first = await make_broker(ns, partitions=1)
    await first.publish([env("poison"), env("kept")])
    got = sorted(await take_all(first, 2), key=lambda d: d.receipt.offset)
    assert [(d.body, d.delivery_count) for d in got] == [(b"poison", 1), (b"kept", 1)]
    await first.release(got[1:])  # given back unrun: not a delivery
    (again,) = await take_all(first, 1)
    assert (again.body, again.delivery_count) == (b"kept", 1)
    await first.release([again])
    # The release is persisted with the partition's next mark: handing out an older one.
    await first.publish([msgspec.structs.replace(env("older"), created_at=1.0)])
    deadline = time.monotonic() + 10
    while sum(map(len, first._buffers)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # arrived, so it is chosen before "kept"
    (older,) = await take_all(first, 1)
    assert older.body == b"older"
    await first.ack([older])
    await crash(first)  # "poison" was running: its worker died with it
    second = await make_broker(ns, partitions=1)
    got = {d.body: d for d in await take_all(second, 3)}
    # "older" finished above the unfinished "poison": replayed, so counted (documented).
    counts = {body: d.delivery_count for body, d in got.items()}
    assert counts == {b"poison": 2, b"kept": 1, b"older": 2}
    await second.release([got[b"kept"]])
    (kept,) = await take_all(second, 1)
    assert kept.delivery_count == 1
    await second.ack([kept, got[b"older"]])
    await crash(second)  # and the next worker died of "poison" too
    third = await make_broker(ns, partitions=1)
    got = {d.body: d for d in await take_all(third, 3)}
    assert got[b"poison"].delivery_count == 3
    # A release then a clean stop: the next owner does not count the release either.
    await third.release([got[b"poison"]])
    await third.ack([got[b"kept"], got[b"older"]])
    await third.stop()
    fourth = await make_broker(ns, partitions=1)
    got = {d.body: d for d in await take_all(fourth, 3)}
    assert got[b"poison"].delivery_count == 3
    await fourth.ack(list(got.values()))
    assert await fourth.queue_sizes(["q"]) == {"q": 0}


async def test_requeue_starts_from_the_envelopes_deliveries(make_broker: Any) -> None:
    """A retry starts its count over (deliveries=0); a message sent back unrun keeps it."""
    broker = await make_broker(namespace(), partitions=1)
    await broker.publish([env("a"), env("b")])
    got = sorted(await take_all(broker, 2), key=lambda d: d.receipt.offset)
    retry = msgspec.structs.replace(env("retry"), deliveries=0)
    deferred = msgspec.structs.replace(env("deferred"), deliveries=3)
    await broker.requeue([(got[0], retry), (got[1], deferred)])
    again = {d.body: d.delivery_count for d in await take_all(broker, 2)}
    assert again == {b"retry": 1, b"deferred": 4}


async def test_a_replay_counts_from_the_requeued_count(make_broker: Any) -> None:
    """The header's count and the handed mark add up: deferred with 3, crash, then 5."""
    ns = namespace()
    first = await make_broker(ns, partitions=1)
    await first.publish([env("x")])
    (x,) = await take_all(first, 1)
    await first.requeue([(x, msgspec.structs.replace(env("deferred"), deliveries=3))])
    (deferred,) = await take_all(first, 1)
    assert deferred.delivery_count == 4
    await crash(first)
    second = await make_broker(ns, partitions=1)
    (replay,) = await take_all(second, 1)
    assert (replay.body, replay.delivery_count) == (b"deferred", 5)
