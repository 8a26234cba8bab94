"""`@app.task(at_most_once=True)`: one attempt never starts twice, even after a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from qtasks import QueueConfig, TaskInterrupted, TaskStatusEnum, WorkerLost
from qtasks.asyncio import QueueTasks
from qtasks.message import Envelope, Task
from qtasks.runtime.worker import Worker
from qtasks.storages.memory import MemoryStorage
from tests.unit.test_redelivery import Redelivering

RunUntilIdle = Callable[..., Awaitable[Worker]]


async def test_the_process_record_is_stored_before_the_function_starts(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    app = make_app()
    seen: list[tuple[TaskStatusEnum, int]] = []

    @app.task(at_most_once=True)
    async def charge(cents: int) -> int:
        record = await app.get(current.uuid)
        assert record is not None
        seen.append((record.status, record.attempts))
        return cents

    current = await charge.add_task(250)
    await run_until_idle(app)
    assert seen == [(TaskStatusEnum.PROCESS, 1)]
    final = await app.get(current.uuid)
    assert final is not None
    assert (final.status, final.returning) == (TaskStatusEnum.SUCCESS, 250)


async def test_an_attempt_that_started_is_not_run_again_after_a_crash(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """Its worker died mid-run (the record says `process`): the redelivery is set aside
    as worker_lost with TaskInterrupted, and the function does not run a second time."""
    broker = Redelivering({"charge"})
    app = make_app(broker=broker)
    runs: list[int] = []

    @app.task(at_most_once=True)
    def charge() -> None:
        runs.append(1)

    record = await charge.add_task()
    # What a killed worker leaves: the record of the attempt it started, the message back.
    started = Task(
        uuid=record.uuid,
        name="charge",
        status=TaskStatusEnum.PROCESS,
        attempts=1,
        created_at=record.created_at,
        started_at=record.created_at,
    )
    await app.storage.save([started])
    worker = await run_until_idle(app)
    assert runs == []
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status == TaskStatusEnum.ERROR
    assert final.error_type == "TaskInterrupted"
    assert "not run a second time" in (final.error_message or "")
    letters = await app.dead_letters(uuids=[str(record.uuid)])
    assert [x.reason for x in letters] == ["worker_lost"]
    assert worker.counters["charge"].redelivered == 1
    assert issubclass(TaskInterrupted, WorkerLost)
    # A person decides running it again is safe: the dead letter goes out as a fresh
    # attempt, and runs.
    broker.names.clear()
    assert await app.retry_dead_letters([record.uuid]) == [str(record.uuid)]
    await run_until_idle(app)
    assert runs == [1]
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status == TaskStatusEnum.SUCCESS


async def test_a_redelivery_of_a_finished_attempt_is_acked_unrun(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    broker = Redelivering(set())
    app = make_app(broker=broker)
    runs: list[int] = []

    @app.task(at_most_once=True)
    def once() -> str:
        runs.append(1)
        return "done"

    record = await once.add_task()
    await run_until_idle(app)
    body = broker.bodies[str(record.uuid)]
    # The ack of the finished attempt was lost: the same message comes back, uncounted.
    await app.broker.publish([Envelope(str(record.uuid), "default", 0, None, 0.0, body)])
    await run_until_idle(app)
    assert runs == [1]
    final = await app.get(record.uuid)
    assert final is not None
    assert (final.status, final.returning) == (TaskStatusEnum.SUCCESS, "done")
    assert await app.dead_letters() == []


async def test_a_task_given_up_on_at_shutdown_is_not_started_again(
    make_app: Callable[..., QueueTasks], running_worker: Any, run_until_idle: RunUntilIdle
) -> None:
    """A stop whose grace runs out gives running tasks back to the broker uncounted; an
    at-least-once task runs again from the start, an at_most_once one must not."""
    app = make_app(config=QueueConfig(graceful_shutdown_seconds=0.1))
    started = asyncio.Event()
    runs: list[int] = []

    @app.task(at_most_once=True)
    async def slow() -> None:
        runs.append(1)
        started.set()
        await asyncio.sleep(30)

    record = await slow.add_task()
    async with running_worker(app, grace_seconds=0.1):
        await started.wait()
    assert await app.broker.queue_sizes(["default"]) == {"default": 1}, "given back"
    await run_until_idle(app)
    assert runs == [1]
    final = await app.get(record.uuid)
    assert final is not None
    assert (final.status, final.error_type) == (TaskStatusEnum.ERROR, "TaskInterrupted")


async def test_each_retry_is_a_new_attempt_that_runs(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    app = make_app()
    runs: list[int] = []

    @app.task(at_most_once=True, retry=2, retry_backoff=0.0)
    def flaky() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("not yet")
        return "ok"

    record = await flaky.add_task()
    await run_until_idle(app)
    assert len(runs) == 3
    final = await app.get(record.uuid)
    assert final is not None
    assert (final.status, final.returning, final.attempts) == (TaskStatusEnum.SUCCESS, "ok", 3)


class FailingReads(MemoryStorage):
    """A storage that cannot be read for a while (a database failing over)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def get(self, uuid: str) -> Task | None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("storage unreachable")
        return await super().get(uuid)

    async def save(self, tasks: Sequence[Task]) -> None:
        await super().save(tasks)


async def test_when_the_storage_cannot_tell_the_task_waits_instead_of_running_blind(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    storage = FailingReads()
    app = make_app(storage=storage)
    runs: list[int] = []

    @app.task(at_most_once=True)
    def careful() -> None:
        runs.append(1)

    record = await careful.add_task()
    storage.failures = 1
    await run_until_idle(app)
    assert runs == [1], "given back while the storage failed, run once it answered"
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status == TaskStatusEnum.SUCCESS


async def test_at_least_once_tasks_pay_no_storage_read(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    storage = FailingReads()
    app = make_app(storage=storage)

    @app.task
    def plain() -> None: ...

    await plain.add_task()
    storage.failures = 1000  # any read would fail
    await run_until_idle(app)
    assert storage.failures == 1000


def test_at_most_once_is_a_bool_and_shows_in_the_definition() -> None:
    app = QueueTasks(broker_url="memory://")

    @app.task(at_most_once=True)
    def pay() -> None: ...

    @app.task
    def plain() -> None: ...

    assert app.tasks["pay"].at_most_once is True
    assert app.tasks["plain"].at_most_once is False
    assert "at_most_once" not in app.tasks["pay"].metadata
    with pytest.raises(TypeError, match="at_most_once must be True or False"):

        @app.task(at_most_once="yes")
        def bad() -> None: ...


async def test_the_process_record_goes_through_the_storage_save_trigger(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    from qtasks.plugins.base import BasePlugin

    class Saves(BasePlugin):
        def __init__(self) -> None:
            super().__init__("saves")
            self.statuses: list[TaskStatusEnum] = []
            self.handlers = {"storage_save": self.seen}

        def seen(self, records: list[Task], **_: Any) -> None:
            self.statuses += [r.status for r in records]

    app = make_app()
    plugin = Saves()
    app.add_plugin(plugin)
    before_run: list[list[TaskStatusEnum]] = []

    @app.task(at_most_once=True)
    def pay() -> None:
        before_run.append(list(plugin.statuses))

    await pay.add_task()
    await run_until_idle(app)
    assert before_run == [[TaskStatusEnum.PROCESS]]
    assert plugin.statuses[-1] == TaskStatusEnum.SUCCESS
