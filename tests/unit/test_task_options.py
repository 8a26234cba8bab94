"""`@app.task` options and what they do when a worker runs the task (memory://)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid as uuid_module
from typing import Any

import pytest

from qtasks import Backoff, Retry, TaskContext, TaskMessage, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.context import current_context
from qtasks.executors import TaskExecutor

# -- metadata ------------------------------------------------------------------------------


def test_tags_description_and_unknown_keywords_become_metadata(app: QueueTasks) -> None:
    @app.task(tags=["billing", "slow"], description="Charge a card.", owner="team-a", sla=5)
    def charge() -> None: ...

    definition = app.tasks["charge"]
    assert definition.tags == ("billing", "slow")
    assert definition.description == "Charge a card."
    assert definition.metadata == {"owner": "team-a", "sla": 5}
    assert charge.__doc__ == "Charge a card."


def test_description_defaults_to_the_docstring(app: QueueTasks) -> None:
    @app.task
    def documented() -> None:
        """Does a thing."""

    assert app.tasks["documented"].description == "Does a thing."
    assert app.tasks["documented"].metadata == {}


async def test_metadata_reaches_the_task_context(app: QueueTasks, run_until_idle) -> None:
    @app.task(echo=True, owner="team-a")
    async def job(ctx: TaskContext) -> Any:
        return ctx.metadata

    record = await job.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == {"owner": "team-a"}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"retry": -1}, ValueError, "retry must be >= 0"),
        ({"max_time": 0}, ValueError, "max_time must be > 0"),
        ({"retry_on_exc": [int]}, TypeError, "not an exception"),
        ({"generate_handler": 5}, TypeError, "generate_handler must be callable"),
        ({"executor": object}, TypeError, "TaskExecutor subclass"),
        ({"middlewares_before": [object()]}, TypeError, "not a TaskMiddleware"),
    ],
)
def test_bad_options_are_rejected_at_registration(
    app: QueueTasks, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    def job() -> None: ...

    with pytest.raises(error, match=match):
        app.task(**options)(job)
    assert "job" not in app.tasks


def test_echo_needs_a_positional_first_parameter(app: QueueTasks) -> None:
    def no_params() -> None: ...

    def kw_only(*, ctx: Any) -> None: ...

    for func in (no_params, kw_only):
        with pytest.raises(TypeError, match="echo=True"):
            app.task(echo=True)(func)


async def test_echo_task_arguments_are_checked_without_the_context(app: QueueTasks) -> None:
    @app.task(echo=True)
    async def job(ctx: TaskContext, x: int) -> None: ...

    await job.add_task(1)
    with pytest.raises(TypeError):
        await job.add_task()
    with pytest.raises(TypeError):
        await job.add_task(1, 2)


# -- priority ------------------------------------------------------------------------------


async def test_lower_priority_runs_first(app: QueueTasks, run_until_idle) -> None:
    order: list[str] = []

    @app.task
    async def job(label: str) -> None:
        order.append(label)

    @app.task(priority=-5)
    async def urgent(label: str) -> None:
        order.append(label)

    await job.add_task("p5", priority=5)
    await job.add_task("p0-first")
    await job.add_task("p9", priority=9)
    await urgent.add_task("task-default-p-5")
    await job.add_task("p0-second")
    await job.add_task("p1", priority=1)
    await run_until_idle(app, concurrency=1)

    assert order == ["task-default-p-5", "p0-first", "p0-second", "p1", "p5", "p9"]


# -- retry ---------------------------------------------------------------------------------


async def test_retry_on_listed_exception_until_retries_run_out(
    make_app, run_until_idle, recording_storage
) -> None:
    app = make_app(storage=recording_storage)
    attempts: list[int] = []

    @app.task(retry=2, retry_on_exc=[ValueError], retry_backoff=0.0, echo=True)
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("nope")

    record = await flaky.add_task()
    await run_until_idle(app)

    final = await app.get(record.uuid)
    assert attempts == [0, 1, 2]
    assert final.status is TaskStatusEnum.ERROR
    assert final.attempts == 3
    assert final.error_type == "ValueError"
    assert final.error_message == "nope"
    assert "ValueError: nope" in (final.traceback or "")
    statuses = recording_storage.statuses(record.uuid)
    assert statuses.count(TaskStatusEnum.RETRY) == 2
    assert statuses[-1] is TaskStatusEnum.ERROR


async def test_other_exceptions_fail_at_once(app: QueueTasks, run_until_idle) -> None:
    calls: list[int] = []

    @app.task(retry=3, retry_on_exc=[ValueError], retry_backoff=0.0)
    async def broken() -> None:
        calls.append(1)
        raise KeyError("missing")

    record = await broken.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert calls == [1]
    assert final.status is TaskStatusEnum.ERROR
    assert final.error_type == "KeyError"
    assert final.attempts == 1


async def test_retry_without_retry_on_exc_retries_any_exception(
    app: QueueTasks, run_until_idle
) -> None:
    calls: list[int] = []

    @app.task(retry=2, retry_backoff=0.0)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("transient")
        return "finally"

    record = await flaky.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning == "finally"
    assert final.attempts == 3
    assert final.error_type is None  # a success clears the last attempt's error


async def test_no_retry_by_default(app: QueueTasks, run_until_idle) -> None:
    calls: list[int] = []

    @app.task
    async def broken() -> None:
        calls.append(1)
        raise RuntimeError("x")

    record = await broken.add_task()
    await run_until_idle(app)
    assert calls == [1]
    assert (await app.get(record.uuid)).status is TaskStatusEnum.ERROR


async def test_retry_raised_by_the_task_asks_for_another_attempt(
    app: QueueTasks, run_until_idle
) -> None:
    @app.task(retry=1, retry_on_exc=[KeyError], retry_backoff=0.0, echo=True)
    async def job(ctx: TaskContext) -> int:
        if ctx.attempt == 0:
            raise Retry("not yet", delay=0.0)  # not in retry_on_exc, still retried
        return ctx.attempt

    record = await job.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning == 1


async def _first_retry_record(
    make_app, recording_storage, running_worker, publish_message=None, attempt: int = 0, **options
):
    """Run a task that always fails until its first retry record is saved; return it."""
    app = make_app(storage=recording_storage)

    @app.task(retry=5, **options)
    async def failing() -> None:
        raise ValueError("boom")

    async with running_worker(app, grace_seconds=0):
        if attempt == 0:
            record = await failing.add_task()
            task_id = record.uuid
        else:
            message = TaskMessage(
                uuid=uuid_module.uuid4(), name="failing", attempt=attempt, created_at=time.time()
            )
            await publish_message(app, message)
            task_id = message.uuid
        retry = await recording_storage.wait_for(
            lambda t: t.uuid == task_id and t.status is TaskStatusEnum.RETRY
        )
    sizes = await app.broker.queue_sizes(["default"])
    return retry, sizes


async def test_backoff_policy_sets_the_retry_eta(
    make_app, recording_storage, running_worker
) -> None:
    retry, sizes = await _first_retry_record(
        make_app,
        recording_storage,
        running_worker,
        retry_backoff=Backoff(base_seconds=60, factor=3, jitter=0),
    )
    assert retry.attempts == 1
    assert retry.finished_at is None
    assert retry.error_type == "ValueError"
    assert retry.started_at is not None
    assert retry.eta is not None
    assert 60 <= retry.eta - retry.started_at < 62
    assert sizes == {"default": 1}  # the next attempt waits on the broker


async def test_backoff_grows_with_the_attempt(
    make_app, recording_storage, running_worker, publish_message
) -> None:
    retry, _ = await _first_retry_record(
        make_app,
        recording_storage,
        running_worker,
        publish_message,
        attempt=2,
        retry_backoff=Backoff(base_seconds=10, factor=3, jitter=0),
    )
    assert retry.attempts == 3
    assert 90 <= retry.eta - retry.started_at < 92  # third retry: 10 * 3**2


async def test_constant_backoff(make_app, recording_storage, running_worker) -> None:
    retry, _ = await _first_retry_record(
        make_app, recording_storage, running_worker, retry_backoff=45
    )
    assert 45 <= retry.eta - retry.started_at < 47


async def test_callable_backoff_gets_the_retry_number(
    make_app, recording_storage, running_worker
) -> None:
    seen: list[int] = []

    def policy(n: int) -> float:
        seen.append(n)
        return 100.0 * n

    retry, _ = await _first_retry_record(
        make_app, recording_storage, running_worker, retry_backoff=policy
    )
    assert seen == [1]
    assert 100 <= retry.eta - retry.started_at < 102


async def test_default_backoff_follows_the_config(
    make_app, recording_storage, running_worker
) -> None:
    from qtasks import QueueConfig

    app = make_app(storage=recording_storage, config=QueueConfig(default_retry_backoff_seconds=50))

    @app.task(retry=1)
    async def failing() -> None:
        raise ValueError("boom")

    async with running_worker(app, grace_seconds=0):
        record = await failing.add_task()
        retry = await recording_storage.wait_for(lambda t: t.status is TaskStatusEnum.RETRY)
    assert retry.uuid == record.uuid
    assert 44 <= retry.eta - retry.started_at < 56  # 50s ± 10% jitter


async def test_retry_delay_raised_by_the_task_wins_over_the_policy(
    make_app, recording_storage, running_worker
) -> None:
    app = make_app(storage=recording_storage)

    @app.task(retry=2, retry_backoff=1000.0)
    async def job() -> None:
        raise Retry("later", delay=42)

    async with running_worker(app, grace_seconds=0):
        record = await job.add_task()
        retry = await recording_storage.wait_for(lambda t: t.status is TaskStatusEnum.RETRY)
    assert retry.uuid == record.uuid
    assert retry.error_type == "Retry"
    assert 42 <= retry.eta - retry.started_at < 44


# -- max_time ------------------------------------------------------------------------------


async def test_max_time_really_cancels_an_async_task(app: QueueTasks, run_until_idle) -> None:
    after_sleep: list[bool] = []
    cancelled = asyncio.Event()

    @app.task(max_time=0.05)
    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        after_sleep.append(True)

    record = await slow.add_task()
    started = time.monotonic()
    await run_until_idle(app)
    assert time.monotonic() - started < 5

    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.ERROR
    assert final.error_type == "TaskTimeout"
    assert "max_time=0.05" in (final.error_message or "")
    assert cancelled.is_set()
    assert after_sleep == []


async def test_max_time_on_a_sync_task_frees_the_slot(app: QueueTasks, run_until_idle) -> None:
    release = threading.Event()
    order: list[str] = []

    @app.task(max_time=0.05, priority=0)
    def blocking() -> str:
        order.append("blocking")
        release.wait(30)  # longer than run_until_idle waits
        order.append("blocking returned")
        return "late"

    @app.task(priority=1)
    async def next_one() -> str:
        order.append("next")
        return "ran"

    slow_record = await blocking.add_task()
    next_record = await next_one.add_task()
    try:
        await run_until_idle(app, concurrency=1)
        slow_final = await app.get(slow_record.uuid)
        next_final = await app.get(next_record.uuid)
        assert slow_final.status is TaskStatusEnum.ERROR
        assert slow_final.error_type == "TaskTimeout"
        assert next_final.status is TaskStatusEnum.SUCCESS
        assert order == ["blocking", "next"]  # the function is still blocked: the slot was freed
    finally:
        release.set()


async def test_task_within_max_time_succeeds(app: QueueTasks, run_until_idle) -> None:
    @app.task(max_time=5)
    def quick() -> int:
        return 1

    record = await quick.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == 1


async def test_timeout_can_be_retried(app: QueueTasks, run_until_idle) -> None:
    calls: list[int] = []

    @app.task(max_time=0.02, retry=1, retry_on_exc=[TimeoutError], retry_backoff=0.0)
    async def slow_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(30)
        return "second time"

    record = await slow_once.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.returning == "second time"
    assert final.attempts == 2


# -- echo ----------------------------------------------------------------------------------


async def test_echo_passes_the_context_first(app: QueueTasks, run_until_idle) -> None:
    seen: dict[str, Any] = {}

    @app.task(echo=True)
    async def job(ctx: TaskContext, x: int) -> int:
        seen["ctx"] = ctx
        seen["uuid"] = ctx.uuid
        seen["name"] = ctx.name
        seen["attempt"] = ctx.attempt
        seen["current"] = current_context.get()
        ctx.logger.info("working on %d", x)
        return x * 2

    record = await job.add_task(21)
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == 42
    assert isinstance(seen["ctx"], TaskContext)
    assert seen["uuid"] == str(record.uuid)
    assert seen["name"] == "job"
    assert seen["attempt"] == 0
    assert seen["current"] is seen["ctx"]
    assert isinstance(seen["ctx"].logger, logging.LoggerAdapter)
    assert seen["ctx"].broker is app.broker
    assert seen["ctx"].storage is app.storage


async def test_echo_logger_names_the_task(
    app: QueueTasks, run_until_idle, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(echo=True)
    def job(ctx: TaskContext) -> None:
        ctx.logger.warning("hello from the task")

    record = await job.add_task()
    with caplog.at_level(logging.WARNING):
        await run_until_idle(app)
    lines = [r for r in caplog.records if "hello from the task" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].name == "qtasks.task.job"
    assert str(record.uuid) in lines[0].getMessage()


async def test_echo_add_task_enqueues_a_subtask(app: QueueTasks, run_until_idle) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(echo=True)
    async def parent(ctx: TaskContext, n: int) -> str:
        child = await ctx.add_task("add", n, n, priority=3)
        assert child is not None
        return str(child.uuid)

    record = await parent.add_task(5)
    await run_until_idle(app)
    child_id = (await app.get(record.uuid)).returning
    child = await app.get(child_id)
    assert child is not None
    assert child.name == "add"
    assert child.priority == 3
    assert child.status is TaskStatusEnum.SUCCESS
    assert child.returning == 10


@pytest.mark.parametrize("sync", [True, False])
async def test_echo_cancel_ends_with_status_cancel(
    app: QueueTasks, run_until_idle, sync: bool
) -> None:
    after: list[bool] = []

    def body(ctx: TaskContext) -> None:
        ctx.cancel("no longer needed")
        after.append(True)

    async def async_body(ctx: TaskContext) -> None:
        body(ctx)

    app.task(name="job", echo=True, retry=3)(body if sync else async_body)
    record = await app.add_task("job")
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.CANCEL
    assert final.error_message == "no longer needed"
    assert final.attempts == 1  # a cancel is never retried
    assert after == []


# -- decode --------------------------------------------------------------------------------


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


async def test_decode_converts_the_result(app: QueueTasks, run_until_idle) -> None:
    @app.task(decode=lambda m: {"cents": m.cents})
    async def price() -> Money:
        return Money(250)

    record = await price.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == {"cents": 250}


async def test_unstorable_result_is_an_error_and_not_retried(
    app: QueueTasks, run_until_idle
) -> None:
    calls: list[int] = []

    @app.task(retry=3, retry_backoff=0.0)
    async def price() -> Money:
        calls.append(1)
        return Money(250)

    record = await price.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.ERROR
    assert final.error_type == "EncodeError"
    assert calls == [1]


# -- executor option -----------------------------------------------------------------------


async def test_executor_option_is_used_for_that_task_only(app: QueueTasks, run_until_idle) -> None:
    class Doubling(TaskExecutor):
        async def execute(self) -> Any:
            return (await super().execute()) * 2

    @app.task(executor=Doubling)
    def special() -> int:
        return 21

    @app.task
    def plain() -> int:
        return 21

    a = await special.add_task()
    b = await plain.add_task()
    await run_until_idle(app)
    assert (await app.get(a.uuid)).returning == 42
    assert (await app.get(b.uuid)).returning == 21
