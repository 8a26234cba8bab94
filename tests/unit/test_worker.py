"""The worker on memory://: prefetch, concurrency, ordering, ack-after-store, graceful stop."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid as uuid_module
from collections.abc import Sequence

from qtasks import QueueConfig, StorageError, Task, TaskMessage, TaskStatusEnum
from qtasks.brokers.memory import MemoryBroker
from qtasks.interfaces import Delivery
from qtasks.runtime.worker import Worker
from qtasks.storages.memory import MemoryStorage

# -- fetching ------------------------------------------------------------------------------


async def test_prefetch_is_bounded(make_app, counting_broker, run_until_idle) -> None:
    app = make_app(broker=counting_broker, config=QueueConfig(max_tasks_process=4, prefetch=2))
    done: list[int] = []

    @app.task
    async def job(n: int) -> None:
        done.append(n)

    for n in range(1000):
        await job.add_task(n)
    assert counting_broker.ready == 1000

    await run_until_idle(app)
    assert sorted(done) == list(range(1000))
    assert counting_broker.fetched == 1000
    assert counting_broker.acked == 1000
    assert 0 < counting_broker.max_in_flight <= 4 + 2


class SlowStorage(MemoryStorage):
    """Every save takes a few milliseconds (a remote database)."""

    async def save(self, tasks: Sequence[Task]) -> None:
        await asyncio.sleep(0.002)
        await super().save(tasks)


async def test_prefetch_bound_counts_results_not_yet_stored(
    make_app, counting_broker, run_until_idle
) -> None:
    app = make_app(
        broker=counting_broker,
        storage=SlowStorage(),
        config=QueueConfig(max_tasks_process=4, prefetch=2),
    )

    @app.task
    async def job(n: int) -> int:
        return n

    for n in range(300):
        await job.add_task(n)
    await run_until_idle(app)
    assert counting_broker.acked == 300
    assert counting_broker.max_in_flight <= 4 + 2  # finished-but-unacked claims count too


async def test_prefetch_defaults_to_the_concurrency(
    make_app, counting_broker, run_until_idle
) -> None:
    app = make_app(broker=counting_broker, config=QueueConfig(max_tasks_process=3))

    @app.task
    async def job() -> None:
        await asyncio.sleep(0)

    for _ in range(100):
        await job.add_task()
    await run_until_idle(app)
    assert counting_broker.acked == 100
    assert counting_broker.max_in_flight <= 3 + 3


async def test_worker_concurrency_overrides_the_config(
    make_app, counting_broker, run_until_idle
) -> None:
    app = make_app(broker=counting_broker, config=QueueConfig(max_tasks_process=50, prefetch=0))

    @app.task
    async def job() -> None: ...

    for _ in range(20):
        await job.add_task()
    await run_until_idle(app, concurrency=2)
    assert counting_broker.max_in_flight <= 2


async def test_prefetch_defaults_to_the_workers_own_concurrency(
    make_app, counting_broker, run_until_idle
) -> None:
    # `run --concurrency 2` on an app whose max_tasks_process is 50: the window is 2 + 2
    # (it was 2 + 50, so one worker claimed every task while others sat idle).
    app = make_app(broker=counting_broker, config=QueueConfig(max_tasks_process=50))

    @app.task
    async def job() -> None:
        await asyncio.sleep(0)

    for _ in range(40):
        await job.add_task()
    await run_until_idle(app, concurrency=2)
    assert counting_broker.acked == 40
    assert counting_broker.max_in_flight <= 2 + 2


# -- concurrency ---------------------------------------------------------------------------


async def test_at_most_max_tasks_process_run_at_once(make_app, run_until_idle) -> None:
    app = make_app(config=QueueConfig(max_tasks_process=3))
    running = 0
    peak = 0

    @app.task
    async def job() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)  # simulated work, so tasks overlap
        running -= 1

    for _ in range(12):
        await job.add_task()
    await run_until_idle(app)
    assert peak == 3


async def test_sync_tasks_share_the_bound(make_app, run_until_idle) -> None:
    app = make_app(config=QueueConfig(max_tasks_process=2, max_threads=8))
    lock = threading.Lock()
    running = 0
    peak = 0

    @app.task
    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.005)  # simulated work inside the task, so tasks overlap
        with lock:
            running -= 1

    for _ in range(8):
        await job.add_task()
    await run_until_idle(app)
    assert peak == 2


# -- ordering ------------------------------------------------------------------------------


class ReversingBroker(MemoryBroker):
    """Hands each batch out in the wrong order, so only the worker's own ordering counts."""

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        return list(reversed(await super().fetch(queues, max_count, timeout)))


async def test_worker_orders_a_batch_by_priority_then_age(
    make_app, run_until_idle, publish_message
) -> None:
    app = make_app(broker=ReversingBroker())
    order: list[str] = []

    @app.task
    async def job(label: str) -> None:
        order.append(label)

    for label, priority, created_at in [
        ("p1-old", 1, 10.0),
        ("p0-new", 0, 30.0),
        ("p1-new", 1, 40.0),
        ("p0-old", 0, 20.0),
        ("p-1", -1, 50.0),
    ]:
        message = TaskMessage(
            uuid=uuid_module.uuid4(),
            name="job",
            args=[label],
            priority=priority,
            created_at=created_at,
        )
        await publish_message(app, message)

    await run_until_idle(app, concurrency=1)
    assert order == ["p-1", "p0-old", "p0-new", "p1-old", "p1-new"]


# -- ack after store -----------------------------------------------------------------------


class FlakyStorage(MemoryStorage):
    """Fails the first `failures` saves; remembers how many claims the broker held then."""

    def __init__(self, broker: MemoryBroker, failures: int) -> None:
        super().__init__()
        self.broker = broker
        self.failures = failures
        self.calls = 0
        self.in_flight_at_failure: list[int] = []

    async def save(self, tasks: Sequence[Task]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            self.in_flight_at_failure.append(len(self.broker._in_flight))
            raise StorageError("database is locked")
        await super().save(tasks)


class CheckingBroker(MemoryBroker):
    """Remembers the stored status of every message at the moment it is acked."""

    def __init__(self) -> None:
        super().__init__()
        self.storage: MemoryStorage | None = None
        self.status_at_ack: list[TaskStatusEnum | None] = []

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        assert self.storage is not None
        for d in deliveries:
            env, _ = self._in_flight[d.receipt]
            record = await self.storage.get(env.uuid)
            self.status_at_ack.append(record.status if record else None)
        await super().ack(deliveries)


async def test_ack_only_after_the_record_is_stored(make_app, run_until_idle) -> None:
    broker = CheckingBroker()
    storage = FlakyStorage(broker, failures=2)
    broker.storage = storage
    app = make_app(broker=broker, storage=storage)

    @app.task
    async def job() -> str:
        return "stored"

    record = await job.add_task()
    await run_until_idle(app)

    assert storage.calls >= 3
    assert storage.in_flight_at_failure == [1, 1]  # not acked while saving failed
    assert broker.status_at_ack == [TaskStatusEnum.SUCCESS]
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning == "stored"


class StuckOnceStorage(MemoryStorage):
    """The first save of a final record hangs until cancelled (a slow database)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = asyncio.Event()

    async def save(self, tasks: Sequence[Task]) -> None:
        if not self.stuck.is_set() and any(t.is_final for t in tasks):
            self.stuck.set()
            await asyncio.Event().wait()
        await super().save(tasks)


async def test_stop_during_a_slow_save_still_stores_and_acks(make_app, running_worker) -> None:
    storage = StuckOnceStorage()
    app = make_app(storage=storage)

    @app.task
    async def job() -> str:
        return "kept"

    async with running_worker(app):
        record = await job.add_task()
        await storage.stuck.wait()

    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning == "kept"
    assert app.broker._in_flight == {}
    assert (await app.broker.queue_sizes(["default"])) == {"default": 0}


# -- graceful stop -------------------------------------------------------------------------


async def test_stop_lets_running_tasks_finish_and_returns_unstarted_ones(
    make_app, counting_broker, running_worker, run_until_idle
) -> None:
    app = make_app(broker=counting_broker, config=QueueConfig(prefetch=3))
    started = asyncio.Event()
    ran: list[str] = []

    @app.task
    async def job(label: str) -> str:
        ran.append(label)
        started.set()
        await asyncio.sleep(0.02)  # simulated work, still running when stop() is called
        return label

    first = await job.add_task("first", priority=0)
    later = [await job.add_task(f"later{i}", priority=1) for i in range(3)]

    async with running_worker(app, concurrency=1, grace_seconds=5):
        await started.wait()
        assert counting_broker.in_flight == 4  # one running, three prefetched

    assert ran == ["first"]
    assert (await app.get(first.uuid)).status is TaskStatusEnum.SUCCESS
    for record in later:
        assert (await app.get(record.uuid)).status is TaskStatusEnum.NEW
    assert counting_broker.in_flight == 0
    assert counting_broker.ready == 3  # given back as they were

    await run_until_idle(app)
    assert sorted(ran) == ["first", "later0", "later1", "later2"]  # each ran exactly once


async def test_task_still_running_after_grace_is_cancelled_and_returned(
    make_app, counting_broker, running_worker
) -> None:
    app = make_app(broker=counting_broker)
    started = asyncio.Event()
    cancelled = asyncio.Event()
    finished: list[bool] = []

    @app.task
    async def endless() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finished.append(True)

    record = await endless.add_task()
    begun = time.monotonic()
    async with running_worker(app, grace_seconds=0.05):
        await started.wait()
    assert time.monotonic() - begun < 2

    assert cancelled.is_set()
    assert finished == []
    assert counting_broker.acked == 0
    assert counting_broker.in_flight == 0
    assert counting_broker.ready == 1  # back on the broker for another worker
    stored = await app.get(record.uuid)
    assert stored is not None
    assert not stored.is_final


async def test_sync_task_still_running_after_grace_is_returned(
    make_app, counting_broker, running_worker
) -> None:
    app = make_app(broker=counting_broker)
    started = threading.Event()
    release = threading.Event()

    @app.task
    def blocking() -> None:
        started.set()
        release.wait(10)

    record = await blocking.add_task()
    try:
        async with running_worker(app, grace_seconds=0.05):
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        assert counting_broker.acked == 0
        assert counting_broker.ready == 1
        assert not (await app.get(record.uuid)).is_final
    finally:
        release.set()


async def test_stop_is_prompt_when_a_message_arrives_as_it_stops(app, running_worker) -> None:
    @app.task
    async def job() -> None: ...

    async with running_worker(app) as worker:
        await job.add_task(timeout=5)  # the fetcher is now waiting for the next message
        await job.add_task(delay=60)  # wakes the fetcher ...
        begun = time.monotonic()
        await worker.stop(grace_seconds=1)  # ... in the same loop step as the stop
        assert time.monotonic() - begun < 0.5
    assert (await app.broker.queue_sizes(["default"])) == {"default": 1}


async def test_stop_without_start_is_a_no_op() -> None:
    worker = Worker()
    await worker.stop()
    assert worker.processed == 0


# -- registry and bookkeeping --------------------------------------------------------------


async def test_worker_registers_and_unregisters(app, running_worker) -> None:
    @app.task
    async def job() -> None: ...

    async with running_worker(app, concurrency=2) as worker:
        await job.add_task(timeout=5)
        workers = await app.global_config.workers()
        assert [w["id"] for w in workers] == [worker.id]
        assert workers[0]["concurrency"] == 2
        assert workers[0]["heartbeat"] > 0
    assert await app.global_config.workers() == []
    assert worker.processed == 1


async def test_worker_consumes_the_queues_of_registered_tasks(app, run_until_idle) -> None:
    @app.task(queue="emails")
    async def send() -> str:
        return "sent"

    record = await send.add_task()
    assert record.queue == "emails"
    assert Worker().resolved_queues(app) == ["default", "emails"]
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == "sent"


async def test_worker_only_takes_its_queues(app, running_worker) -> None:
    @app.task(queue="other")
    async def elsewhere() -> None: ...

    @app.task
    async def here() -> str:
        return "here"

    skipped = await elsewhere.add_task()
    async with running_worker(app, worker=Worker(queues=["default"])):
        done = await here.add_task(timeout=5)
    assert done.returning == "here"
    assert (await app.get(skipped.uuid)).status is TaskStatusEnum.NEW
    assert (await app.broker.queue_sizes(["other"])) == {"other": 1}


# -- the starter: serve() until SIGTERM/SIGINT ---------------------------------------------


async def test_sigterm_drains_gracefully(make_app, counting_broker) -> None:
    app = make_app(broker=counting_broker)
    started = asyncio.Event()
    finish = asyncio.Event()
    ran: list[str] = []

    @app.task
    async def job(label: str) -> str:
        ran.append(label)
        started.set()
        await finish.wait()
        return label

    running = await job.add_task("running", priority=0)
    waiting = await job.add_task("waiting", priority=1)
    serving = asyncio.ensure_future(app.serve(concurrency=1))
    await started.wait()

    loop = asyncio.get_running_loop()
    assert signal.SIGTERM in loop._signal_handlers  # else raising it would end pytest
    signal.raise_signal(signal.SIGTERM)
    for _ in range(1000):  # yield (no timed sleep) until the loop ran the handler
        if app.worker.stopping:
            break
        await asyncio.sleep(0)
    assert app.worker.stopping  # the worker stops taking work ...
    finish.set()  # ... and the running task may still finish
    await asyncio.wait_for(serving, 5)

    assert ran == ["running"]
    assert (await app.get(running.uuid)).status is TaskStatusEnum.SUCCESS
    assert (await app.get(waiting.uuid)).status is TaskStatusEnum.NEW
    assert counting_broker.ready == 1
    assert signal.SIGTERM not in loop._signal_handlers  # handlers restored


async def test_second_stop_request_gives_up_on_running_tasks(make_app, counting_broker) -> None:
    app = make_app(broker=counting_broker, config=QueueConfig(graceful_shutdown_seconds=60))
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @app.task
    async def endless() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await endless.add_task()
    serving = asyncio.ensure_future(app.serve())
    await started.wait()
    app.starter.request_stop()
    app.starter.request_stop()  # a second request: do not wait the 60s grace
    await asyncio.wait_for(serving, 5)
    assert cancelled.is_set()
    assert counting_broker.acked == 0
    assert counting_broker.ready == 1


async def test_warns_about_tasks_that_may_outlive_the_brokers_claim_limit(
    make_app, run_until_idle, caplog
) -> None:
    broker = MemoryBroker()
    broker.claim_limit_seconds = 60.0
    app = make_app(broker=broker)

    @app.task(max_time=30)
    async def short() -> None: ...

    @app.task
    async def unbounded() -> None: ...

    @app.task(max_time=120)
    async def long() -> None: ...

    await run_until_idle(app)
    (line,) = [
        r.getMessage() for r in caplog.records if "takes a claimed message" in r.getMessage()
    ]
    assert "long, unbounded may run longer" in line
    assert "short" not in line


def test_rabbitmq_url_says_the_servers_consumer_timeout() -> None:
    from qtasks.brokers.rabbitmq import RabbitMQBroker

    def limit(url: str) -> float | None:
        return RabbitMQBroker.from_url(url, namespace="n", config=QueueConfig()).claim_limit_seconds

    assert limit("amqp://guest:guest@localhost/") == 1800.0
    assert limit("amqp://localhost/?consumer_timeout=7200") == 7200.0
    assert limit("amqp://localhost/?consumer_timeout=none") is None


async def test_redeliveries_are_counted_per_task(make_app) -> None:
    app = make_app()

    @app.task
    async def job() -> str:
        return "ok"

    record = await job.add_task()
    await app.start()
    (first,) = await app.broker.fetch(["default"], 1, 1.0)
    again = Delivery(first.body, first.receipt, first.queue, 0, first.created_at, 3)
    worker = Worker()
    await worker.start(app)
    try:
        await worker.process(again)
        await worker.writer.flush()
        assert (await app.get(record.uuid)).returning == "ok"
        assert worker.counters["job"].redelivered == 1
        assert worker.counters.snapshot()["job"]["redelivered"] == 1
    finally:
        await worker.stop(0)
