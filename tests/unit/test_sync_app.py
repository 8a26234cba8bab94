"""The sync facade `qtasks.QueueTasks`: it forwards to the async core through one portal loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import qtasks
from qtasks import (
    AsyncQueueTasks,
    EncodeError,
    QueueTasks,
    SyncTask,
    Task,
    TaskMiddleware,
    TaskStatusEnum,
    WaitTimeout,
)
from qtasks.executors import TaskExecutor
from qtasks.runtime.worker import Worker


@pytest.fixture
def sync_app() -> Iterator[QueueTasks]:
    """A sync app on memory://, closed after the test."""
    app = QueueTasks(broker_url="memory://")
    yield app
    app.close()


@pytest.fixture
def portal_worker(sync_app: QueueTasks) -> Iterator[Worker]:
    """A worker of the async core running on the sync app's portal loop."""
    worker = Worker()
    sync_app.portal.call(sync_app.core.start())
    sync_app.portal.call(worker.start(sync_app.core))
    yield worker
    sync_app.portal.call(worker.stop(grace_seconds=1))


def test_sync_app_wraps_an_async_core(sync_app: QueueTasks) -> None:
    assert qtasks.QueueTasks is QueueTasks
    assert isinstance(sync_app.core, AsyncQueueTasks)
    # read-through views, not copies
    assert sync_app.tasks is sync_app.core.tasks
    assert sync_app.broker is sync_app.core.broker
    assert sync_app.storage is sync_app.core.storage
    assert sync_app.global_config is sync_app.core.global_config
    assert sync_app.config is sync_app.core.config
    assert sync_app.name == "QueueTasks"


def test_task_decorator_returns_sync_task(sync_app: QueueTasks) -> None:
    @sync_app.task
    def add(x: int, y: int) -> int:
        return x + y

    @sync_app.task(name="other", priority=2, owner="me")
    def other() -> None: ...

    assert isinstance(add, SyncTask)
    assert isinstance(other, SyncTask)
    assert add.name == "add"
    assert other.name == "other"
    assert add.definition is sync_app.core.tasks["add"]
    assert sync_app.core.tasks["other"].priority == 2
    assert sync_app.core.tasks["other"].metadata == {"owner": "me"}
    assert add(1, 2) == 3


def test_add_task_from_sync_code(sync_app: QueueTasks) -> None:
    @sync_app.task
    def add(x: int, y: int) -> int:
        return x + y

    record = add.add_task(1, 2, priority=4)
    assert isinstance(record, Task)
    assert record.status is TaskStatusEnum.NEW
    assert record.priority == 4
    assert record.args == [1, 2]
    by_name = sync_app.add_task("add", 3, 4)
    assert by_name is not None
    assert by_name.name == "add"
    assert sync_app.get(record.uuid) == record
    assert sync_app.get("00000000-0000-0000-0000-000000000000") is None


def test_errors_reach_the_sync_caller(sync_app: QueueTasks) -> None:
    @sync_app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(EncodeError):
        add.add_task(object(), 1)
    with pytest.raises(TypeError):
        add.add_task(1)
    record = add.add_task(1, 2)
    assert add.add_task(1, 2, timeout=0.01) is None  # no worker runs it
    with pytest.raises(WaitTimeout) as info:
        sync_app.wait(record.uuid, 0.01)
    assert info.value.uuid == str(record.uuid)


def test_worker_on_the_portal_runs_sync_app_tasks(
    sync_app: QueueTasks, portal_worker: Worker
) -> None:
    @sync_app.task
    def add(x: int, y: int) -> int:
        return x + y

    done = add.add_task(1, 2, timeout=5)
    assert done is not None
    assert done.status is TaskStatusEnum.SUCCESS
    assert done.returning == 3
    pending = add.add_task(5, 5)
    assert sync_app.wait(pending.uuid, 5).returning == 10


def test_close_stops_the_portal_and_the_app_can_be_used_again(sync_app: QueueTasks) -> None:
    @sync_app.task
    def job() -> None: ...

    first = job.add_task()
    thread = sync_app.portal._thread
    assert sync_app.portal.running
    assert thread is not None
    assert thread.is_alive()

    sync_app.close()
    assert not sync_app.portal.running
    assert not thread.is_alive()
    assert not sync_app.core._started
    sync_app.close()  # idempotent

    second = job.add_task()  # a new portal loop starts on demand
    assert sync_app.portal.running
    assert sync_app.get(first.uuid) == first
    assert sync_app.get(second.uuid) == second


def test_context_manager_closes() -> None:
    with QueueTasks(broker_url="memory://") as app:
        app.add_task("anything")
        assert app.portal.running
    assert not app.portal.running


def test_the_facade_only_forwards(sync_app: QueueTasks, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    sentinel = object()

    def recorder(name: str):
        async def fake(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return sentinel

        return fake

    for method in ("add_task", "get", "wait"):
        monkeypatch.setattr(sync_app.core, method, recorder(method))

    assert sync_app.add_task("job", 1, priority=2, timeout=3) is sentinel
    assert sync_app.get("some-id") is sentinel
    assert sync_app.wait("some-id", 4) is sentinel
    assert calls == [
        ("add_task", ("job", 1), {"priority": 2, "timeout": 3}),
        ("get", ("some-id",), {}),
        ("wait", ("some-id", 4), {}),
    ]


def test_sync_task_forwards_to_the_async_task(
    sync_app: QueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    @sync_app.task
    def job(x: int) -> int:
        return x

    seen: list[Any] = []

    async def fake(*args: Any, **kwargs: Any) -> str:
        seen.append((args, kwargs))
        return "forwarded"

    monkeypatch.setattr(job.async_task, "add_task", fake)
    assert job.add_task(1, delay=5) == "forwarded"
    assert seen == [((1,), {"delay": 5})]


def test_constructor_options_reach_the_core() -> None:
    class MyExecutor(TaskExecutor):
        pass

    class Mw(TaskMiddleware):
        pass

    app = QueueTasks("named", broker_url="memory://", executor=MyExecutor)
    try:
        app.add_middleware(Mw)
        assert app.core.name == "named"
        assert app.core.executor_class is MyExecutor
        assert len(app.core.middlewares) == 1
        assert isinstance(app.core.middlewares[0], Mw)
    finally:
        app.close()
    assert QueueTasks(broker_url="memory://").core.executor_class is TaskExecutor


def test_producer_calls_from_many_threads(sync_app: QueueTasks, portal_worker: Worker) -> None:
    @sync_app.task
    def square(x: int) -> int:
        return x * x

    results: dict[int, Any] = {}

    def produce(n: int) -> None:
        record = square.add_task(n, timeout=5)
        results[n] = record.returning if record else None

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {n: n * n for n in range(8)}


def test_run_forever_runs_a_worker_until_stopped() -> None:
    app = QueueTasks(broker_url="memory://")
    ran = threading.Event()

    @app.task
    def job(x: int) -> int:
        ran.set()
        return x + 1

    record = job.add_task(41)
    runner = threading.Thread(target=app.run_forever, kwargs={"concurrency": 2})
    runner.start()
    try:
        assert ran.wait(5)
    finally:
        app.core.starter.request_stop()
        runner.join(10)
    assert not runner.is_alive()
    try:
        final = app.wait(record.uuid, 5)
        assert final.status is TaskStatusEnum.SUCCESS
        assert final.returning == 42
    finally:
        app.close()
