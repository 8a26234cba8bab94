"""The task context (echo=True) and middlewares that change arguments and results."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qtasks import TaskContext, TaskMiddleware, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.executors import TaskExecutor

from .plugin_backends import BACKENDS, app_on, run_tasks


@pytest.fixture(params=BACKENDS)
async def backend_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueTasks]:
    """An async app on each backend in turn."""
    async with app_on(request.param, tmp_path) as app:
        yield app


async def test_the_context_of_an_async_task(
    backend_app: QueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    app = backend_app

    @app.task
    def child(x: int) -> int:
        return x * 2

    @app.task(echo=True, retry=1, retry_backoff=0.0, team="billing")
    async def parent(ctx: TaskContext, x: int) -> dict[str, Any]:
        if ctx.attempt == 0:
            raise RuntimeError("first attempt fails")
        ctx.logger.info("running")
        sub = await ctx.add_task("child", x)
        assert sub is not None
        await ctx.sleep(0)
        return {
            "uuid": ctx.uuid,
            "name": ctx.name,
            "attempt": ctx.attempt,
            "team": ctx.metadata["team"],
            "headers": ctx.headers,
            "queue": ctx.queue,
            "components": [
                ctx.broker is app.broker,
                ctx.storage is app.storage,
                ctx.global_config is app.global_config,
                ctx.get_component("worker") is ctx.worker is not None,
                ctx.get_component("broker") is app.broker,
            ],
            "child": str(sub.uuid),
            "self": (await ctx.get_task(ctx.uuid)).status.value,  # type: ignore[union-attr]
        }

    with caplog.at_level(logging.INFO, logger="qtasks.task.parent"):
        record = await parent.add_task(4, headers={"trace": "t-1"})
        (final,) = await run_tasks(app, [record])
        child_record = await app.wait(final.returning["child"], 10)
    got = final.returning
    assert (got["uuid"], got["name"], got["attempt"]) == (str(record.uuid), "parent", 1)
    assert (got["team"], got["headers"], got["queue"]) == ("billing", {"trace": "t-1"}, "default")
    assert got["components"] == [True] * 5
    assert got["self"] in ("new", "process", "retry")  # its own record while it runs
    assert child_record.returning == 8
    assert f"[parent {record.uuid}] running" in caplog.text


async def test_the_context_of_a_sync_task_blocks_instead(app: QueueTasks, run_until_idle) -> None:
    @app.task
    def child() -> str:
        return "child"

    @app.task(echo=True)
    def parent(ctx: TaskContext) -> str:
        sub = ctx.add_task("child")  # a record, not a coroutine, in a worker thread
        ctx.sleep(0)
        seen = ctx.get_task(ctx.uuid)
        return f"{type(sub).__name__}/{type(seen).__name__}"

    record = await parent.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == "Task/Task"


async def test_cancel_from_the_context(app: QueueTasks, run_until_idle) -> None:
    @app.task(echo=True)
    async def job(ctx: TaskContext) -> None:
        ctx.cancel("not needed")

    record = await job.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert (final.status, final.error_message) == (TaskStatusEnum.CANCEL, "not needed")


# -- middlewares -------------------------------------------------------------------------------


class Scale(TaskMiddleware):
    """Multiplies every positional argument before the call."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    async def before(self, executor: TaskExecutor) -> None:
        executor.args = [a * self.factor for a in executor.args]


class Label(TaskMiddleware):
    """Wraps the result after the call."""

    async def after(self, executor: TaskExecutor, result: Any) -> Any:
        return {"task": executor.task.name, "result": result}


async def test_middlewares_change_arguments_and_results(backend_app: QueueTasks) -> None:
    app = backend_app
    app.add_middleware(Label)

    @app.task(middlewares_before=[Scale(10)])
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def same(x: int) -> int:
        return x

    a, b = await run_tasks(app, [await add.add_task(1, 2), await same.add_task(5)])
    assert a.returning == {"task": "add", "result": 30}
    assert b.returning == {"task": "same", "result": 5}
