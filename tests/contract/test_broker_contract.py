"""The Broker contract: every broker backend must pass these (see conftest.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from qtasks.config import QueueConfig
from qtasks.interfaces import Broker, Delivery, Storage
from qtasks.message import DeadLetter, Envelope, TaskMessage, new_uuid, record_for

from .conftest import Harness, MakeBroker


def env(
    body: bytes | str,
    *,
    queue: str = "q",
    priority: int = 0,
    eta: float | None = None,
    created_at: float | None = None,
) -> Envelope:
    """An envelope whose body is `body` (tests identify messages by body)."""
    data = body.encode() if isinstance(body, str) else body
    created = time.time() if created_at is None else created_at
    return Envelope(str(uuid.uuid4()), queue, priority, eta, created, data)


async def drain(broker: Broker, queues: list[str], max_count: int = 100) -> list[Delivery]:
    """Everything deliverable now, without acking it."""
    out: list[Delivery] = []
    while batch := await broker.fetch(queues, max_count, 0.05):
        out += batch
    return out


async def test_publish_fetch_ack(broker: Broker) -> None:
    await broker.publish([env("a"), env("b"), env("c")])
    got = await drain(broker, ["q"])
    assert sorted(d.body for d in got) == [b"a", b"b", b"c"]
    assert all(d.queue == "q" and d.delivery_count == 1 for d in got)
    await broker.ack(got)
    assert await broker.fetch(["q"], 10, 0.05) == []
    sizes = await broker.queue_sizes(["q"])
    assert sizes.get("q", 0) == 0


async def test_empty_batches_are_no_ops(broker: Broker) -> None:
    await broker.publish([])
    await broker.ack([])
    await broker.release([])
    await broker.requeue([])
    assert await broker.fetch(["q"], 10, 0) == []


async def test_fetch_times_out_on_empty_queue(broker: Broker) -> None:
    start = time.monotonic()
    assert await broker.fetch(["q"], 10, 0.2) == []
    elapsed = time.monotonic() - start
    assert 0.18 <= elapsed < 0.6


async def test_fetch_wakes_when_published(broker: Broker) -> None:
    start = time.monotonic()
    fetching = asyncio.ensure_future(broker.fetch(["q"], 10, 5.0))
    await asyncio.sleep(0.05)
    await broker.publish([env("late")])
    got = await asyncio.wait_for(fetching, 2.0)
    assert [d.body for d in got] == [b"late"]
    assert time.monotonic() - start < 1.0


async def test_priority_then_age(broker: Broker) -> None:
    base = time.time() - 100
    await broker.publish(
        [
            env("p5-old", priority=5, created_at=base),
            env("p0-new", priority=0, created_at=base + 3),
            env("p3", priority=3, created_at=base + 1),
            env("p0-old", priority=0, created_at=base + 2),
            env("p-1", priority=-1, created_at=base + 4),
        ]
    )
    got = await drain(broker, ["q"])
    assert [d.body for d in got] == [b"p-1", b"p0-old", b"p0-new", b"p3", b"p5-old"]
    assert [d.priority for d in got] == [-1, 0, 0, 3, 5]


async def test_priority_across_queues(broker: Broker, broker_harness: Harness) -> None:
    base = time.time() - 100
    await broker.publish(
        [
            env("a1", queue="a", priority=1, created_at=base),
            env("b0", queue="b", priority=0, created_at=base + 1),
            env("a0", queue="a", priority=0, created_at=base + 2),
        ]
    )
    got = await broker.fetch(["a", "b"], 2, 1.0)
    if broker_harness.priority_across_queues:
        assert [d.body for d in got] == [b"b0", b"a0"]
        assert [d.queue for d in got] == ["b", "a"]
        return
    # Documented behaviour of the others: each queue is served in priority order, and a
    # fetch orders what it hands out, but which queue fills a small batch is up to the
    # server (RabbitMQ: whichever consumer it pushed to first).
    assert len(got) == 2
    assert [d.priority for d in got] == sorted(d.priority for d in got)
    everything = got + await drain(broker, ["a", "b"])
    assert sorted(d.body for d in everything) == [b"a0", b"a1", b"b0"]
    assert [d.body for d in everything if d.queue == "a"] == [b"a0", b"a1"]


async def test_max_count(broker: Broker) -> None:
    await broker.publish([env(f"m{i}") for i in range(10)])
    first = await broker.fetch(["q"], 3, 1.0)
    assert len(first) == 3
    rest = await drain(broker, ["q"])
    assert len(rest) == 7
    assert {d.body for d in first}.isdisjoint(d.body for d in rest)


async def test_delayed_not_before_eta(broker: Broker) -> None:
    eta = time.time() + 0.3
    await broker.publish([env("later", eta=eta), env("now"), env("past", eta=time.time() - 5)])
    got = await drain(broker, ["q"])
    assert sorted(d.body for d in got) == [b"now", b"past"]
    assert await broker.fetch(["q"], 10, 0.05) == []
    got = await broker.fetch(["q"], 10, 2.0)
    assert time.time() >= eta
    assert time.time() < eta + 0.5
    assert [d.body for d in got] == [b"later"]


async def test_release_gives_back_unchanged(broker: Broker, peer_broker: Broker) -> None:
    await broker.publish([env("r")])
    (first,) = await broker.fetch(["q"], 10, 1.0)
    assert first.delivery_count == 1
    await broker.release([first])
    (again,) = await peer_broker.fetch(["q"], 10, 1.0)
    assert again.body == b"r"
    assert again.delivery_count == 1  # a give-back is not a delivery (RabbitMQ too)


async def test_requeue_replaces_body_and_eta(broker: Broker) -> None:
    await broker.publish([env("try1")])
    (first,) = await broker.fetch(["q"], 10, 1.0)
    eta = time.time() + 0.2
    await broker.requeue([(first, env("try2", eta=eta, priority=2))])
    assert await broker.fetch(["q"], 10, 0.05) == []
    (second,) = await broker.fetch(["q"], 10, 2.0)
    assert time.time() >= eta
    assert second.body == b"try2"
    assert second.priority == 2
    assert second.delivery_count == 1  # a retry is a new attempt: its count starts over
    await broker.ack([second])
    assert await broker.fetch(["q"], 10, 0.05) == []


async def test_claimed_not_given_to_another_consumer(broker: Broker, peer_broker: Broker) -> None:
    await broker.publish([env("one"), env("two")])
    (mine,) = await broker.fetch(["q"], 1, 1.0)
    theirs = await peer_broker.fetch(["q"], 10, 0.1)
    assert [d.body for d in theirs] == [b"two" if mine.body == b"one" else b"one"]
    assert await peer_broker.fetch(["q"], 10, 0.05) == []


async def test_concurrent_fetchers_never_share(broker: Broker, peer_broker: Broker) -> None:
    total = 1000
    await broker.publish([env(str(i)) for i in range(total)])
    taken = 0

    async def consume(b: Broker, max_count: int) -> list[bytes]:
        # Both keep fetching until everything was taken (or nothing came for a second):
        # a consumer that stopped early could hold prefetched messages the other waits for.
        nonlocal taken
        bodies: list[bytes] = []
        idle_since = time.monotonic()
        while taken < total and time.monotonic() - idle_since < 1.0:
            batch = await b.fetch(["q"], max_count, 0.05)
            if batch:
                idle_since = time.monotonic()
            taken += len(batch)
            bodies += [d.body for d in batch]
            await b.ack(batch)
        return bodies

    one, two = await asyncio.gather(consume(broker, 37), consume(peer_broker, 50))
    assert len(one) + len(two) == total
    assert set(one) | set(two) == {str(i).encode() for i in range(total)}


async def test_stop_returns_claimed(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.publish([env("s1"), env("s2"), env("s3")])
    got = await broker.fetch(["q"], 2, 1.0)
    assert len(got) == 2
    await broker.stop()
    await broker.start()
    again = await drain(broker, ["q"])
    assert sorted(d.body for d in again) == [b"s1", b"s2", b"s3"]


async def test_queue_isolation(broker: Broker) -> None:
    await broker.publish([env("in-a", queue="a")])
    assert await broker.fetch(["b"], 10, 0.05) == []
    got = await broker.fetch(["a"], 10, 1.0)
    assert [(d.body, d.queue) for d in got] == [(b"in-a", "a")]


async def test_queue_sizes_count_ready_delayed_and_claimed(broker: Broker) -> None:
    await broker.publish(
        [env("1"), env("2"), env("3", eta=time.time() + 60), env("4", queue="other")]
    )
    await broker.fetch(["q"], 1, 1.0)
    assert await broker.queue_sizes(["q", "other", "empty"]) == {"q": 3, "other": 1, "empty": 0}


async def test_enqueue_stores_record_and_message(
    broker: Broker, broker_harness: Harness, started: Any, qconfig: QueueConfig
) -> None:
    storage: Storage = await started.start(broker_harness.storage(qconfig))
    message = TaskMessage(uuid=new_uuid(), name="job", created_at=time.time())
    record = record_for(message)
    envelope = Envelope(str(message.uuid), "q", 0, None, message.created_at, b"enqueued")
    await broker.enqueue(storage, [record], [envelope])
    assert await storage.get(str(message.uuid)) == record
    assert [d.body for d in await broker.fetch(["q"], 10, 1.0)] == [b"enqueued"]


async def test_messages_of_a_dead_consumer_come_back(
    make_broker: MakeBroker, broker_harness: Harness, started: Any, qconfig: QueueConfig
) -> None:
    first = await make_broker()
    await first.publish([env("d1"), env("d2"), env("d3")])
    taken = await first.fetch(["q"], 2, 5.0)
    assert len(taken) == 2
    second: Broker = await started.start(await broker_harness.kill(first, qconfig))
    bodies: list[bytes] = []
    deadline = time.monotonic() + 30.0
    while len(bodies) < 3 and time.monotonic() < deadline:
        batch = await second.fetch(["q"], 10, 1.0)
        bodies += [d.body for d in batch]
        await second.ack(batch)
    assert sorted(bodies) == [b"d1", b"d2", b"d3"], "nothing lost, nothing twice"
    assert await second.fetch(["q"], 10, 0.2) == []


async def test_arbitrary_bytes_round_trip(broker: Broker) -> None:
    # Undecodable payloads are the worker's to record as errors; the broker only has to
    # move them unchanged (NUL bytes, invalid UTF-8, every byte value, a larger body).
    bodies = [b"", b"\x00\xff\xfe not utf-8 \xc3\x28", bytes(range(256)), b"x" * 200_000]
    await broker.publish([env(b) for b in bodies])
    got = await drain(broker, ["q"])
    assert sorted(d.body for d in got) == sorted(bodies)
    await broker.ack(got)


async def test_settling_twice_is_harmless(broker: Broker) -> None:
    # A writer that retries a batch after an error may ack or release a delivery again.
    await broker.publish([env("once"), env("other")])
    got = await broker.fetch(["q"], 1, 1.0)
    await broker.ack(got)
    await broker.ack(got)
    other = b"other" if got[0].body == b"once" else b"once"
    rest = await drain(broker, ["q"])
    assert [d.body for d in rest] == [other]
    await broker.release(rest)
    await broker.release(rest)
    again = await drain(broker, ["q"])
    assert [d.body for d in again] == [other]
    await broker.ack(again)
    assert await broker.fetch(["q"], 10, 0.05) == []


# -- dead letters ----------------------------------------------------------------------


def letter_for(d: Delivery, reason: str = "failed", **fields: Any) -> DeadLetter:
    """The dead letter the worker would write for delivery `d`."""
    return DeadLetter(
        uuid=fields.pop("uuid", str(uuid.uuid4())),
        queue=d.queue,
        reason=reason,
        body=d.body,
        name=fields.pop("name", "job"),
        detail=fields.pop("detail", "ValueError: boom"),
        priority=d.priority,
        delivery_count=d.delivery_count,
        created_at=d.created_at,
        dead_at=fields.pop("dead_at", time.time()),
    )


async def test_dead_letter_settles_and_keeps_the_message(broker: Broker) -> None:
    await broker.publish([env("poison"), env("fine")])
    got = await drain(broker, ["q"])
    poison = next(d for d in got if d.body == b"poison")
    fine = next(d for d in got if d.body == b"fine")
    letter = letter_for(poison, "invalid_json", detail="bad JSON at byte 0")
    await broker.dead_letter([(poison, letter)])
    await broker.ack([fine])
    assert await broker.fetch(["q"], 10, 0.1) == [], "a dead letter is not delivered again"
    (kept,) = await broker.dead_letters(["q"])
    assert kept == letter, "every field round-trips, the body byte for byte"
    (stats,) = await broker.queue_stats(["q"])
    assert stats.dead_lettered in (None, 1)
    assert (await broker.queue_sizes(["q"])).get("q", 0) == 0, "dead letters are not queued"


async def test_dead_letters_newest_first_limit_and_uuids(broker: Broker) -> None:
    await broker.publish([env(f"m{i}") for i in range(5)])
    got = await drain(broker, ["q"])
    assert len(got) == 5
    base = time.time() - 10
    letters = [letter_for(d, dead_at=base + i) for i, d in enumerate(got)]
    await broker.dead_letter(list(zip(got, letters, strict=True)))
    listed = await broker.dead_letters(["q"], limit=3)
    assert [x.uuid for x in listed] == [x.uuid for x in reversed(letters)][:3]
    chosen = [letters[0].uuid, letters[3].uuid]
    assert {x.uuid for x in await broker.dead_letters(["q"], uuids=chosen)} == set(chosen)
    assert await broker.dead_letters(["q"], uuids=[str(uuid.uuid4())]) == []


async def test_drop_dead_letters(broker: Broker) -> None:
    await broker.publish([env("a"), env("b"), env("c"), env("x", queue="other")])
    got = await drain(broker, ["q", "other"])
    letters = [letter_for(d) for d in got]
    await broker.dead_letter(list(zip(got, letters, strict=True)))
    in_q = [x for x in letters if x.queue == "q"]
    dropped = await broker.drop_dead_letters(["q"], [in_q[0].uuid, str(uuid.uuid4())])
    assert dropped == [in_q[0].uuid]
    assert {x.uuid for x in await broker.dead_letters(["q"])} == {x.uuid for x in in_q[1:]}
    assert sorted(await broker.drop_dead_letters(["q"])) == sorted(x.uuid for x in in_q[1:])
    assert await broker.dead_letters(["q"]) == []
    (other,) = await broker.dead_letters(["other"])
    assert other.body == b"x", "queues keep their dead letters apart"


async def test_dead_letters_outlive_the_consumer(
    make_broker: MakeBroker, broker_harness: Harness, started: Any, qconfig: QueueConfig
) -> None:
    first = await make_broker()
    await first.publish([env(b"\xff\x00 raw")])
    (d,) = await first.fetch(["q"], 10, 2.0)
    letter = letter_for(d, "not_utf8")
    await first.dead_letter([(d, letter)])
    # A crashed consumer's claims come back; its dead letters must not.
    second: Broker = await started.start(await broker_harness.kill(first, qconfig))
    assert await second.fetch(["q"], 10, 1.5) == []
    assert [x.body for x in await second.dead_letters(["q"])] == [b"\xff\x00 raw"]


async def test_drop_dead_letters_spares_newer_ones(broker: Broker) -> None:
    # A retried message that failed again at once has a newer letter under its uuid: the
    # retry's clean-up (dead_at_most = the old letter's time) must leave it.
    await broker.publish([env("old"), env("other")])
    got = await drain(broker, ["q"])
    now = time.time()
    old = next(d for d in got if d.body == b"old")
    other = next(d for d in got if d.body == b"other")
    letters = [letter_for(old, dead_at=now - 5), letter_for(other, dead_at=now - 1)]
    await broker.dead_letter(list(zip([old, other], letters, strict=True)))
    assert await broker.drop_dead_letters(["q"], [letters[1].uuid], now - 3) == []
    assert await broker.drop_dead_letters(["q"], None, now - 3) == [letters[0].uuid]
    assert [x.uuid for x in await broker.dead_letters(["q"])] == [letters[1].uuid]


# -- operator actions: purge, discard (cancel), queue detail ---------------------------------


async def test_purge_drops_ready_and_delayed_but_not_claimed(
    broker: Broker, broker_harness: Harness
) -> None:
    envs = [env("r1"), env("r2"), env("later", eta=time.time() + 60), env("keep", queue="o")]
    await broker.publish(envs)
    (claimed,) = await broker.fetch(["q"], 1, 1.0)
    if not broker_harness.removes_queued:
        # Documented: the broker cannot take messages off its queues; it says so.
        with pytest.raises(NotImplementedError, match="cannot purge"):
            await broker.purge(["q"])
        return
    dropped = await broker.purge(["q"])
    by_body = {e.body: e.uuid for e in envs}
    expected = {by_body[b"r1"], by_body[b"r2"], by_body[b"later"]} - {by_body[claimed.body]}
    assert set(dropped) == expected
    assert await broker.fetch(["q"], 10, 0.1) == []
    await broker.ack([claimed])
    assert [d.body for d in await broker.fetch(["o"], 10, 1.0)] == [b"keep"]


async def test_discard_removes_only_unclaimed_messages(
    broker: Broker, broker_harness: Harness
) -> None:
    first, second, later = env("first"), env("second"), env("later", eta=time.time() + 60)
    await broker.publish([first, second, later])
    (claimed,) = await broker.fetch(["q"], 1, 1.0)
    other = second if claimed.body == b"first" else first
    mine = first if claimed.body == b"first" else second
    wanted = [other.uuid, later.uuid, mine.uuid, str(uuid.uuid4())]
    if not broker_harness.removes_queued:
        with pytest.raises(NotImplementedError, match="cannot remove"):
            await broker.discard(wanted, ["q"])
        return
    removed = await broker.discard(wanted, ["q"])
    assert sorted(removed) == sorted([other.uuid, later.uuid]), "a claimed one is left alone"
    assert await broker.fetch(["q"], 10, 0.1) == []
    await broker.ack([claimed])


async def test_queue_stats_split_when_reported(broker: Broker) -> None:
    base = time.time() - 10
    await broker.publish(
        [
            env("a", priority=1, created_at=base),
            env("b", priority=1, created_at=base + 1),
            env("c", priority=5, created_at=base + 2),
            env("d", eta=time.time() + 60),
        ]
    )
    (claimed,) = await broker.fetch(["q"], 1, 1.0)
    assert claimed.body == b"a"
    (stats,) = await broker.queue_stats(["q"])
    assert stats.total == 4
    if stats.ready is not None:
        assert (stats.ready, stats.delayed, stats.in_flight) == (2, 1, 1)
    if stats.by_priority is not None:
        assert stats.by_priority == {1: 1, 5: 1}
    await broker.ack([claimed])
