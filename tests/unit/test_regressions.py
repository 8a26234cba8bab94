"""Bugs found by review, each with the test that failed before its fix."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from qtasks import QueueConfig, TaskContext, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.context import SyncTaskContext
from qtasks.runtime.worker import Worker
from qtasks.storages.memory import MemoryStorage

RunUntilIdle = Callable[..., Awaitable[Worker]]


async def test_sync_echo_task_can_enqueue_subtasks(
    app: QueueTasks, run_until_idle: RunUntilIdle
) -> None:
    seen: list[Any] = []

    @app.task
    def child(x: int) -> int:
        return x + 1

    @app.task(echo=True)
    def parent(ctx: SyncTaskContext, x: int) -> str:
        seen.append(type(ctx))
        sub = ctx.add_task("child", x)
        assert sub is not None
        return str(sub.uuid)

    record = await parent.add_task(41)
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status == TaskStatusEnum.SUCCESS
    assert seen == [SyncTaskContext]
    sub = await app.get(final.returning)
    assert sub is not None
    assert sub.status == TaskStatusEnum.SUCCESS
    assert sub.returning == 42


async def test_async_echo_task_gets_the_awaitable_context(
    app: QueueTasks, run_until_idle: RunUntilIdle
) -> None:
    @app.task(echo=True)
    async def parent(ctx: TaskContext) -> str:
        return type(ctx).__name__

    record = await parent.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.returning == "TaskContext"


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
async def test_task_raising_systemexit_fails_that_task_only(
    app: QueueTasks, run_until_idle: RunUntilIdle, exc: BaseException
) -> None:
    @app.task
    def bad() -> None:
        raise exc

    @app.task
    def good() -> int:
        return 1

    first = await bad.add_task()
    second = await good.add_task()
    await run_until_idle(app, concurrency=1)
    failed = await app.get(first.uuid)
    assert failed is not None
    assert failed.status == TaskStatusEnum.ERROR
    assert failed.error_type == type(exc).__name__
    ok = await app.get(second.uuid)
    assert ok is not None
    assert ok.status == TaskStatusEnum.SUCCESS


async def test_headers_must_be_strings(app: QueueTasks) -> None:
    @app.task
    def noop() -> None:
        return None

    with pytest.raises(TypeError, match="headers must map str to str"):
        await noop.add_task(headers={"k": 1})  # type: ignore[dict-item]
    assert len(app.storage) == 0  # type: ignore[arg-type]


async def test_memory_storage_purges_expired_records_without_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = MemoryStorage(result_ttl_seconds=10)
    app = QueueTasks(broker_url="memory://", storage=storage)

    @app.task
    def noop() -> None:
        return None

    record = await noop.add_task()
    finished = record.__class__(
        uuid=record.uuid, name="noop", status=TaskStatusEnum.SUCCESS, finished_at=time.time()
    )
    await storage.save([finished])
    assert len(storage) == 1
    later = time.time() + 60
    monkeypatch.setattr(sys.modules["qtasks.storages.memory"].time, "time", lambda: later)
    other = record.__class__(
        uuid=finished.uuid.__class__(int=1), name="x", status=TaskStatusEnum.NEW
    )
    await storage.save([other])
    assert len(storage) == 1  # the expired record is gone, the new one stays
    await app.stop()


async def test_short_tasks_are_stored_once_long_ones_show_process_first(
    make_app: Callable[..., QueueTasks], recording_storage: Any, running_worker: Any
) -> None:
    app = make_app(storage=recording_storage)

    @app.task
    async def quick() -> int:
        return 1

    @app.task
    async def slow() -> int:
        await asyncio.sleep(0.3)
        return 2

    q = await quick.add_task()
    s = await slow.add_task()
    async with running_worker(app, concurrency=2):
        await app.wait(q.uuid, 5)
        await app.wait(s.uuid, 5)
    assert recording_storage.statuses(q.uuid) == [TaskStatusEnum.SUCCESS]
    assert recording_storage.statuses(s.uuid) == [TaskStatusEnum.PROCESS, TaskStatusEnum.SUCCESS]


class InflatedCounts(MemoryBroker):
    """Hands out every message as if it had been delivered `count` times already."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    async def fetch(self, queues: Any, max_count: int, timeout: float) -> Any:
        deliveries = await super().fetch(queues, max_count, timeout)
        for d in deliveries:
            d.delivery_count = self.count
        return deliveries


@pytest.mark.parametrize(("count", "runs"), [(5, 1), (6, 0)])
async def test_a_task_delivered_more_than_max_deliveries_is_not_run_again(
    make_app: Callable[..., QueueTasks],
    run_until_idle: RunUntilIdle,
    count: int,
    runs: int,
) -> None:
    app = make_app(broker=InflatedCounts(count), config=QueueConfig(max_deliveries=5))
    ran: list[int] = []

    @app.task
    def crashy() -> None:
        ran.append(1)

    record = await crashy.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert len(ran) == runs
    if runs:
        assert final.status == TaskStatusEnum.SUCCESS
    else:
        assert final.status == TaskStatusEnum.ERROR
        assert final.error_type == "WorkerLost"
        assert final.error_message is not None
        assert final.error_message.startswith("worker_lost")


async def test_closing_the_writer_does_not_redo_a_requeue_under_way() -> None:
    """Fault scenario 10 (rolling deploy) on RabbitMQ and Kafka: a SIGTERM while the
    writer was requeueing (published, waiting for the confirm or the ack) cancelled that
    flush, and close() wrote the requeues again: every deferred task then ran twice."""
    import types

    from qtasks.interfaces import Delivery
    from qtasks.message import Envelope
    from qtasks.runtime.worker import ResultWriter

    published: list[int] = []

    class SlowConfirms:
        async def requeue(self, items: Any) -> None:
            published.append(len(items))  # on the wire at once ...
            await asyncio.sleep(0.3)  # ... then the confirm and the ack take a while

    app: Any = types.SimpleNamespace(broker=SlowConfirms(), storage=None, plugins=None)
    writer = ResultWriter(app)
    writer.start()
    delivery = Delivery(b"{}", None, "default", 0, time.time())
    writer.requeue(delivery, Envelope("u", "default", 0, time.time() + 1, time.time(), b"{}"))
    await asyncio.sleep(0.05)  # the flush is under way
    await writer.close(give_up_after=5.0)
    assert published == [1]
    assert writer.unsettled == 0


async def test_a_stray_cancelled_error_from_a_broker_call_does_not_end_the_writer(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """aio-pika let the CancelledError of an ack whose connection died escape: it ended
    the worker's result writer for good, and the worker waited for room forever."""

    class StrayCancel(MemoryBroker):
        cancelled = 0

        async def ack(self, deliveries: Any) -> None:
            if not self.cancelled:
                self.cancelled += 1
                raise asyncio.CancelledError  # not a cancellation of the caller
            await super().ack(deliveries)

    broker = StrayCancel()
    app = make_app(broker=broker)

    @app.task
    def one(i: int) -> int:
        return i

    records = [await one.add_task(i) for i in range(20)]
    await run_until_idle(app, timeout=10)
    assert broker.cancelled == 1
    for r in records:
        final = await app.get(r.uuid)
        assert final is not None
        assert final.status == TaskStatusEnum.SUCCESS
