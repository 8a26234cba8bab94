"""Streaming progress: the executor stores each step, `task.stream()` / `app.stream(uuid)`
follow them live, and `qtasks add --wait` shows them."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import sqlite3
import sys
import textwrap
import threading
import time
import uuid as uuid_module
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from qtasks import QueueConfig, TaskMessage, TaskStatusEnum, WaitTimeout
from qtasks import QueueTasks as SyncQueueTasks
from qtasks.asyncio import QueueTasks
from qtasks.cli.main import main
from qtasks.errors import StorageError, TaskFailed, TaskNotFound
from qtasks.executors import OutcomeKind, TaskExecutor
from qtasks.interfaces import Storage
from qtasks.message import Task
from qtasks.runtime.worker import Worker
from qtasks.storages.memory import MemoryStorage
from qtasks.storages.sqlite import SqliteStorage

RunningWorker = Callable[..., contextlib.AbstractAsyncContextManager[Worker]]


def _executor(app: QueueTasks, task_name: str, /, *args: Any) -> TaskExecutor:
    """An executor for one run of a registered task, as the worker would build it."""
    message = TaskMessage(uuid=uuid_module.uuid4(), name=task_name, args=list(args))
    return TaskExecutor(app.tasks[task_name], message, app)


async def _all_steps(storage: Storage, uuid: str) -> list[Any]:
    page = await storage.steps(uuid, 0, 0.0)
    return page.values


# -- the executor stores the steps --------------------------------------------------------


async def test_each_handler_result_is_a_step_in_order(app: QueueTasks) -> None:
    @app.task(generate_handler=lambda v: {"seen": v})
    def count(n: int):  # type: ignore[no-untyped-def]
        echoed = []
        for i in range(n):
            echoed.append((yield i))  # the handler's result comes back
        return {"echoed": echoed}

    executor = _executor(app, "count", 3)
    outcome = await executor.run()
    assert outcome.kind is OutcomeKind.SUCCESS
    steps = await _all_steps(app.storage, str(executor.message.uuid))
    assert steps == [{"seen": 0}, {"seen": 1}, {"seen": 2}]
    assert outcome.result == {"echoed": steps}


class GatedStorage(MemoryStorage):
    """Holds every add_steps until `gate` is set; remembers each call's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.called = asyncio.Event()
        self.calls: list[list[Any]] = []

    async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
        self.calls.append(list(values))
        self.called.set()
        await self.gate.wait()
        await super().add_steps(uuid, values)


async def test_steps_are_batched_and_stored_before_the_attempt_ends(
    make_app: Callable[..., QueueTasks],
) -> None:
    storage = GatedStorage()
    app = make_app(storage=storage)
    generated = asyncio.Event()

    @app.task
    async def fast():  # type: ignore[no-untyped-def]
        for i in range(1, 6):
            yield i
            await asyncio.sleep(0)  # lets the writer start on the steps so far
        generated.set()

    executor = _executor(app, "fast")
    running = asyncio.ensure_future(executor.run())
    await asyncio.wait_for(storage.called.wait(), 5)
    # The generator ran to its end while the first write was still held: a step costs
    # no round trip of its own ...
    await asyncio.wait_for(generated.wait(), 5)
    # ... but the attempt does not end (so no final record is stored) before its steps.
    assert not running.done()
    storage.gate.set()
    outcome = await asyncio.wait_for(running, 5)
    assert outcome.result == [1, 2, 3, 4, 5]
    assert storage.calls == [[1], [2, 3, 4, 5]]
    assert await _all_steps(storage, str(executor.message.uuid)) == [1, 2, 3, 4, 5]


async def test_steps_before_a_failure_are_stored(app: QueueTasks) -> None:
    @app.task
    def half():  # type: ignore[no-untyped-def]
        yield "one"
        raise ValueError("broke after one step")

    executor = _executor(app, "half")
    outcome = await executor.run()
    assert outcome.kind is OutcomeKind.ERROR
    assert await _all_steps(app.storage, str(executor.message.uuid)) == ["one"]


async def test_a_step_that_is_not_json_is_left_out(
    app: QueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    marker = object()

    @app.task(generate_handler=lambda v: marker if v == 2 else v)
    def mixed():  # type: ignore[no-untyped-def]
        handled = [(yield 1), (yield 2), (yield 3)]
        return "ok" if handled == [1, marker, 3] else "unexpected"

    executor = _executor(app, "mixed")
    with caplog.at_level(logging.WARNING, logger="qtasks.storages.steps"):
        outcome = await executor.run()
    assert outcome.result == "ok"  # the task itself is not affected
    assert await _all_steps(app.storage, str(executor.message.uuid)) == [1, 3]
    assert "is not JSON data" in caplog.text


async def test_a_failed_write_is_logged_and_the_task_goes_on(
    make_app: Callable[..., QueueTasks], caplog: pytest.LogCaptureFixture
) -> None:
    class FlakyStorage(MemoryStorage):
        failures = 1

        async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
            if self.failures:
                self.failures -= 1
                raise StorageError("disk full")
            await super().add_steps(uuid, values)

    app = make_app(storage=FlakyStorage())

    @app.task
    async def steps():  # type: ignore[no-untyped-def]
        yield "lost"
        await asyncio.sleep(0)  # the first write fails meanwhile
        yield "kept"

    executor = _executor(app, "steps")
    with caplog.at_level(logging.WARNING, logger="qtasks.storages.steps"):
        outcome = await executor.run()
    assert outcome.result == ["lost", "kept"]
    assert await _all_steps(app.storage, str(executor.message.uuid)) == ["kept"]
    assert "could not be stored" in caplog.text


async def test_a_storage_without_steps_is_asked_once(
    make_app: Callable[..., QueueTasks],
) -> None:
    class NoSteps(MemoryStorage):
        calls = 0

        async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
            type(self).calls += 1
            await Storage.add_steps(self, uuid, values)

    app = make_app(storage=NoSteps())

    @app.task
    def gen():  # type: ignore[no-untyped-def]
        yield 1
        yield 2

    for _ in range(2):
        outcome = await _executor(app, "gen").run()
        assert outcome.result == [1, 2]
    assert NoSteps.calls == 1


async def test_sqlite_purges_steps_with_their_records(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "q.db", config=QueueConfig(result_ttl_seconds=0.01))
    await storage.start()
    try:
        now = time.time()
        done = [
            Task(uuid=uuid_module.uuid4(), name="t", status=TaskStatusEnum.SUCCESS, finished_at=now)
            for _ in range(2)
        ]
        running = Task(uuid=uuid_module.uuid4(), name="t", status=TaskStatusEnum.PROCESS)
        for task in (*done, running):
            await storage.add_steps(str(task.uuid), ["a", "b"])
        await storage.save([*done, running])
        await asyncio.sleep(0.02)
        assert await storage.purge_expired() == 2
    finally:
        await storage.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as conn:
        left = conn.execute("SELECT uuid, COUNT(*) FROM qtasks_steps GROUP BY uuid").fetchall()
    assert left == [(str(running.uuid), 2)]


# -- following a task: task.stream() and app.stream(uuid) ---------------------------------


async def test_stream_yields_the_steps_then_ends_with_the_record(
    app: QueueTasks, running_worker: RunningWorker
) -> None:
    @app.task(generate_handler=lambda v: v * 10)
    def tens(n: int):  # type: ignore[no-untyped-def]
        total = 0
        for i in range(1, n + 1):
            total += yield i
        return f"all done: {total}"

    async with running_worker(app):
        stream = tens.stream(3, timeout=10)
        assert [step async for step in stream] == [10, 20, 30]
    assert stream.record is not None
    assert stream.record.status is TaskStatusEnum.SUCCESS
    assert stream.result == "all done: 60"
    assert str(stream.record.uuid) == stream.uuid


async def test_each_step_arrives_while_the_task_still_runs(
    app: QueueTasks, running_worker: RunningWorker
) -> None:
    go_on = asyncio.Event()

    @app.task
    async def waits_for_the_reader():  # type: ignore[no-untyped-def]
        yield "started"
        await asyncio.wait_for(go_on.wait(), 10)  # only the reader of step 1 sets it
        yield "finished"

    async with running_worker(app):
        stream = waits_for_the_reader.stream(timeout=10)
        seen = []
        async for step in stream:
            seen.append(step)
            if step == "started":
                record = await app.get(stream.uuid)
                assert record is not None
                assert not record.is_final
                go_on.set()
    assert seen == ["started", "finished"]
    assert stream.result == ["started", "finished"]


async def test_a_failed_task_raises_after_its_steps(
    app: QueueTasks, running_worker: RunningWorker
) -> None:
    @app.task
    def breaks():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise LookupError("no third step")

    async with running_worker(app):
        stream = breaks.stream(timeout=10)
        assert [await anext(stream), await anext(stream)] == [1, 2]
        with pytest.raises(TaskFailed, match="ended with status error: LookupError") as info:
            await anext(stream)
    assert info.value.record.status is TaskStatusEnum.ERROR
    assert info.value.error_message == "no third step"
    assert info.value.traceback is not None
    assert stream.record == info.value.record
    with pytest.raises(StopAsyncIteration):  # raised once, then the stream is over
        await anext(stream)


async def test_a_retried_task_streams_every_attempt(
    app: QueueTasks, running_worker: RunningWorker
) -> None:
    @app.task(echo=True, retry=1, retry_backoff=0.0)
    def flaky(ctx):  # type: ignore[no-untyped-def]
        yield f"attempt {ctx.attempt}"
        if ctx.attempt == 0:
            raise ConnectionError("try again")

    async with running_worker(app):
        steps = [step async for step in flaky.stream(timeout=10)]
    assert steps == ["attempt 0", "attempt 1"]


async def test_a_stream_times_out_and_the_task_stays(app: QueueTasks) -> None:
    @app.task
    def never_run():  # type: ignore[no-untyped-def]
        yield 1

    stream = never_run.stream(timeout=0.1)
    with pytest.raises(WaitTimeout) as info:
        await anext(stream)
    assert info.value.uuid == stream.uuid
    record = await app.get(stream.uuid)
    assert record is not None
    assert record.status is TaskStatusEnum.NEW


async def test_app_stream_replays_a_finished_task(
    app: QueueTasks, run_until_idle: Callable[..., Any]
) -> None:
    @app.task
    async def letters():  # type: ignore[no-untyped-def]
        for letter in "abc":
            yield letter

    record = await letters.add_task()
    await run_until_idle(app)
    stream = app.stream(record.uuid, timeout=0)  # what is stored needs no waiting
    assert [step async for step in stream] == ["a", "b", "c"]
    assert stream.result == ["a", "b", "c"]


async def test_app_stream_of_a_plain_task_has_only_the_result(
    app: QueueTasks, run_until_idle: Callable[..., Any]
) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    record = await add.add_task(1, 2)
    await run_until_idle(app)
    stream = app.stream(record.uuid, timeout=5)
    assert [step async for step in stream] == []
    assert stream.result == 3


async def test_streaming_a_plain_task_is_a_type_error_and_sends_nothing(app: QueueTasks) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="is not a generator"):
        add.stream(1, 2)
    await app.start()
    assert await app.broker.queue_sizes(["default"]) == {"default": 0}


async def test_stream_checks_arguments_at_once(app: QueueTasks) -> None:
    @app.task
    def gen(n: int):  # type: ignore[no-untyped-def]
        yield n

    with pytest.raises(TypeError, match="nothing was enqueued"):
        gen.stream()


async def test_app_stream_of_an_unknown_task(app: QueueTasks) -> None:
    unknown = uuid_module.uuid4()
    with pytest.raises(TaskNotFound, match=f"no record of task {unknown}"):
        await anext(app.stream(unknown))


def test_the_sync_app_streams_through_the_async_core(tmp_path: Path) -> None:
    app = SyncQueueTasks("sync-stream", broker_url=f"sqlite:///{tmp_path / 'q.db'}")

    @app.task(generate_handler=str)
    def countdown(n: int):  # type: ignore[no-untyped-def]
        while n:
            yield n
            n -= 1

    worker = Worker()
    try:
        app.portal.call(app.core.start())
        app.portal.call(worker.start(app.core))
        stream = countdown.stream(3, timeout=10)
        assert list(stream) == ["3", "2", "1"]
        assert stream.result == ["3", "2", "1"]
        assert list(app.stream(stream.uuid)) == ["3", "2", "1"]
    finally:
        app.portal.call(worker.stop())
        app.close()


# -- qtasks add --wait: live steps ---------------------------------------------------------

CLI_APP = """
import asyncio
from qtasks.asyncio import QueueTasks

def build():
    app = QueueTasks("stream-cli", broker_url=URL)

    @app.task(generate_handler=lambda v: {"done": v})
    def progress(n):
        for i in range(1, n + 1):
            yield i
        return f"{n} items"

    @app.task
    async def breaks():
        yield "partial"
        raise RuntimeError("kaput")

    @app.task
    async def hello(name):
        return f"hi {name}"

    return app

app = build()          # what the command loads
worker_app = build()   # what the test's worker thread runs (another loop, same file)
"""


@pytest.fixture
def cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The app module on an SQLite file, with a worker running in a thread of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    name = f"qt_stream_cli_{uuid_module.uuid4().hex[:8]}"
    source = textwrap.dedent(CLI_APP).replace("URL", repr(f"sqlite:///{tmp_path / 'q.db'}"))
    (tmp_path / f"{name}.py").write_text(source)
    module = importlib.import_module(name)
    with _worker_thread(module.worker_app):
        yield module
    asyncio.run(module.app.stop())
    del sys.modules[name]


@contextlib.contextmanager
def _worker_thread(app: QueueTasks) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with _started(app) as worker:
            ready.set()
            await stop.wait()
            await worker.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        yield
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@contextlib.asynccontextmanager
async def _started(app: QueueTasks) -> AsyncIterator[Worker]:
    await app.start()
    worker = Worker()
    await worker.start(app)
    try:
        yield worker
    finally:
        await app.stop()


def test_add_wait_shows_each_step_then_the_record(
    cli_app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["-A", f"{cli_app.__name__}:app", "add", "progress", "3", "--wait", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:3] == ['step 1: {"done":1}', 'step 2: {"done":2}', 'step 3: {"done":3}']
    assert "success" in out
    assert '"3 items"' in out


def test_add_wait_shows_the_steps_of_a_failed_task(
    cli_app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-A", f"{cli_app.__name__}:app", "add", "breaks", "--wait", "10"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ['step 1: "partial"']
    assert "ended with status error: RuntimeError: kaput" in captured.err


def test_add_wait_of_a_plain_task_shows_no_steps(
    cli_app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-A", f"{cli_app.__name__}:app", "add", "hello", '"bob"', "--wait", "10"]) == 0
    out = capsys.readouterr().out
    assert "step" not in out
    assert '"hi bob"' in out


# -- Redis: a stream per task, blocking reads ----------------------------------------------


@pytest.mark.redis
async def test_streaming_through_redis(
    make_app: Callable[..., QueueTasks], running_worker: RunningWorker
) -> None:
    import redis.asyncio

    from ..servers import REDIS_URL, delete_namespace, require_server

    parts = urlsplit(REDIS_URL)
    require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    namespace = f"stream-{uuid_module.uuid4().hex[:12]}"
    app = make_app(name=namespace, broker_url=REDIS_URL, config=QueueConfig(result_ttl_seconds=60))
    go_on = asyncio.Event()

    @app.task(generate_handler=lambda v: [v])
    async def gated():  # type: ignore[no-untyped-def]
        yield "started"
        await asyncio.wait_for(go_on.wait(), 10)
        yield "finished"

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        async with running_worker(app):
            stream = gated.stream(timeout=10)
            seen = []
            async for step in stream:
                seen.append(step)
                if step == ["started"]:
                    record = await app.get(stream.uuid)
                    assert record is not None
                    assert not record.is_final
                    go_on.set()
        assert seen == [["started"], ["finished"]]
        assert stream.result == seen
        key = f"qtasks:{{{namespace}}}:steps:{stream.uuid}"
        entries = await client.xrange(key)
        # Step n has the id 0-(n+1); the final save added the end mark after them.
        assert [e[0] for e in entries] == [b"0-1", b"0-2", b"0-3"]
        assert entries[-1][1] == {b"end": b"1"}
        assert 0 < await client.pttl(key) <= 60_000  # as long as the record lives
        assert [s async for s in app.stream(stream.uuid, timeout=5)] == seen
    finally:
        await client.aclose()
        await delete_namespace(REDIS_URL, namespace)
