"""Depends: kinds of dependency, scopes and their lifetimes, teardown, graph checks, overrides."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest

from qtasks import ConfigurationError, TaskContext, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.plugins import Depends, Scope

from .plugin_backends import BACKENDS, app_on, run_tasks, worker_running


@pytest.fixture(params=BACKENDS)
async def backend_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueTasks]:
    """An async app on each backend in turn."""
    async with app_on(request.param, tmp_path) as app:
        yield app


class Resource:
    """Something with a lifetime; records every open and close in a shared log."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name
        self.closed = False
        log.append(f"open {name}")

    def close(self, how: str = "") -> None:
        self.closed = True
        self.log.append(f"close {self.name}{how}")


# -- every kind of dependency function -------------------------------------------------------


async def test_every_kind_of_dependency(backend_app: QueueTasks) -> None:
    app = backend_app
    log: list[str] = []

    def plain() -> str:
        return "plain"

    async def coroutine() -> str:
        return "coroutine"

    def generator() -> Iterator[str]:
        r = Resource(log, "gen")
        yield "generator"
        r.close()

    async def async_generator() -> AsyncIterator[str]:
        r = Resource(log, "agen")
        yield "async generator"
        r.close()

    @contextlib.contextmanager
    def context_manager() -> Iterator[str]:
        r = Resource(log, "cm")
        yield "context manager"
        r.close()

    @contextlib.asynccontextmanager
    async def async_context_manager() -> AsyncIterator[str]:
        r = Resource(log, "acm")
        yield "async context manager"
        r.close()

    class ManagedClass:
        def __enter__(self) -> str:
            log.append("open class")
            return "class"

        def __exit__(self, *exc: object) -> None:
            log.append("close class")

    @app.task
    async def collect(
        a: str = Depends(plain),
        b: str = Depends(coroutine),
        c: str = Depends(generator),
        d: str = Depends(async_generator),
        e: str = Depends(context_manager),
        f: str = Depends(async_context_manager),
        g: str = Depends(ManagedClass),
    ) -> list[str]:
        return [a, b, c, d, e, f, g]

    (final,) = await run_tasks(app, [await collect.add_task()])
    assert final.returning == [
        "plain",
        "coroutine",
        "generator",
        "async generator",
        "context manager",
        "async context manager",
        "class",
    ]
    opened = [x for x in log if x.startswith("open")]
    closed = [x for x in log if x.startswith("close")]
    assert closed == [c.replace("open", "close") for c in reversed(opened)]  # newest first


async def test_annotated_form_and_injected_parameters_are_not_arguments(
    app: QueueTasks, run_until_idle
) -> None:
    def prefix() -> str:
        return ">"

    @app.task
    def show(x: int, p: Annotated[str, Depends(prefix)], *, y: int = 0) -> str:
        return f"{p}{x}{y}"

    record = await show.add_task(1, y=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'p'"):
        await show.add_task(1, p="no")  # injected: never taken from the caller
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == ">12"


async def test_depends_without_a_function_calls_the_annotation(
    app: QueueTasks, run_until_idle
) -> None:
    class Settings:
        def __init__(self) -> None:
            self.debug = True

    @app.task
    async def read(settings: Annotated[Settings, Depends()]) -> bool:
        return settings.debug

    record = await read.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning is True


async def test_an_injected_parameter_before_a_regular_one(app: QueueTasks, run_until_idle) -> None:
    @app.task
    def job(tag: Annotated[str, Depends(lambda: "t")], x: int) -> str:
        return f"{tag}{x}"

    record = await job.add_task(5)
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == "t5"


async def test_sync_dependency_code_runs_off_the_loop(app: QueueTasks, run_until_idle) -> None:
    loop_thread = threading.get_ident()

    def where() -> int:
        return threading.get_ident()

    @app.task
    async def job(thread: int = Depends(where)) -> bool:
        return thread != loop_thread

    record = await job.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning is True


# -- scopes ----------------------------------------------------------------------------------


async def test_worker_scope_is_created_once_for_100_tasks_and_closed_at_worker_stop(
    backend_app: QueueTasks,
) -> None:
    app = backend_app
    log: list[str] = []

    async def connection() -> AsyncIterator[Resource]:
        r = Resource(log, "conn")
        await asyncio.sleep(0)  # concurrent first uses must still share one creation
        yield r
        r.close()

    @app.task
    async def use(i: int, conn: Resource = Depends(connection, scope="worker")) -> int:
        assert not conn.closed
        return id(conn)

    records = [await use.add_task(i) for i in range(100)]
    async with worker_running(app, concurrency=10) as worker:
        finals = [await app.wait(r.uuid, 20) for r in records]
        assert log == ["open conn"]
        assert len(worker.dependency_scope) == 1
    assert {f.status for f in finals} == {TaskStatusEnum.SUCCESS}
    assert len({f.returning for f in finals}) == 1
    assert log == ["open conn", "close conn"]


async def test_task_scope_is_created_and_closed_per_task_also_when_it_fails(
    backend_app: QueueTasks,
) -> None:
    app = backend_app
    log: list[str] = []

    def session() -> Iterator[Resource]:
        r = Resource(log, "session")
        try:
            yield r
        except ValueError:
            r.close(" after error")
            raise
        else:
            r.close()

    @app.task(retry=0)
    def use(fail: bool, s: Resource = Depends(session, Scope.TASK)) -> str:
        if fail:
            raise ValueError("task failed")
        return "ok"

    finals = await run_tasks(app, [await use.add_task(f) for f in (False, True, False)])
    assert [f.status for f in finals] == [
        TaskStatusEnum.SUCCESS,
        TaskStatusEnum.ERROR,
        TaskStatusEnum.SUCCESS,
    ]
    assert sorted(log) == sorted(
        ["open session"] * 3 + ["close session"] * 2 + ["close session after error"]
    )


async def test_a_task_dependency_is_resolved_once_per_task(app: QueueTasks, run_until_idle) -> None:
    made: list[int] = []

    def counter() -> int:
        made.append(1)
        return len(made)

    def first(n: int = Depends(counter)) -> int:
        return n

    def second(n: int = Depends(counter)) -> int:
        return n

    @app.task
    async def job(a: int = Depends(first), b: int = Depends(second)) -> list[int]:
        return [a, b]

    r1, _ = await job.add_task(), await job.add_task()
    await run_until_idle(app)
    assert (await app.get(r1.uuid)).returning in ([1, 1], [2, 2])
    assert len(made) == 2  # once per task, shared by both users


async def test_component_scopes_close_when_their_component_stops(app: QueueTasks) -> None:
    log: list[str] = []

    def make(name: str) -> Any:
        def dependency() -> Iterator[str]:
            log.append(f"open {name}")
            yield name
            log.append(f"close {name}")

        dependency.__qualname__ = name
        return dependency

    broker_dep, storage_dep, config_dep = make("b"), make("s"), make("g")

    @app.task
    async def job(
        g: str = Depends(config_dep, "global_config"),
        s: str = Depends(storage_dep, scope="storage"),
        b: str = Depends(broker_dep, scope=Scope.BROKER),
    ) -> str:
        return g + s + b

    async with worker_running(app):
        assert (await app.wait((await job.add_task()).uuid, 10)).returning == "gsb"
    assert log == ["open g", "open s", "open b"]
    await app.stop()
    assert log[3:] == ["close b", "close s", "close g"]  # broker stops first


async def test_cancelled_task_still_closes_its_scope(app: QueueTasks, run_until_idle) -> None:
    log: list[str] = []

    async def resource() -> AsyncIterator[str]:
        log.append("open")
        try:
            yield "r"
        finally:
            log.append("close")

    @app.task(max_time=0.05)
    async def slow(r: str = Depends(resource)) -> None:
        await asyncio.Event().wait()  # never set: ends by the time limit

    record = await slow.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).error_type == "TaskTimeout"
    assert log == ["open", "close"]


async def test_teardown_errors_are_logged_and_never_hide_the_others(
    app: QueueTasks, run_until_idle, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []

    def fine() -> Iterator[str]:
        yield "fine"
        log.append("fine closed")

    def broken() -> Iterator[str]:
        yield "broken"
        raise OSError("cannot close")

    @app.task
    def job(a: str = Depends(fine), b: str = Depends(broken)) -> str:
        return a + b

    record = await job.add_task()
    with caplog.at_level(logging.ERROR, logger="qtasks.plugins.depends"):
        await run_until_idle(app)
    assert (await app.get(record.uuid)).status is TaskStatusEnum.SUCCESS
    assert log == ["fine closed"]
    assert "closing dependency" in caplog.text
    assert "broken" in caplog.text
    assert "OSError: cannot close" in caplog.text


async def test_a_dependency_cannot_swallow_the_task_error(app: QueueTasks, run_until_idle) -> None:
    @contextlib.contextmanager
    def swallow() -> Iterator[None]:
        with contextlib.suppress(Exception):
            yield

    @app.task
    def job(_: None = Depends(swallow)) -> None:
        raise KeyError("still an error")

    record = await job.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).error_type == "KeyError"


async def test_a_dependency_may_receive_the_task_context(app: QueueTasks, run_until_idle) -> None:
    def who(ctx: TaskContext) -> str:
        return f"{ctx.name}#{ctx.attempt}"

    @app.task
    def job(me: str = Depends(who)) -> str:
        return me

    record = await job.add_task()
    await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == "job#0"


async def test_a_failing_dependency_fails_the_task_and_is_retried_next_time(
    app: QueueTasks, run_until_idle
) -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("down")
        return "up"

    @app.task(retry=1, retry_backoff=0.0)
    async def job(state: str = Depends(flaky, "worker")) -> str:
        return state

    record = await job.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert (final.status, final.returning, final.attempts) == (TaskStatusEnum.SUCCESS, "up", 2)


# -- overrides -------------------------------------------------------------------------------


async def test_dependency_overrides_replace_a_dependency(backend_app: QueueTasks) -> None:
    app = backend_app

    def real_db() -> str:
        raise AssertionError("the real database is not used in tests")

    def fake_db() -> Iterator[str]:
        yield "fake"

    @app.task
    async def query(db: str = Depends(real_db, scope="worker")) -> str:
        return db

    app.dependency_overrides[real_db] = fake_db
    (final,) = await run_tasks(app, [await query.add_task()])
    assert final.returning == "fake"


# -- the graph is checked at registration ---------------------------------------------------


def test_a_dependency_cycle_is_rejected(app: QueueTasks) -> None:
    def a(x: Any = None) -> None: ...

    def b(y: Any = Depends(a)) -> None: ...

    a.__defaults__ = (Depends(b),)
    with pytest.raises(ConfigurationError, match=r"dependency cycle: .*a -> .*b -> .*a"):

        @app.task
        def job(v: Any = Depends(a)) -> None: ...


def test_a_longer_lived_dependency_cannot_use_a_shorter_lived_one(app: QueueTasks) -> None:
    def per_task() -> int:
        return 1

    def per_worker(n: int = Depends(per_task)) -> int:
        return n

    with pytest.raises(ConfigurationError, match=r"\(scope worker\) depends on .*per_task"):

        @app.task
        def job(v: int = Depends(per_worker, scope="worker")) -> None: ...


def test_unprovidable_parameters_and_bad_scopes_are_rejected(app: QueueTasks) -> None:
    def needs(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="cannot provide parameter 'x'"):

        @app.task
        def job(v: int = Depends(needs)) -> None: ...

    with pytest.raises(ConfigurationError, match="unknown dependency scope 'process'"):
        Depends(needs, scope="process")

    def ctx_user(ctx: TaskContext) -> None: ...

    with pytest.raises(ConfigurationError, match="only task-scope dependencies"):

        @app.task
        def other(v: None = Depends(ctx_user, scope="worker")) -> None: ...


def test_depends_is_a_small_frozen_marker() -> None:
    def db() -> None: ...

    mark = Depends(db, scope="worker")
    assert mark == Depends(db, Scope.WORKER)
    assert mark.scope is Scope.WORKER
    assert "scope='worker'" in repr(mark)
    with pytest.raises(AttributeError):
        mark.scope = Scope.TASK  # type: ignore[misc]
