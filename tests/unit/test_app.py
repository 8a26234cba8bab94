"""The async app: registration and the producer API (add_task, wait, get), on memory://."""

from __future__ import annotations

import asyncio
import time
import uuid as uuid_module
from datetime import datetime, timedelta, timezone

import pytest

from qtasks import (
    ADD_TASK_OPTIONS,
    ConfigurationError,
    EncodeError,
    QueueConfig,
    Task,
    TaskAlreadyRegistered,
    TaskMessage,
    TaskStatusEnum,
    WaitTimeout,
)
from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.global_configs.memory import MemoryGlobalConfig
from qtasks.storages.memory import MemoryStorage

# -- construction and registration ---------------------------------------------------------


def test_memory_url_builds_memory_parts() -> None:
    app = QueueTasks(broker_url="memory://")
    assert isinstance(app.broker, MemoryBroker)
    assert isinstance(app.storage, MemoryStorage)
    assert isinstance(app.global_config, MemoryGlobalConfig)


@pytest.mark.parametrize("name", ["", None, 3])
def test_app_name_must_be_a_non_empty_string(name: object) -> None:
    with pytest.raises(ConfigurationError, match="non-empty string"):
        QueueTasks(name, broker_url="memory://")  # type: ignore[arg-type]


def test_bare_decorator_registers_under_the_function_name(app: QueueTasks) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert app.tasks["add"].func is add.definition.func
    assert add.name == "add"
    assert add(2, 3) == 5  # calling the handle runs the function locally


def test_decorator_with_arguments_and_name_override(app: QueueTasks) -> None:
    @app.task(name="math.add", priority=3)
    def add(x: int, y: int) -> int:
        return x + y

    assert set(app.tasks) == {"math.add"}
    assert add.name == "math.add"
    assert app.tasks["math.add"].priority == 3


def test_duplicate_name_is_a_clear_error(app: QueueTasks) -> None:
    @app.task
    def job() -> None: ...

    def other() -> None: ...

    with pytest.raises(TaskAlreadyRegistered) as info:
        app.task(name="job")(other)
    assert info.value.name == "job"
    assert "already registered" in str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert app.tasks["job"].func is job.definition.func  # the first one stays


# -- add_task ------------------------------------------------------------------------------


async def test_add_task_returns_the_new_record(app: QueueTasks) -> None:
    @app.task(priority=4)
    async def add(x: int, y: int = 0) -> int:
        return x + y

    before = time.time()
    record = await add.add_task(1, y=2)

    assert isinstance(record, Task)
    assert isinstance(record.uuid, uuid_module.UUID)
    assert record.name == "add"
    assert record.status is TaskStatusEnum.NEW
    assert record.priority == 4
    assert record.args == [1]
    assert record.kwargs == {"y": 2}
    assert before <= record.created_at <= time.time()
    assert record.created.tzinfo is not None
    stored = await app.get(record.uuid)
    assert stored == record
    assert (await app.broker.queue_sizes(["default"])) == {"default": 1}


async def test_add_task_priority_overrides_the_task_default(app: QueueTasks) -> None:
    @app.task(priority=4)
    async def job() -> None: ...

    assert (await job.add_task(priority=9)).priority == 9
    assert (await app.add_task("job", priority=-1)).priority == -1
    assert (await job.add_task()).priority == 4


async def test_default_priority_comes_from_the_config(make_app) -> None:
    app = make_app(config=QueueConfig(default_task_priority=7))

    @app.task
    async def job() -> None: ...

    assert (await job.add_task()).priority == 7


async def test_add_task_with_timeout_returns_the_final_record(
    app: QueueTasks, running_worker
) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with running_worker(app):
        done = await add.add_task(1, 2, timeout=5)

    assert done is not None
    assert done.status is TaskStatusEnum.SUCCESS
    assert done.returning == 3
    assert done.attempts == 1
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at
    assert done.duration_seconds is not None
    assert done.duration_seconds >= 0


async def test_add_task_timeout_returns_none_when_time_runs_out(app: QueueTasks) -> None:
    @app.task
    async def job() -> None: ...

    assert await job.add_task(timeout=0.01) is None  # no worker runs it


async def test_wait_raises_wait_timeout_carrying_the_uuid(app: QueueTasks) -> None:
    @app.task
    async def job() -> None: ...

    record = await job.add_task()
    with pytest.raises(WaitTimeout) as info:
        await app.wait(record.uuid, 0.01)
    assert info.value.uuid == str(record.uuid)
    assert info.value.timeout == 0.01
    assert isinstance(info.value, TimeoutError)


async def test_wait_returns_the_final_record(app: QueueTasks, running_worker) -> None:
    @app.task
    async def job() -> str:
        return "done"

    record = await job.add_task()
    async with running_worker(app):
        final = await app.wait(record.uuid, 5)
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning == "done"
    assert (await app.get(str(record.uuid))) == final


async def test_get_unknown_uuid_is_none(app: QueueTasks) -> None:
    assert await app.get(uuid_module.uuid4()) is None


async def test_app_add_task_by_name(app: QueueTasks, run_until_idle) -> None:
    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    record = await app.add_task("mul", 6, 7, priority=9)
    assert record is not None
    assert record.name == "mul"
    assert record.priority == 9
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.returning == 42


async def test_reserved_names_go_through_task_kwargs(app: QueueTasks, run_until_idle) -> None:
    @app.task
    async def job(priority: str, timeout: int) -> str:
        return f"{priority}/{timeout}"

    assert {"priority", "timeout", "delay", "eta", "task_kwargs"} <= ADD_TASK_OPTIONS
    record = await job.add_task(priority=5, task_kwargs={"priority": "high", "timeout": 3})
    assert record.priority == 5  # the option
    assert record.kwargs == {"priority": "high", "timeout": 3}  # the task's arguments
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.returning == "high/3"


# -- delay / eta ---------------------------------------------------------------------------


async def test_delay_is_not_run_early(app: QueueTasks, run_until_idle) -> None:
    @app.task
    async def job() -> float:
        return time.time()

    record = await job.add_task(delay=0.2)
    assert record.eta is not None
    assert record.eta >= record.created_at + 0.2
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.status is TaskStatusEnum.SUCCESS
    assert final.returning >= record.created_at + 0.2


async def test_eta_aware_datetime_is_not_run_early(app: QueueTasks, run_until_idle) -> None:
    @app.task
    async def job() -> float:
        return time.time()

    eta = datetime.now(timezone.utc) + timedelta(seconds=0.2)
    record = await job.add_task(eta=eta)
    assert record.eta == pytest.approx(eta.timestamp())
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.returning >= eta.timestamp()


async def test_eta_in_the_past_runs_now(app: QueueTasks, run_until_idle) -> None:
    @app.task
    async def job() -> str:
        return "ran"

    record = await job.add_task(eta=datetime.now(timezone.utc) - timedelta(hours=1))
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final is not None
    assert final.returning == "ran"


async def test_naive_eta_is_rejected_and_nothing_written(app: QueueTasks) -> None:
    @app.task
    async def job() -> None: ...

    with pytest.raises(ValueError, match="timezone-aware"):
        await job.add_task(eta=datetime.now() + timedelta(seconds=5))
    assert len(app.storage) == 0  # type: ignore[arg-type]


async def test_delay_and_eta_together_are_rejected(app: QueueTasks) -> None:
    @app.task
    async def job() -> None: ...

    with pytest.raises(ValueError, match="either delay= or eta="):
        await job.add_task(delay=1, eta=datetime.now(timezone.utc))
    assert len(app.storage) == 0  # type: ignore[arg-type]


# -- bad input -----------------------------------------------------------------------------


async def test_unencodable_arguments_raise_and_write_nothing(app: QueueTasks) -> None:
    @app.task
    async def job(x: object) -> None: ...

    with pytest.raises(EncodeError, match="cannot be encoded"):
        await job.add_task(object())
    with pytest.raises(EncodeError):
        await app.add_task("not-registered", value={1, object()})
    assert len(app.storage) == 0  # type: ignore[arg-type]
    assert (await app.broker.queue_sizes(["default"])) == {"default": 0}


async def test_arguments_not_fitting_a_known_task_raise_type_error(app: QueueTasks) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="nothing was enqueued"):
        await add.add_task(1)
    with pytest.raises(TypeError):
        await app.add_task("add", 1, 2, z=3)
    assert len(app.storage) == 0  # type: ignore[arg-type]
    assert (await app.broker.queue_sizes(["default"])) == {"default": 0}


async def test_publish_failure_removes_the_record(app: QueueTasks) -> None:
    @app.task
    async def job() -> None: ...

    class PublishError(Exception):
        pass

    async def failing_publish(envelopes: object) -> None:
        raise PublishError

    await app.start()
    app.broker.publish = failing_publish  # type: ignore[method-assign]
    with pytest.raises(PublishError):
        await job.add_task()
    assert len(app.storage) == 0  # type: ignore[arg-type]


async def test_unknown_task_name_is_recorded_as_error_and_worker_continues(
    app: QueueTasks, run_until_idle
) -> None:
    @app.task
    async def ok() -> str:
        return "ok"

    unknown = await app.add_task("no.such.task", 1)
    good = await ok.add_task()
    await run_until_idle(app)

    bad = await app.get(unknown.uuid)
    assert bad is not None
    assert bad.status is TaskStatusEnum.ERROR
    assert bad.error_type == "UnknownTask"
    assert "no.such.task" in (bad.error_message or "")
    assert (await app.get(good.uuid)).returning == "ok"


async def test_undecodable_message_is_recorded_and_worker_continues(
    app: QueueTasks, run_until_idle, publish_raw
) -> None:
    @app.task
    async def ok() -> str:
        return "ok"

    await publish_raw(app, b"garbage")
    good = await ok.add_task()
    await run_until_idle(app)

    assert (await app.get(good.uuid)).returning == "ok"
    errors = [t for t in app.storage._records.values() if t.status is TaskStatusEnum.ERROR]
    assert len(errors) == 1
    assert errors[0].error_type == "DecodeError"
    assert "garbage" in (errors[0].error_message or "")


async def test_undecodable_message_keeps_its_uuid_when_readable(
    app: QueueTasks, run_until_idle, publish_raw
) -> None:
    task_id = str(uuid_module.uuid4())
    body = f'{{"uuid": "{task_id}", "name": "job", "args": "not-a-list"}}'.encode()
    await publish_raw(app, body, uuid=task_id)
    await run_until_idle(app)

    record = await app.get(task_id)
    assert record is not None
    assert record.status is TaskStatusEnum.ERROR
    assert record.error_type == "DecodeError"
    assert record.name == "job"


async def test_arguments_mismatch_on_the_wire_is_an_error_and_not_retried(
    app: QueueTasks, run_until_idle, publish_message
) -> None:
    calls: list[int] = []

    @app.task(retry=3, retry_backoff=0.0)
    async def add(x: int, y: int) -> int:
        calls.append(x)
        return x + y

    message = TaskMessage(uuid=uuid_module.uuid4(), name="add", args=[1, 2, 3])
    await publish_message(app, message)
    await run_until_idle(app)

    record = await app.get(message.uuid)
    assert record is not None
    assert record.status is TaskStatusEnum.ERROR
    assert record.error_type == "ArgumentsMismatch"
    assert record.attempts == 1
    assert calls == []


# -- result TTL ----------------------------------------------------------------------------


async def test_finished_records_expire_after_the_result_ttl(make_app, running_worker) -> None:
    app = make_app(config=QueueConfig(result_ttl_seconds=0.0))

    @app.task
    async def job() -> int:
        return 1

    pending = await job.add_task()
    assert await app.get(pending.uuid) is not None  # unfinished records do not expire
    async with running_worker(app):
        done = await job.add_task(timeout=5)
    assert done is not None
    assert done.returning == 1  # the waiter still gets the record ...
    assert await app.get(done.uuid) is None  # ... but it is gone at once with a TTL of 0


async def test_records_are_kept_within_the_result_ttl(make_app, running_worker) -> None:
    app = make_app(config=QueueConfig(result_ttl_seconds=3600.0))

    @app.task
    async def job() -> int:
        return 1

    async with running_worker(app):
        done = await job.add_task(timeout=5)
    assert done is not None
    assert (await app.get(done.uuid)) == done


async def test_memory_storage_expiry_uses_the_finish_time() -> None:
    storage = MemoryStorage(result_ttl_seconds=10.0)
    finished = Task(
        uuid=uuid_module.uuid4(),
        name="job",
        status=TaskStatusEnum.SUCCESS,
        finished_at=time.time() - 11.0,
    )
    running = Task(uuid=uuid_module.uuid4(), name="job", status=TaskStatusEnum.PROCESS)
    await storage.save([finished, running])
    assert await storage.get(str(finished.uuid)) is None
    assert await storage.get(str(running.uuid)) == running
    assert len(storage) == 1


# -- lifecycle -----------------------------------------------------------------------------


async def test_start_and_stop_are_idempotent(app: QueueTasks) -> None:
    await app.start()
    await app.start()
    await app.stop()
    await app.stop()
    async with app as same:
        assert same is app
        assert app._started


async def test_add_task_from_many_coroutines_at_once(app: QueueTasks, run_until_idle) -> None:
    @app.task
    async def echo(n: int) -> int:
        return n

    records = await asyncio.gather(*(echo.add_task(n) for n in range(50)))
    await run_until_idle(app)
    results = [(await app.get(r.uuid)).returning for r in records]
    assert results == list(range(50))
