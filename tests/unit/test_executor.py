"""TaskExecutor: how one task runs (kinds, generators, middlewares, replacing the executor)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import uuid as uuid_module
from typing import Any

import pytest

from qtasks import TaskContext, TaskMessage, TaskMiddleware, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.executors import ArgumentsMismatch, Outcome, OutcomeKind, TaskExecutor

# -- running one executor directly ---------------------------------------------------------


def _executor(app: QueueTasks, task_name: str, /, *args: Any, attempt: int = 0, **kwargs: Any):
    """An executor for one run of a registered task, as the worker would build it."""
    definition = app.tasks[task_name]
    message = TaskMessage(
        uuid=uuid_module.uuid4(), name=task_name, args=list(args), kwargs=kwargs, attempt=attempt
    )
    cls = definition.executor or app.executor_class
    return cls(definition, message, app)


async def test_run_returns_a_success_outcome(app: QueueTasks) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    outcome = await _executor(app, "add", 1, y=2).run()
    assert outcome == Outcome(OutcomeKind.SUCCESS, result=3)


async def test_run_never_raises_task_errors(app: QueueTasks) -> None:
    @app.task
    def broken() -> None:
        raise LookupError("gone")

    outcome = await _executor(app, "broken").run()
    assert outcome.kind is OutcomeKind.ERROR
    assert outcome.error_type == "LookupError"
    assert outcome.error_message == "gone"
    assert outcome.traceback is not None
    assert "LookupError: gone" in outcome.traceback


async def test_arguments_mismatch_is_reported_and_not_retried(app: QueueTasks) -> None:
    @app.task(retry=5)
    async def add(x: int, y: int) -> int:
        return x + y

    executor = _executor(app, "add", 1)
    with pytest.raises(ArgumentsMismatch, match="do not fit"):
        await executor.prepare_args()
    outcome = await _executor(app, "add", 1).run()
    assert outcome.kind is OutcomeKind.ERROR
    assert outcome.error_type == "ArgumentsMismatch"


async def test_failure_decides_retry_from_the_attempt(app: QueueTasks) -> None:
    @app.task(retry=2, retry_backoff=7.0)
    async def flaky() -> None:
        raise ValueError("x")

    first = await _executor(app, "flaky", attempt=0).run()
    last = await _executor(app, "flaky", attempt=2).run()
    assert first.kind is OutcomeKind.RETRY
    assert first.retry_delay == 7.0
    assert last.kind is OutcomeKind.ERROR


# -- sync functions ------------------------------------------------------------------------


async def test_sync_function_runs_in_a_thread(app: QueueTasks, run_until_idle) -> None:
    loop_thread = threading.get_ident()

    @app.task
    def where() -> int:
        return threading.get_ident()

    @app.task
    async def where_async() -> int:
        return threading.get_ident()

    sync_record = await where.add_task()
    async_record = await where_async.add_task()
    await run_until_idle(app)
    assert (await app.get(sync_record.uuid)).returning != loop_thread
    assert (await app.get(async_record.uuid)).returning == loop_thread


async def test_sync_function_does_not_block_the_loop(app: QueueTasks, run_until_idle) -> None:
    gate = threading.Event()

    @app.task(priority=0)
    def blocker() -> bool:
        return gate.wait(5)  # True only if the async task ran meanwhile

    @app.task(priority=1)
    async def opener() -> str:
        gate.set()
        return "opened"

    blocked = await blocker.add_task()
    opened = await opener.add_task()
    await run_until_idle(app, concurrency=2)
    assert (await app.get(opened.uuid)).returning == "opened"
    assert (await app.get(blocked.uuid)).returning is True


async def test_sync_function_sees_the_callers_contextvars(app: QueueTasks) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")

    @app.task(echo=True)
    def job(ctx: TaskContext) -> Any:
        from qtasks.context import current_context

        return [var.get("unset"), current_context.get().uuid == ctx.uuid]

    var.set("copied")
    outcome = await _executor(app, "job").run()
    assert outcome.result == ["copied", True]


async def test_sync_kwargs_reach_the_function(app: QueueTasks) -> None:
    @app.task
    def greet(greeting: str, *, name: str) -> str:
        return f"{greeting}, {name}"

    outcome = await _executor(app, "greet", "hi", name="Ann").run()
    assert outcome.result == "hi, Ann"


# -- generators ----------------------------------------------------------------------------


async def test_handler_result_is_sent_back_into_the_generator(app: QueueTasks) -> None:
    seen: list[Any] = []

    def on_step(value: str) -> str:
        seen.append(value)
        return value.upper()

    @app.task(generate_handler=on_step)
    def steps() -> Any:
        first = yield "step1"
        second = yield f"got {first}"
        return [first, second]

    outcome = await _executor(app, "steps").run()
    assert seen == ["step1", "got STEP1"]
    assert outcome.result == ["STEP1", "GOT STEP1"]


async def test_generator_without_return_gives_the_handler_results(
    app: QueueTasks, run_until_idle
) -> None:
    @app.task(generate_handler=lambda v: v * 10)
    def numbers() -> Any:
        yield 1
        yield 2
        yield 3

    record = await numbers.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning == [10, 20, 30]


async def test_generator_without_handler_gives_the_yielded_values(app: QueueTasks) -> None:
    @app.task
    def numbers(n: int) -> Any:
        yield from range(n)  # plain iteration: delegating to an iterator must work

    assert (await _executor(app, "numbers", 3).run()).result == [0, 1, 2]


async def test_without_handler_yield_gives_none_like_plain_iteration(app: QueueTasks) -> None:
    received: list[Any] = []

    @app.task
    async def agen() -> Any:
        for i in range(2):
            received.append((yield i))

    assert (await _executor(app, "agen").run()).result == [0, 1]
    assert received == [None, None]


async def test_max_time_on_a_sync_generator_is_a_timeout(app: QueueTasks) -> None:
    release = threading.Event()

    @app.task(max_time=0.05, generate_handler=lambda v: v)
    def steps() -> Any:
        yield 1
        release.wait(10)  # blocks the thread during the second step
        yield 2

    try:
        outcome = await _executor(app, "steps").run()
    finally:
        release.set()
    assert outcome.kind is OutcomeKind.ERROR
    assert outcome.error_type == "TaskTimeout"


async def test_sync_generator_runs_in_a_thread(app: QueueTasks) -> None:
    loop_thread = threading.get_ident()

    @app.task
    def where() -> Any:
        yield threading.get_ident()

    (ident,) = (await _executor(app, "where").run()).result
    assert ident != loop_thread


async def test_async_generator_with_async_handler(app: QueueTasks, run_until_idle) -> None:
    received: list[Any] = []

    async def on_step(value: int) -> int:
        await asyncio.sleep(0)
        return value + 100

    @app.task(generate_handler=on_step)
    async def counter() -> Any:
        for i in range(3):
            back = yield i
            received.append(back)

    record = await counter.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == [100, 101, 102]
    assert received == [100, 101, 102]


async def test_sync_generator_with_async_handler(app: QueueTasks) -> None:
    async def on_step(value: str) -> str:
        return value * 2

    @app.task(generate_handler=on_step)
    def steps() -> Any:
        value = yield "ab"
        return value

    assert (await _executor(app, "steps").run()).result == "abab"


async def test_generator_error_is_a_task_error(app: QueueTasks) -> None:
    @app.task(generate_handler=lambda v: v)
    def steps() -> Any:
        yield 1
        raise RuntimeError("half way")

    outcome = await _executor(app, "steps").run()
    assert outcome.kind is OutcomeKind.ERROR
    assert outcome.error_message == "half way"


async def test_handler_error_closes_the_generator(app: QueueTasks) -> None:
    closed: list[bool] = []

    def on_step(value: int) -> int:
        raise ValueError("handler failed")

    @app.task(generate_handler=on_step)
    def steps() -> Any:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    outcome = await _executor(app, "steps").run()
    assert outcome.kind is OutcomeKind.ERROR
    assert outcome.error_type == "ValueError"
    assert closed == [True]


# -- replacing the executor ----------------------------------------------------------------


class Doubling(TaskExecutor):
    async def execute(self) -> Any:
        result = await super().execute()
        return result * 2


async def test_per_task_executor_changes_the_result(app: QueueTasks, run_until_idle) -> None:
    @app.task(executor=Doubling)
    async def special(x: int) -> int:
        return x

    record = await special.add_task(21)
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == 42


async def test_app_wide_executor(make_app, run_until_idle) -> None:
    app = make_app(executor=Doubling)

    class Tripling(TaskExecutor):
        async def execute(self) -> Any:
            return (await super().execute()) * 3

    @app.task
    def a() -> int:
        return 5

    @app.task(executor=Tripling)
    def b() -> int:
        return 5

    ra = await a.add_task()
    rb = await b.add_task()
    await run_until_idle(app)
    assert (await app.get(ra.uuid)).returning == 10
    assert (await app.get(rb.uuid)).returning == 15  # the task's own executor wins


async def test_executor_step_override(app: QueueTasks) -> None:
    class Prefixing(TaskExecutor):
        async def handle_yield(self, value: Any) -> Any:
            return f"step:{await super().handle_yield(value)}"

    @app.task(executor=Prefixing)
    def steps() -> Any:
        yield "a"
        yield "b"

    assert (await _executor(app, "steps").run()).result == ["step:a", "step:b"]


def test_async_task_executor_is_the_same_class() -> None:
    from qtasks.executors import AsyncTaskExecutor

    assert AsyncTaskExecutor is TaskExecutor


# -- middlewares ---------------------------------------------------------------------------


class AddOne(TaskMiddleware):
    async def before(self, executor: TaskExecutor) -> None:
        executor.args = [a + 1 for a in executor.args]


class Wrap(TaskMiddleware):
    def __init__(self, label: str = "wrapped") -> None:
        self.label = label

    async def after(self, executor: TaskExecutor, result: Any) -> Any:
        return {self.label: result}


async def test_middlewares_change_arguments_and_result(app: QueueTasks, run_until_idle) -> None:
    @app.task(middlewares_before=[AddOne], middlewares_after=[Wrap()])
    def add(x: int, y: int) -> int:
        return x + y

    record = await add.add_task(1, 2)
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == {"wrapped": 5}


async def test_middleware_may_change_kwargs(app: QueueTasks) -> None:
    class Shout(TaskMiddleware):
        async def before(self, executor: TaskExecutor) -> None:
            executor.kwargs = {**executor.kwargs, "text": executor.kwargs["text"].upper()}

    @app.task(middlewares_before=[Shout()])
    async def say(*, text: str) -> str:
        return text

    assert (await _executor(app, "say", text="hi").run()).result == "HI"


async def test_app_middlewares_wrap_the_task_ones(app: QueueTasks) -> None:
    calls: list[str] = []

    class Trace(TaskMiddleware):
        def __init__(self, label: str) -> None:
            self.label = label

        async def before(self, executor: TaskExecutor) -> None:
            calls.append(f"before:{self.label}")

        async def after(self, executor: TaskExecutor, result: Any) -> Any:
            calls.append(f"after:{self.label}")
            return [*result, self.label]

    app.add_middleware(Trace("app1"))
    app.add_middleware(Trace("app2"))

    @app.task(middlewares_before=[Trace("task")], middlewares_after=[Trace("task")])
    async def job() -> list[str]:
        calls.append("call")
        return []

    outcome = await _executor(app, "job").run()
    assert calls == [
        "before:app1",
        "before:app2",
        "before:task",
        "call",
        "after:task",
        "after:app2",
        "after:app1",
    ]
    assert outcome.result == ["task", "app2", "app1"]


async def test_middleware_sees_the_context_of_echo_tasks(app: QueueTasks) -> None:
    class CheckCtx(TaskMiddleware):
        async def before(self, executor: TaskExecutor) -> None:
            assert isinstance(executor.args[0], TaskContext)
            executor.args = [executor.args[0], "from middleware"]

    @app.task(echo=True, middlewares_before=[CheckCtx()])
    async def job(ctx: TaskContext, value: str) -> str:
        return value

    assert (await _executor(app, "job", "original").run()).result == "from middleware"
