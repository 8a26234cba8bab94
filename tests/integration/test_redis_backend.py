"""Redis-specific behaviour in one process: URLs, liveness, sweeping, enqueue, pub/sub waits.

Every test uses its own namespace (app name) on the test database and deletes its keys
afterwards; nothing else on the server is touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio

from qtasks import QueueConfig, TaskCall, TaskStatusEnum
from qtasks import _redis as redis_link
from qtasks.asyncio import QueueTasks
from qtasks.brokers import redis as redis_broker_module
from qtasks.brokers.redis import RedisBroker
from qtasks.errors import BrokerError, ConfigurationError, StorageError
from qtasks.global_configs.redis import RedisGlobalConfig
from qtasks.interfaces import Delivery
from qtasks.message import Envelope, Task, TaskMessage, new_uuid, record_for
from qtasks.runtime.worker import Worker
from qtasks.storages.redis import RedisStorage
from tests.servers import REDIS_URL, require_server

pytestmark = pytest.mark.redis

FAST = QueueConfig(
    heartbeat_interval_seconds=0.05,
    worker_lost_after_seconds=0.6,
    sweep_interval_seconds=0.05,
)


def env(body: str, *, queue: str = "q", priority: int = 0, eta: float | None = None) -> Envelope:
    return Envelope(str(uuid.uuid4()), queue, priority, eta, time.time(), body.encode())


async def delete_namespace(url: str, namespace: str) -> int:
    """Delete every key of one qtasks namespace; how many there were."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"qtasks:{{{namespace}}}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
        return len(keys)
    finally:
        await client.aclose()


def require_redis() -> None:
    host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    require_server("Redis", host or "127.0.0.1", int(port or 6379))


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A fresh namespace; its keys are deleted and no link or heartbeat thread may remain."""
    require_redis()
    ns = f"it-{uuid.uuid4().hex[:12]}"
    yield ns
    await delete_namespace(REDIS_URL, ns)
    assert not [t for t in threading.enumerate() if t.name.startswith("qtasks-heartbeat")]
    assert not [k for k in redis_link._registry if k[0] == REDIS_URL], "links left open"


@pytest.fixture
async def make(namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """`await make(Cls, config=...)`: a started component, stopped at teardown."""
    parts: list[Any] = []

    async def build(cls: type[Any], *, config: QueueConfig = FAST, url: str = REDIS_URL) -> Any:
        part = cls(url, namespace=namespace, config=config)
        await part.start()
        parts.append(part)
        return part

    yield build
    for part in reversed(parts):
        await part.stop()


@pytest.fixture
async def raw() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def kill_connections(raw: Any, pid: int, *, pubsub_only: bool = False) -> int:
    """CLIENT KILL the qtasks connections of process `pid` (none of anyone else's)."""
    killed = 0
    for client in await raw.client_list():
        if client.get("name") != redis_link.client_name().replace(str(os.getpid()), str(pid)):
            continue
        if pubsub_only and "P" not in client.get("flags", ""):
            continue
        killed += await raw.execute_command("CLIENT", "KILL", "ID", client["id"])
    return killed


def count_runs(link: redis_link.RedisLink) -> Callable[[], list[list[Any]]]:
    """Record every round trip of a link (its commands); returns a getter."""
    calls: list[list[Any]] = []
    original = link.run

    async def run(commands: Any, **kwargs: Any) -> list[Any]:
        calls.append([c.name if isinstance(c, redis_link.Packed) else c[0] for c in commands])
        return await original(commands, **kwargs)

    link.run = run  # type: ignore[method-assign]
    return lambda: calls


# -- URLs, errors, lifecycle -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://localhost:6379/0", False),
        ("redis://user:secret@host:6380/3", False),
        ("rediss://host:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false", False),
        ("unix:///var/run/redis.sock?db=2", False),
        ("redis://host:7000?cluster=true", True),
        ("redis://host:7000/0?cluster=yes&socket_keepalive=true", True),
    ],
)
def test_urls(url: str, cluster: bool) -> None:
    target = redis_link.parse_url(url)
    assert target.cluster is cluster
    assert "cluster" not in target.connect_url


@pytest.mark.parametrize(
    "url",
    [
        "http://host",
        "redis://host?cluster=maybe",
        "redis://host/3?cluster=true",
        "unix:///tmp/x.sock?cluster=true",
        "redis://host:notaport",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        redis_link.parse_url(url)


def test_url_routes_to_the_redis_backend() -> None:
    app = QueueTasks("routing", broker_url="redis://:hunter2@localhost:6379/0")
    assert isinstance(app.broker, RedisBroker)
    assert isinstance(app.storage, RedisStorage)
    assert isinstance(app.global_config, RedisGlobalConfig)
    assert "hunter2" not in repr(app.broker)


async def test_unreachable_server_is_a_clear_error_without_the_password() -> None:
    broker = RedisBroker("redis://:hunter2@127.0.0.1:1/0", namespace="x")
    with pytest.raises(BrokerError) as info:
        await broker.start()
    assert "127.0.0.1:1" in str(info.value)
    assert "hunter2" not in str(info.value)
    storage = RedisStorage("redis://:hunter2@127.0.0.1:1/0", namespace="x")
    with pytest.raises(StorageError, match="not started"):
        await storage.get("x")


async def test_components_share_one_link_and_restart(make: Callable[..., Any]) -> None:
    broker = await make(RedisBroker)
    storage = await make(RedisStorage)
    assert broker.link is storage.link
    await broker.stop()
    await broker.start()
    assert broker.link is storage.link
    await broker.publish([env("again")])
    assert [d.body for d in await broker.fetch(["q"], 10, 1.0)] == [b"again"]


# -- liveness and sweeping -----------------------------------------------------------------


async def _kill(broker: RedisBroker) -> None:
    """Drop a broker as a killed process would: no heartbeat, no give-back, no goodbye."""
    heartbeat, broker._heartbeat = broker._heartbeat, None
    assert heartbeat is not None
    heartbeat.stop()
    broker._registered = False
    await redis_link.RedisComponent.stop(broker)


async def test_lost_consumer_claims_come_back_with_their_count(
    make: Callable[..., Any],
) -> None:
    first = await make(RedisBroker)
    await first.publish([env("a"), env("b")])
    taken = await first.fetch(["q"], 10, 1.0)
    assert len(taken) == 2
    await _kill(first)
    second = await make(RedisBroker)
    assert await second.fetch(["q"], 10, 0.1) == []  # not before lost_after
    start = time.monotonic()
    again = await second.fetch(["q"], 10, 3.0)
    assert sorted(d.body for d in again) == [b"a", b"b"]
    assert all(d.delivery_count == 2 for d in again), "the lost delivery still counts"
    assert time.monotonic() - start < FAST.worker_lost_after_seconds + 1.0


async def test_live_consumer_keeps_its_claims_while_its_loop_is_blocked(
    make: Callable[..., Any],
) -> None:
    owner = await make(RedisBroker)
    thief = await make(RedisBroker)
    await owner.publish([env("long")])
    (mine,) = await owner.fetch(["q"], 1, 1.0)
    # Block this event loop for 3x lost_after: only the heartbeat THREAD keeps us alive.
    time.sleep(3 * FAST.worker_lost_after_seconds)
    assert await thief.fetch(["q"], 10, 2 * FAST.worker_lost_after_seconds) == []
    await owner.ack([mine])
    assert await owner.queue_sizes(["q"]) == {"q": 0}


async def test_stop_gives_back_and_unregisters(make: Callable[..., Any], raw: Any) -> None:
    broker = await make(RedisBroker)
    await broker.publish([env("s1"), env("s2")])
    got = await broker.fetch(["q"], 10, 1.0)
    assert len(got) == 2
    keys = broker.keys
    assert await raw.zscore(keys.consumers, broker.consumer_id) is not None
    await broker.stop()
    assert await raw.zscore(keys.consumers, broker.consumer_id) is None
    assert not await raw.exists(keys.inflight(broker.consumer_id))
    other = await make(RedisBroker)
    again = await other.fetch(["q"], 10, 1.0)
    assert sorted(d.body for d in again) == [b"s1", b"s2"]
    assert all(d.delivery_count == 1 for d in again), "given back as never delivered"


async def test_cancelled_fetch_gives_claims_back(make: Callable[..., Any]) -> None:
    broker = await make(RedisBroker)
    for attempt in range(20):
        waiting = asyncio.ensure_future(broker.fetch(["q"], 10, 5.0))
        await asyncio.sleep(0.02)
        body = f"orphan-{attempt}".encode()
        await broker.publish([env(body.decode())])
        # Cancelled before, during or after its claim ran: either the fetch returned the
        # message, or a later fetch does (reconciled). Never lost, never held forever.
        waiting.cancel()
        try:
            got = await waiting
        except asyncio.CancelledError:
            got = await broker.fetch(["q"], 10, 2.0)
        assert [d.body for d in got] == [body]
        await broker.ack(got)
    assert await broker.queue_sizes(["q"]) == {"q": 0}


async def test_a_lost_claim_reply_is_reconciled(make: Callable[..., Any], raw: Any) -> None:
    broker = await make(RedisBroker)
    await broker.publish([env("x"), env("y")])
    (kept,) = await broker.fetch(["q"], 1, 1.0)
    # A claim whose reply never arrived: in Redis it is ours, in the process it is unknown.
    (lost,) = await broker.fetch(["q"], 1, 1.0)
    broker._held.discard(lost.receipt)
    broker._reconcile = True
    assert [d.body for d in await broker.fetch(["q"], 10, 1.0)] == [lost.body]
    assert await raw.hexists(broker.keys.inflight(broker.consumer_id), kept.receipt)


async def test_extreme_priorities_round_trip(make: Callable[..., Any]) -> None:
    broker = await make(RedisBroker)
    await broker.publish([env("low", priority=10**20), env("high", priority=-(10**20))])
    got = await broker.fetch(["q"], 10, 1.0)
    assert [(d.body, d.priority) for d in got] == [(b"high", -(10**20)), (b"low", 10**20)]
    await broker.release(got)
    assert [d.priority for d in await broker.fetch(["q"], 10, 1.0)] == [-(10**20), 10**20]


async def test_stop_wakes_a_blocked_fetch_at_once(make: Callable[..., Any]) -> None:
    broker = await make(RedisBroker)
    fetching = asyncio.ensure_future(broker.fetch(["q"], 10, 30.0))
    await asyncio.sleep(0.05)
    start = time.monotonic()
    await broker.stop()
    assert await fetching == []
    assert time.monotonic() - start < 1.0


# -- enqueue -------------------------------------------------------------------------------


async def test_enqueue_is_one_round_trip_and_idempotent(make: Callable[..., Any]) -> None:
    broker = await make(RedisBroker)
    storage = await make(RedisStorage)
    calls = count_runs(broker.link)
    message = TaskMessage(uuid=new_uuid(), name="job", created_at=time.time())
    record = record_for(message)
    envelope = Envelope(str(message.uuid), "q", 0, None, message.created_at, b"once")
    await broker.enqueue(storage, [record], [envelope])
    assert calls() == [["EVALSHA"]]
    await broker.enqueue(storage, [record], [envelope])  # a retried enqueue
    assert await storage.get(str(message.uuid)) == record
    assert [d.body for d in await broker.fetch(["q"], 10, 0.5)] == [b"once"]
    assert await broker.fetch(["q"], 10, 0.05) == []


async def test_enqueue_wire_format_edge_cases(make: Callable[..., Any]) -> None:
    """ENQUEUE's arguments are built as RESP by hand: lengths are bytes, bodies are opaque."""
    broker = await make(RedisBroker)
    storage = await make(RedisStorage)
    queue = "émails-ü"  # non-ASCII: its RESP length counts bytes, not characters
    body = b"\r\n$3\r\nbad\r\n*1\r\n\x00\xff"  # RESP framing inside a body is just data
    message = TaskMessage(uuid=new_uuid(), name="job", created_at=time.time())
    alone = TaskMessage(uuid=new_uuid(), name="job", created_at=time.time())
    envelope = Envelope(str(message.uuid), queue, -7, None, message.created_at, body)
    # A record without a message is stored (replacing any), and enqueues nothing.
    await broker.enqueue(storage, [record_for(message), record_for(alone)], [envelope])
    assert await storage.get(str(alone.uuid)) == record_for(alone)
    assert await storage.get(str(message.uuid)) == record_for(message)
    (delivery,) = await broker.fetch([queue], 10, 1.0)
    assert (delivery.body, delivery.priority, delivery.queue) == (body, -7, queue)
    await broker.ack([delivery])

    # publish() of more than one script call's worth is split, and all of it arrives.
    now = time.time()
    many = [
        Envelope(str(new_uuid()), "bulk", i % 3, None, now + i * 1e-6, b"%d" % i)
        for i in range(redis_broker_module.MAX_BATCH * 2 + 5)
    ]
    calls = count_runs(broker.link)
    await broker.publish(many)
    assert len(calls()) <= 3
    assert (await broker.queue_sizes(["bulk"]))["bulk"] == len(many)
    first = await broker.fetch(["bulk"], 3, 1.0)
    assert [d.body for d in first] == [b"0", b"3", b"6"], "priority, then age"


async def test_settle_stores_records_and_acks_in_one_round_trip(make: Callable[..., Any]) -> None:
    broker = await make(RedisBroker)
    storage = await make(RedisStorage)
    message = TaskMessage(uuid=new_uuid(), name="job", created_at=time.time())
    envelope = Envelope(str(message.uuid), "q", 0, None, message.created_at, b"body")
    await broker.enqueue(storage, [record_for(message)], [envelope])
    (delivery,) = await broker.fetch(["q"], 10, 1.0)
    waiting = asyncio.ensure_future(storage.wait(str(message.uuid), 5.0))
    await asyncio.sleep(0.05)
    final = msgspec.structs.replace(record_for(message), status=TaskStatusEnum.SUCCESS, returning=7)
    final.finished_at = time.time()
    calls = count_runs(broker.link)
    await broker.settle(storage, [final], [delivery])
    assert calls() == [["EVALSHA", "EVALSHA"]], "save and ack share one round trip"
    assert (await asyncio.wait_for(waiting, 2.0)).returning == 7
    assert (await broker.queue_sizes(["q"]))["q"] == 0, "acked"
    assert await broker.fetch(["q"], 10, 0.05) == []


async def test_concurrent_enqueues_are_coalesced(namespace: str) -> None:
    app = QueueTasks(namespace, broker_url=REDIS_URL)

    @app.task
    def job(i: int) -> int:
        return i

    async with app:
        calls = count_runs(app.broker.link)  # type: ignore[attr-defined]
        records = await asyncio.gather(*(job.add_task(i) for i in range(500)))
        assert len({str(r.uuid) for r in records}) == 500
        assert len(calls()) < 50, "500 calls went out in a few round trips"
        assert await app.broker.queue_sizes(["default"]) == {"default": 500}
        got = await app.get(records[123].uuid)
        assert got is not None
        assert got.args == [123]


async def test_add_tasks_bulk(namespace: str) -> None:
    app = QueueTasks(namespace, broker_url=REDIS_URL, config=dataclasses.replace(FAST))

    @app.task
    def square(x: int) -> int:
        return x * x

    async with app:
        calls = [("square", (i,)) for i in range(2500)]
        calls.append(TaskCall("square", (7,), priority=-1))
        calls.append(("square", (), {"x": 3}, {"queue": "other"}))
        records = await app.add_tasks(calls)
        assert len(records) == 2502
        sizes = await app.broker.queue_sizes(["default", "other"])
        assert sizes == {"default": 2501, "other": 1}
        first = await app.broker.fetch(["default"], 1, 1.0)
        assert msgspec.json.decode(first[0].body)["args"] == [7], "priority -1 goes first"
        await app.broker.release(first)
        with pytest.raises(TypeError):
            await app.add_tasks([("square", (1, 2))])  # bad arguments: nothing enqueued
        assert await app.broker.queue_sizes(["default"]) == {"default": 2501}
        worker = Worker(concurrency=20, queues=["default", "other"])
        await worker.start(app)
        try:
            last = await app.wait(records[2499].uuid, 30)
            assert last.returning == 2499 * 2499
            other = await app.wait(records[-1].uuid, 30)
            assert other.returning == 9
        finally:
            await worker.stop()


async def test_delayed_tasks_wait_on_the_server_not_in_a_poll_loop(
    make: Callable[..., Any],
) -> None:
    broker = await make(RedisBroker)
    now = time.time()
    await broker.publish([env("late", eta=now + 0.6), env("early", eta=now + 0.3)])
    calls = count_runs(broker.link)
    got: list[Delivery] = []
    while len(got) < 2:
        got += await broker.fetch(["q"], 10, 2.0)
        assert time.time() >= now + (0.3 if len(got) == 1 else 0.6)
    assert [d.body for d in got] == [b"early", b"late"]
    # Claim, block until the first eta, claim; again for the second: no polling between.
    assert len(calls()) <= 6, calls()


# -- storage: pub/sub waits ----------------------------------------------------------------


def _final(task: Task, result: Any) -> Task:
    return msgspec.structs.replace(
        task, status=TaskStatusEnum.SUCCESS, returning=result, finished_at=time.time()
    )


def _save_from_another_loop(namespace: str, task: Task) -> None:
    """Save through a storage with its own loop and link, as another process would."""

    async def save() -> None:
        other = RedisStorage(REDIS_URL, namespace=namespace, config=FAST)
        await other.start()
        try:
            await other.save([task])
        finally:
            await other.stop()

    thread = threading.Thread(target=asyncio.run, args=(save(),))
    thread.start()
    thread.join()


async def test_wait_is_woken_by_pubsub_without_reading_again(
    make: Callable[..., Any], namespace: str
) -> None:
    storage = await make(RedisStorage)
    task = record_for(TaskMessage(uuid=new_uuid(), name="job", created_at=time.time()))
    await storage.add([task])
    reads = 0
    original = storage.get

    async def counting_get(uuid: str) -> Task | None:
        nonlocal reads
        reads += 1
        return await original(uuid)

    storage.get = counting_get  # type: ignore[method-assign]
    waiting = asyncio.ensure_future(storage.wait(str(task.uuid), 5.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert reads == 1, "registered, subscribed, then read once"
    done = _final(task, 42)
    start = time.monotonic()
    await asyncio.to_thread(_save_from_another_loop, namespace, done)
    assert await asyncio.wait_for(waiting, 2.0) == done
    assert time.monotonic() - start < 1.0
    assert reads == 1, "the published record woke the waiter: no read after the wake"


async def test_wait_survives_a_dropped_subscriber_connection(
    make: Callable[..., Any], namespace: str, raw: Any
) -> None:
    storage = await make(RedisStorage)
    task = record_for(TaskMessage(uuid=new_uuid(), name="job", created_at=time.time()))
    await storage.add([task])  # enqueued: waiting on a missing record raises at once
    waiting = asyncio.ensure_future(storage.wait(str(task.uuid), 10.0))
    await asyncio.sleep(0.1)
    assert await kill_connections(raw, os.getpid(), pubsub_only=True) == 1
    # Saved while the subscriber is gone: the re-read after reconnecting finds it.
    await asyncio.to_thread(_save_from_another_loop, namespace, _final(task, "missed"))
    got = await asyncio.wait_for(waiting, 5.0)
    assert got is not None
    assert got.returning == "missed"


async def test_waiting_again_right_after_a_timeout_is_still_woken(
    make: Callable[..., Any], namespace: str
) -> None:
    # The timed-out wait unsubscribes and the next one subscribes the same channel at
    # once: the commands must reach Redis in that order, or the second never hears.
    storage = await make(RedisStorage)
    for i in range(5):
        task = record_for(TaskMessage(uuid=new_uuid(), name="job", created_at=time.time()))
        await storage.add([task])
        assert await storage.wait(str(task.uuid), 0.01) is None
        waiting = asyncio.ensure_future(storage.wait(str(task.uuid), 5.0))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(_save_from_another_loop, namespace, _final(task, i))
        got = await asyncio.wait_for(waiting, 3.0)
        assert got is not None
        assert got.returning == i


async def test_many_waiters_one_subscriber(make: Callable[..., Any], raw: Any) -> None:
    storage = await make(RedisStorage)
    tasks = [
        record_for(TaskMessage(uuid=new_uuid(), name="job", created_at=time.time()))
        for _ in range(200)
    ]
    await storage.add(tasks)
    waits = [asyncio.ensure_future(storage.wait(str(t.uuid), 5.0)) for t in tasks]
    await asyncio.sleep(0.2)
    await storage.save([_final(t, i) for i, t in enumerate(tasks)])
    results = await asyncio.gather(*waits)
    assert [r.returning for r in results if r is not None] == list(range(200))
    channels = await raw.execute_command("PUBSUB", "CHANNELS", f"{storage.keys.done_prefix}*")
    assert channels == [], "every channel is unsubscribed once its waiter returned"


async def test_final_records_expire_by_ttl(make: Callable[..., Any], raw: Any) -> None:
    storage = await make(RedisStorage, config=dataclasses.replace(FAST, result_ttl_seconds=60))
    task = record_for(TaskMessage(uuid=new_uuid(), name="job", created_at=time.time()))
    await storage.save([task])
    assert await raw.pttl(storage.keys.record(str(task.uuid))) == -1, "running: kept"
    await storage.save([_final(task, 1)])
    assert 55_000 < await raw.pttl(storage.keys.record(str(task.uuid))) <= 60_000


# -- State -------------------------------------------------------------------------------


async def test_state_is_atomic_across_links(make: Callable[..., Any], namespace: str) -> None:
    storage = await make(RedisStorage)
    await storage.state_update("Cart", {"items": [1, 2], "total": 0})
    assert await storage.state_get("Cart", "items") == [1, 2]
    assert await storage.state_get("Cart", "missing", "d") == "d"

    def hammer() -> None:
        async def go() -> None:
            other = RedisStorage(REDIS_URL, namespace=namespace)
            await other.start()
            try:
                for _ in range(200):
                    await other.state_incr("Cart", "total")
            finally:
                await other.stop()

        asyncio.run(go())

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(200):
        await storage.state_incr("Cart", "total")
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert await storage.state_get("Cart", "total") == 800
    assert await storage.state_incr("Cart", "total", 0.5) == 800.5
    assert await storage.state_incr("Cart", "ratio", 1.5) == 1.5
    assert await storage.state_incr("Cart", "ratio", 1.5) == 3.0
    with pytest.raises(TypeError):
        await storage.state_incr("Cart", "items")
    assert await storage.state_acquire_lock("Cart", "l", "me", 5)
    assert not await storage.state_acquire_lock("Cart", "l", "you", 5)
    assert not await storage.state_release_lock("Cart", "l", "you")
    assert await storage.state_release_lock("Cart", "l", "me")
    await storage.state_delete("Cart", ["ratio"])
    assert set(await storage.state_get_all("Cart")) == {"items", "total"}
    await storage.state_delete("Cart")
    assert await storage.state_get_all("Cart") == {}


# -- the sync facade -------------------------------------------------------------------------


async def test_sync_app_on_redis(namespace: str) -> None:
    from qtasks import QueueTasks as SyncQueueTasks

    def produce() -> None:
        app = SyncQueueTasks(namespace, broker_url=REDIS_URL)

        @app.task
        def double(x: int) -> int:
            return 2 * x

        with app:
            one = double.add_task(1)
            many = app.add_tasks([("double", (i,)) for i in range(5)])
            assert app.get(one.uuid) == one
            assert [app.get(r.uuid) for r in many] == many
            assert app.add_task("double", 3, timeout=0.05) is None  # no worker: times out

    await asyncio.to_thread(produce)
    assert not [t for t in threading.enumerate() if t.name == "qtasks-portal"]


async def test_failures_are_listed_for_stats_and_the_dashboard(namespace: str) -> None:
    from qtasks.stats import AsyncStats

    app = QueueTasks(namespace, broker_url=REDIS_URL, config=FAST)

    @app.task
    async def boom(n: int) -> None:
        raise ValueError(f"kaput {n}")

    @app.task
    async def fine() -> str:
        return "ok"

    async with app:
        bad = [await boom.add_task(n) for n in range(3)]
        good = await fine.add_task()
        worker = Worker()
        await worker.start(app)
        try:
            for record in [*bad, good]:
                await app.wait(record.uuid, 10)
        finally:
            await worker.stop()
        failures = (await AsyncStats(app).inspect().failures(10)).data
        # They ran at once (one write): listed all, in any order among themselves.
        assert sorted(str(r.uuid) for r in failures) == sorted(str(r.uuid) for r in bad)
        assert all(r.error_type == "ValueError" for r in failures)
        assert [r.returning for r in await app.storage.recent(TaskStatusEnum.SUCCESS, 5)] == ["ok"]
        with pytest.raises(NotImplementedError, match="queued"):
            await app.storage.recent(TaskStatusEnum.NEW, 5)
