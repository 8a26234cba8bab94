"""Routers: tasks declared without an app, included later, with shared options and plugins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from qtasks import ConfigurationError, QueueTasks, Router, TaskAlreadyRegistered, TaskStatusEnum
from qtasks.asyncio import QueueTasks as AsyncQueueTasks
from qtasks.plugins.base import BasePlugin
from qtasks.runtime.worker import Worker


class Replace(BasePlugin):
    """Replaces one trigger's payload with a function of it."""

    def __init__(self, trigger: str, change: Any, name: str) -> None:
        super().__init__(name)
        self.handlers = {trigger: change}


def test_router_task_runs_locally_and_refuses_add_task_until_included() -> None:
    router = Router()

    @router.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add(1, 2) == 3
    with pytest.raises(ConfigurationError, match="include_router"):
        add.add_task(1, 2)


async def test_included_router_tasks_take_router_defaults_and_run(
    app: AsyncQueueTasks, run_until_idle: Callable[..., Awaitable[Worker]]
) -> None:
    router = Router(queue="default", priority=7, tags=["billing"])

    @router.task
    def charge(amount: int) -> int:
        return amount * 100

    @router.task(priority=1)
    async def refund(amount: int) -> int:
        return -amount

    app.include_router(router)
    assert app.tasks["charge"].priority == 7
    assert app.tasks["refund"].priority == 1  # the task's own option wins
    assert app.tasks["charge"].tags == ("billing",)
    a = await charge.add_task(3)
    b = await refund.add_task(2)
    assert a.priority == 7
    await run_until_idle(app)
    assert (await app.get(a.uuid)).returning == 300  # type: ignore[union-attr]
    assert (await app.get(b.uuid)).returning == -2  # type: ignore[union-attr]


async def test_router_plugins_run_before_the_tasks_own(
    app: AsyncQueueTasks, run_until_idle: Callable[..., Awaitable[Worker]]
) -> None:
    plus_one = Replace("task_executor_run_task", lambda result, **_: {"result": result + 1}, "p1")
    times_ten = Replace(
        "task_executor_run_task", lambda result, **_: {"result": result * 10}, "x10"
    )
    router = Router(plugins=[plus_one])

    @router.task(plugins=[times_ten])
    def five() -> int:
        return 5

    app.include_router(router)
    record = await five.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status == TaskStatusEnum.SUCCESS
    assert final.returning == 60  # (5 + 1) * 10: the router's plugin first


def test_a_name_clash_registers_none_of_the_routers_tasks() -> None:
    app = AsyncQueueTasks(broker_url="memory://")

    @app.task
    def taken() -> None:
        return None

    router = Router()

    @router.task
    def fresh() -> None:
        return None

    @router.task(name="taken")
    def other() -> None:
        return None

    with pytest.raises(TaskAlreadyRegistered):
        app.include_router(router)
    assert "fresh" not in app.tasks


def test_duplicate_names_in_one_router_and_double_include_are_errors() -> None:
    router = Router()

    @router.task
    def job() -> None:
        return None

    with pytest.raises(ConfigurationError, match="already has a task named 'job'"):
        router.task(name="job")(lambda: None)
    first = AsyncQueueTasks(broker_url="memory://")
    first.include_router(router)
    second = AsyncQueueTasks(broker_url="memory://")
    with pytest.raises(ConfigurationError, match="already included"):
        second.include_router(router)


def test_sync_app_includes_a_router_and_enqueues_through_it() -> None:
    app = QueueTasks(broker_url="memory://")
    router = Router()

    @router.task
    def hello(name: str) -> str:
        return f"hello {name}"

    app.include_router(router)
    try:
        record = hello.add_task("qtasks")
        assert record.status == TaskStatusEnum.NEW
        assert app.get(record.uuid) is not None
    finally:
        app.close()


async def test_router_generator_task_streams_its_steps(app: AsyncQueueTasks) -> None:
    router = Router()

    @router.task
    async def count(n: int) -> Any:
        for i in range(n):
            yield i

    app.include_router(router)
    await app.start()
    worker = Worker()
    await worker.start(app)
    try:
        steps = [step async for step in count.stream(3, timeout=10)]
    finally:
        await worker.stop()
    assert steps == [0, 1, 2]
