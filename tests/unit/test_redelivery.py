"""Redelivered messages: counted per crash only, run alone, never run twice once finished."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from qtasks import QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.message import Envelope
from qtasks.runtime.worker import Worker

RunUntilIdle = Callable[..., Awaitable[Worker]]


class Redelivering(MemoryBroker):
    """Hands out messages of the named tasks as if their worker had died once before
    (delivery_count 2), and remembers every body it handed out."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names
        self.bodies: dict[str, bytes] = {}

    async def fetch(self, queues: Any, max_count: int, timeout: float) -> Any:
        deliveries = await super().fetch(queues, max_count, timeout)
        for d in deliveries:
            head = msgspec.json.decode(d.body)
            self.bodies[head["uuid"]] = d.body
            if head["name"] in self.names:
                d.delivery_count = max(d.delivery_count, 2)
        return deliveries


async def test_retries_are_not_counted_as_deliveries(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """A task with more retries than max_deliveries was dead-lettered WorkerLost after
    max_deliveries runs: every broker carried the delivery count over into the retry."""
    app = make_app(config=QueueConfig(max_deliveries=2))
    runs: list[int] = []

    @app.task(retry=4, retry_backoff=0.0)
    def flaky() -> None:
        runs.append(1)
        raise ValueError("again")

    record = await flaky.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert len(runs) == 5
    assert final.status == TaskStatusEnum.ERROR
    assert final.error_type == "ValueError"


async def test_a_redelivered_task_runs_alone(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """A message handed out again after its worker died may be what killed it: nothing
    else of this worker runs (or is claimed) while it runs, so it cannot take others
    down with it; the rest of its batch still runs, beside one another."""
    broker = Redelivering({"suspect"})
    app = make_app(broker=broker)
    running: list[str] = []
    seen_beside_suspect: list[list[str]] = []
    most_at_once = 0

    @app.task
    async def ordinary(i: int) -> None:
        nonlocal most_at_once
        running.append("ordinary")
        most_at_once = max(most_at_once, len(running))
        await asyncio.sleep(0.05)
        running.remove("ordinary")

    @app.task
    async def suspect() -> None:
        seen_beside_suspect.append(list(running))
        running.append("suspect")
        await asyncio.sleep(0.1)
        seen_beside_suspect.append([r for r in running if r != "suspect"])
        running.remove("suspect")

    for i in range(10):
        await ordinary.add_task(i)
    record = await suspect.add_task()
    for i in range(10, 20):
        await ordinary.add_task(i)
    worker = await run_until_idle(app, concurrency=8)
    assert seen_beside_suspect == [[], []]
    assert most_at_once > 1, "ordinary tasks still run side by side"
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status == TaskStatusEnum.SUCCESS
    assert worker.counters["suspect"].redelivered == 1
    stats = await app.broker.queue_sizes(["default"])
    assert stats == {"default": 0}


async def test_a_redelivered_task_that_finished_already_is_not_run_again(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """The ack of a finished task did not reach the broker (a crash right after the
    result was stored; Kafka offsets above an unfinished one): its stored record says
    so, and the redelivery is acked without running the task a second time."""
    broker = Redelivering({"once"})
    app = make_app(broker=broker)
    runs: list[int] = []

    @app.task
    def once() -> int:
        runs.append(1)
        return 7

    record = await once.add_task()
    await run_until_idle(app)
    assert runs == [1]
    body = broker.bodies[str(record.uuid)]
    await app.broker.publish([Envelope(str(record.uuid), "default", 0, None, 0.0, body)])
    worker = await run_until_idle(app)
    assert runs == [1]
    assert worker.counters["once"].redelivered == 1
    final = await app.get(record.uuid)
    assert final is not None
    assert (final.status, final.returning) == (TaskStatusEnum.SUCCESS, 7)


async def test_a_redelivered_task_whose_record_says_error_runs_again(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """An `error` record is stored before the message goes to the dead letters: a crash in
    between redelivers it, and skipping it would leave no letter. It runs (and is set
    aside) again."""
    broker = Redelivering({"fails"})
    app = make_app(broker=broker)
    runs: list[int] = []

    @app.task
    def fails() -> None:
        runs.append(1)
        raise RuntimeError("no")

    record = await fails.add_task()
    await run_until_idle(app)
    body = broker.bodies[str(record.uuid)]
    await app.drop_dead_letters(uuids=[str(record.uuid)])
    await app.broker.publish([Envelope(str(record.uuid), "default", 0, None, 0.0, body)])
    await run_until_idle(app)
    assert runs == [1, 1]
    letters = await app.dead_letters(uuids=[str(record.uuid)])
    assert [x.reason for x in letters] == ["failed"]


async def test_a_retried_dead_letter_redelivered_before_it_started_runs(
    make_app: Callable[..., QueueTasks], run_until_idle: RunUntilIdle
) -> None:
    """A dead letter sent again keeps its uuid and starts at attempt 0, but its record kept
    the old attempt count: a crash redelivery before it started was taken for a later
    attempt that had run, and acked unrun (lost)."""
    broker = Redelivering(set())
    app = make_app(broker=broker)
    runs: list[int] = []

    @app.task(retry=2, retry_backoff=0.0)
    def shaky() -> str:
        runs.append(1)
        if len(runs) <= 3:
            raise RuntimeError("not yet")
        return "ok"

    record = await shaky.add_task()
    await run_until_idle(app)
    assert len(runs) == 3
    await app.retry_dead_letters([record.uuid])
    broker.names.add("shaky")  # the retried message comes as if its worker had died
    await run_until_idle(app)
    assert len(runs) == 4
    final = await app.get(record.uuid)
    assert final is not None
    assert (final.status, final.returning) == (TaskStatusEnum.SUCCESS, "ok")
