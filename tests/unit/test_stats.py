"""Stats: worker counters published with the heartbeat, and what inspect() answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtasks import QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.errors import Retry, UnknownTask
from qtasks.global_configs.memory import MemoryGlobalConfig
from qtasks.interfaces import Broker, QueueStats, Storage
from qtasks.runtime.worker import Worker
from qtasks.stats import AsyncStats, StatsNotSupported, SyncStats
from qtasks.stats.counters import (
    FAILED,
    SUCCEEDED,
    TIME_BUCKETS_SECONDS,
    TaskCounter,
    merge,
    quantile,
)
from qtasks.storages.memory import MemoryStorage
from qtasks.sync import QueueTasks as SyncQueueTasks

# -- counters without a loop -----------------------------------------------------------


def test_counter_buckets_and_quantiles() -> None:
    counter = TaskCounter()
    for seconds in (0.0005, 0.002, 0.002, 0.3, 1000.0):
        counter.done(SUCCEEDED, seconds, 0.0)
    counter.done(FAILED, 0.0, 2.0)
    snap = counter.snapshot()
    assert (snap["processed"], snap["succeeded"], snap["failed"]) == (6, 5, 1)
    duration = snap["duration"]
    assert sum(duration["counts"]) == 6
    assert duration["counts"][0] == 2  # <= 1ms
    assert duration["counts"][-1] == 1  # beyond the last bound
    assert duration["sum"] == pytest.approx(1000.3045)
    assert quantile(duration, 0.5) == 0.005
    assert quantile(duration, 1.0) == TIME_BUCKETS_SECONDS[-1]
    assert quantile(snap["queue_wait"], 1.0) == 2.5
    assert quantile(TaskCounter().snapshot()["duration"], 0.5) is None


def test_merge_adds_workers_and_skips_malformed_entries() -> None:
    one = {"processed": 2, "failed": 1, "duration": {"counts": [1] * 16, "sum": 1.0}}
    two = {"processed": 3, "failed": "x", "duration": {"counts": [1, 2], "sum": 5.0}}
    total = merge([one, two])
    assert total["processed"] == 5
    assert total["failed"] == 1
    assert total["duration"]["counts"] == [1] * 16
    assert total["duration"]["sum"] == 1.0


# -- counters in a running worker ------------------------------------------------------


async def _app_with_tasks(config: QueueConfig | None = None) -> QueueTasks:
    app = QueueTasks("stats", broker_url="memory://", config=config)

    @app.task
    async def ok(n: int) -> int:
        return n

    @app.task
    async def bad() -> None:
        raise ValueError("boom")

    @app.task(retry=1, retry_backoff=0.0)
    async def flaky() -> None:
        raise Retry(delay=0)

    return app


async def test_worker_counts_outcomes_and_publishes_them(running_worker) -> None:
    app = await _app_with_tasks()
    for n in range(3):
        await app.add_task("ok", n)
    await app.add_task("bad")
    await app.add_task("flaky")
    async with running_worker(app) as worker:
        assert isinstance(app.broker, MemoryBroker)
        await app.broker.join(5)
        await worker.register()
        inspect = AsyncStats(app).inspect()
        by_name = {t.name: t for t in (await inspect.tasks()).data}
        assert (by_name["ok"].processed, by_name["ok"].succeeded) == (3, 3)
        assert (by_name["bad"].processed, by_name["bad"].failed) == (1, 1)
        assert by_name["flaky"].retried >= 1
        assert by_name["ok"].running == 0
        assert sum(by_name["ok"].duration["counts"]) == 3
        assert sum(by_name["ok"].queue_wait["counts"]) == 3
        assert by_name["ok"].duration_p95_seconds is not None

        workers = (await inspect.workers()).data
        assert [w.id for w in workers] == [worker.id]
        (w,) = workers
        assert w.status == "alive"
        assert w.pid is not None
        assert w.host
        assert w.version
        assert w.queues == ["default"]
        assert w.concurrency == app.config.max_tasks_process
        assert w.processed >= 5

        app_stats = (await inspect.app()).data
        assert (app_stats.workers_alive, app_stats.workers_lost) == (1, 0)
        assert app_stats.tasks == ["bad", "flaky", "ok"]
        text = str(await inspect.tasks("ok"))
        assert "ok" in text
        assert "processed" in text
        data = json.loads(await inspect.task("ok", json=True))
        assert data["succeeded"] == 3
    await app.stop()


async def test_a_silent_worker_is_lost_and_its_counters_are_left_out() -> None:
    app = await _app_with_tasks(config=QueueConfig(worker_lost_after_seconds=10))
    await app.start()
    await app.global_config.register_worker(
        {"id": "w1", "queues": ["default"], "tasks": {"ok": {"processed": 7}}}
    )
    await app.global_config.register_worker(
        {"id": "w2", "queues": ["default"], "tasks": {"ok": {"processed": 1}}}
    )
    app.global_config._workers["w2"]["heartbeat"] -= 60  # type: ignore[attr-defined]
    inspect = AsyncStats(app).inspect()
    statuses = {w.id: w.status for w in (await inspect.workers()).data}
    assert statuses == {"w1": "alive", "w2": "lost"}
    assert (await inspect.task("ok")).data.processed == 7
    assert "lost" in str(await inspect.workers())
    await app.stop()


async def test_task_unknown_everywhere_is_an_error() -> None:
    app = await _app_with_tasks()
    with pytest.raises(UnknownTask):
        await AsyncStats(app).inspect().task("nope")
    # Asked by name, an unknown task is still listed (with zero counts).
    (row,) = (await AsyncStats(app).inspect().tasks("nope")).data
    assert not row.registered
    assert row.processed == 0
    await app.stop()


# -- queues, task_status, failures -----------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A broker URL of each backend that tells queue depths apart."""
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'q.db'}"


async def test_queue_depths_by_kind_and_priority(url: str) -> None:
    app = QueueTasks("depth", broker_url=url)
    await app.add_task("a", priority=1)
    await app.add_task("a", priority=1)
    await app.add_task("a", priority=5)
    await app.add_task("a", delay=3600)
    await app.add_task("a", queue="other")
    (claimed,) = await app.broker.fetch(["other"], 1, 0.0)
    inspect = AsyncStats(app).inspect()
    default, other = (await inspect.queues("default", "other")).data
    assert default == QueueStats(
        queue="default",
        total=4,
        ready=3,
        delayed=1,
        in_flight=0,
        dead_lettered=0,
        by_priority={1: 2, 5: 1},
    )
    assert (other.total, other.ready, other.in_flight) == (1, 0, 1)
    text = str(await inspect.queues("default"))
    assert "1:2 5:1" in text
    as_json = json.loads(await inspect.queues("default", json=True))
    assert as_json[0]["by_priority"] == {"1": 2, "5": 1}
    await app.broker.release([claimed])
    await app.stop()


async def test_default_queue_stats_are_totals_only() -> None:
    class Sizes(MemoryBroker):
        queue_stats = Broker.queue_stats

    app = QueueTasks(
        "totals", broker=Sizes(), storage=MemoryStorage(), global_config=MemoryGlobalConfig()
    )
    await app.add_task("a")
    (row,) = (await AsyncStats(app).inspect().queues("default")).data
    assert (row.total, row.ready, row.by_priority) == (1, None, None)
    assert " - " in str(await AsyncStats(app).inspect().queues("default"))
    await app.stop()


async def test_failures_and_task_status(url: str) -> None:
    app = QueueTasks("stats", broker_url=url)

    @app.task
    async def bad() -> None:
        raise ValueError("boom")

    @app.task
    async def ok(n: int) -> int:
        return n

    first = await app.add_task("bad")
    await app.add_task("ok", 1)
    second = await app.add_task("bad")
    assert first is not None
    assert second is not None
    worker = Worker()
    await app.start()
    await worker.start(app)
    await app.wait(second.uuid, 5)
    await app.wait(first.uuid, 5)
    await worker.stop()
    inspect = AsyncStats(app).inspect()
    failed = (await inspect.failures(10)).data
    assert {str(t.uuid) for t in failed} == {str(first.uuid), str(second.uuid)}
    assert all(t.status is TaskStatusEnum.ERROR for t in failed)
    assert len((await inspect.failures(1)).data) == 1
    assert "ValueError: boom" in str(await inspect.failures())
    status = await inspect.task_status(first.uuid)
    assert status.data is not None
    assert status.data.status is TaskStatusEnum.ERROR
    text = str(status)
    assert "Traceback" in text
    assert "ValueError: boom" in text
    assert json.loads(await inspect.task_status(first.uuid, json=True))["status"] == "error"
    assert "unknown or expired" in str(await inspect.task_status("nope"))
    await app.stop()


async def test_failures_on_a_storage_that_cannot_list_records() -> None:
    class Plain(MemoryStorage):
        recent = Storage.recent  # the interface's default

    app = QueueTasks("plain", broker_url="memory://", storage=Plain())
    with pytest.raises(StatsNotSupported, match="cannot list"):
        await AsyncStats(app).inspect().failures()
    await app.stop()


def test_sync_stats_on_the_sync_app() -> None:
    app = SyncQueueTasks("sync-stats", broker_url="memory://")

    @app.task
    def job() -> None:
        pass

    job.add_task()
    inspect = SyncStats(app).inspect()
    assert inspect.app().data.tasks == ["job"]
    (row,) = inspect.queues("default").data
    assert row.ready == 1
    assert json.loads(inspect.workers(json=True)) == []
    assert inspect.tasks().data[0].name == "job"
    assert inspect.task("job", json=True).startswith("{")
    assert inspect.failures().data == []
    assert inspect.task_status("nope").data is None
    app.close()


def test_sync_stats_on_an_async_core_uses_its_own_portal() -> None:
    app = QueueTasks("core", broker_url="memory://")
    stats = SyncStats(app)
    assert stats.inspect().app().data.name == "core"
    stats.portal.call(app.stop())
    stats.close()
