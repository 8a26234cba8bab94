"""The worker on every broker: what a user sees end to end, whatever the broker.

The broker contract checks the Broker methods one by one; this suite runs real in-process
workers on each backend's broker and storage (the harnesses in conftest.py) and checks
the behaviours issue 5 lists: retries with backoff, dead letters after the last retry,
poison messages, graceful stop, and two workers never both finishing one task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qtasks import QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.message import Envelope, new_uuid
from qtasks.retry import Backoff
from qtasks.runtime.worker import Worker

from .conftest import Harness


@dataclasses.dataclass
class Apps:
    """Apps on one backend: `make()` builds another app sharing its queues and results."""

    harness: Harness
    config: QueueConfig
    built: list[QueueTasks] = dataclasses.field(default_factory=list)
    workers: list[Worker] = dataclasses.field(default_factory=list)
    storage: Any = None
    first_broker: Any = None

    def make(self) -> QueueTasks:
        if self.storage is None:
            self.storage = self.harness.storage(self.config)
        if self.first_broker is None:
            broker = self.first_broker = self.harness.broker(self.config)
        else:  # the same instance where a backend has one consumer per process (memory)
            broker = self.harness.peer_broker(self.first_broker, self.config)
        app = QueueTasks(
            "contract",
            broker=broker,
            storage=self.storage,
            global_config=self.harness.global_config(self.config),
            config=self.config,
        )
        self.built.append(app)
        return app

    async def worker(self, app: QueueTasks, concurrency: int = 4) -> Worker:
        await app.start()
        worker = Worker(concurrency=concurrency)
        await worker.start(app)
        self.workers.append(worker)
        return worker


@pytest.fixture
async def apps(broker_harness: Harness, qconfig: QueueConfig) -> AsyncIterator[Apps]:
    qconfig.default_retry_backoff_seconds = 0.05
    qconfig.graceful_shutdown_seconds = 5.0
    made = Apps(broker_harness, qconfig)
    try:
        yield made
    finally:
        for worker in made.workers:
            await worker.stop(0)
        for app in made.built:
            await app.stop()


async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.05)


async def test_retries_with_backoff_then_success(apps: Apps) -> None:
    app = apps.make()
    runs: list[float] = []

    @app.task(retry=3, retry_backoff=Backoff(base_seconds=0.2, factor=2.0, jitter=0.1))
    async def flaky() -> str:
        runs.append(time.monotonic())
        if len(runs) < 3:
            raise ConnectionError("try again")
        return "done"

    record = await flaky.add_task()
    await apps.worker(app)
    final = await app.wait(record.uuid, 30)
    assert (final.status, final.returning, final.attempts) == (TaskStatusEnum.SUCCESS, "done", 3)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    # Never early (jitter is ±10%); late by at most the broker's delay granularity.
    assert 0.2 * 0.9 - 0.01 <= gaps[0] < 0.2 + 2.0
    assert 0.4 * 0.9 - 0.01 <= gaps[1] < 0.4 + 2.0
    assert await app.dead_letters() == []


async def test_dead_letter_after_the_last_retry(apps: Apps) -> None:
    # More retries than max_deliveries: a retry is a new attempt, not a redelivery (every
    # broker used to carry the count over, and ended the task WorkerLost after 2 runs).
    apps.config.max_deliveries = 2
    app = apps.make()
    runs = 0

    @app.task(retry=3, retry_backoff=0.05)
    async def hopeless() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("never works")

    record = await hopeless.add_task()
    await apps.worker(app)
    final = await app.wait(record.uuid, 30)
    assert (final.status, final.error_type) == (TaskStatusEnum.ERROR, "ValueError")
    assert runs == 4

    async def letter_there() -> bool:
        return bool(await app.dead_letters())

    await until(letter_there, 10)
    (letter,) = await app.dead_letters()
    assert (letter.uuid, letter.reason) == (str(record.uuid), "failed")
    assert "ValueError: never works" in letter.detail


async def test_poison_message_is_set_aside_and_the_worker_goes_on(apps: Apps) -> None:
    app = apps.make()
    done: list[int] = []

    @app.task
    async def job(n: int) -> None:
        done.append(n)

    await app.start()
    poison = Envelope(str(new_uuid()), "default", 0, None, time.time(), b"\x00{not json")
    await app.broker.publish([poison])
    records = [await job.add_task(n) for n in range(20)]
    await apps.worker(app)
    for r in records:
        assert (await app.wait(r.uuid, 30)).status is TaskStatusEnum.SUCCESS

    async def letter_there() -> bool:
        return bool(await app.dead_letters())

    await until(letter_there, 10)
    (letter,) = await app.dead_letters()
    assert letter.body == b"\x00{not json"
    assert letter.reason != "failed"
    assert sorted(done) == list(range(20))


async def test_graceful_stop_returns_unstarted_work(apps: Apps) -> None:
    started: list[int] = []
    finished: list[int] = []
    first, second = apps.make(), apps.make()
    for app in (first, second):

        @app.task(name="slow")
        async def slow(n: int) -> None:
            started.append(n)
            await asyncio.sleep(0.3)
            finished.append(n)

    records = [await first.add_task("slow", n) for n in range(12)]
    worker = await apps.worker(first, concurrency=2)

    async def two_running() -> bool:
        return len(started) >= 2

    await until(two_running, 20)
    await worker.stop(grace_seconds=5)
    assert sorted(finished) == sorted(started), "running tasks finished within the grace"
    assert len(started) < 12, "the rest was not started"

    await apps.worker(second, concurrency=4)
    for r in records:
        assert (await second.wait(r.uuid, 60)).status is TaskStatusEnum.SUCCESS
    runs = Counter(started)
    assert set(runs) == set(range(12))
    assert max(runs.values()) == 1, "nothing ran twice"


async def test_two_workers_never_both_finish_a_task(apps: Apps) -> None:
    runs: Counter[int] = Counter()
    one, two = apps.make(), apps.make()
    for app in (one, two):

        @app.task(name="count")
        async def count(n: int) -> None:
            runs[n] += 1
            await asyncio.sleep(0)

    total = 300
    await one.add_tasks([("count", (n,)) for n in range(total)])
    await apps.worker(one, concurrency=8)
    await apps.worker(two, concurrency=8)

    async def all_ran() -> bool:
        return sum(runs.values()) >= total

    await until(all_ran, 60)
    await asyncio.sleep(0.5)  # a duplicate would show up now
    assert set(runs) == set(range(total))
    assert max(runs.values()) == 1


async def test_an_at_most_once_task_given_up_on_is_not_started_again(apps: Apps) -> None:
    # The first worker's grace runs out: its running task is cancelled and its message
    # goes back. An at-least-once task would start over on the next worker; this one is
    # dead-lettered worker_lost instead, and its neighbours still run.
    started: list[int] = []
    first, second = apps.make(), apps.make()
    for app in (first, second):

        @app.task(name="pay", at_most_once=True)
        async def pay(n: int) -> None:
            started.append(n)
            await asyncio.sleep(30 if n == 0 else 0)

    stuck = await first.add_task("pay", 0)
    worker = await apps.worker(first, concurrency=1)

    async def running() -> bool:
        return started == [0]

    await until(running, 20)
    others = [await first.add_task("pay", n) for n in range(1, 4)]
    await worker.stop(grace_seconds=0.1)

    await apps.worker(second, concurrency=2)
    final = await second.wait(stuck.uuid, 60)
    assert (final.status, final.error_type) == (TaskStatusEnum.ERROR, "TaskInterrupted")
    for r in others:
        assert (await second.wait(r.uuid, 60)).status is TaskStatusEnum.SUCCESS
    assert sorted(started) == [0, 1, 2, 3], "each started once"

    async def letter_there() -> bool:
        return bool(await second.dead_letters())

    await until(letter_there, 10)
    (letter,) = await second.dead_letters()
    assert (letter.uuid, letter.reason) == (str(stuck.uuid), "worker_lost")
