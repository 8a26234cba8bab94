"""Plugins and triggers: registration, chaining, checks, errors, lifecycles, every trigger."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qtasks import ConfigurationError, TaskContext, TaskStatusEnum
from qtasks import QueueTasks as SyncQueueTasks
from qtasks.asyncio import QueueTasks
from qtasks.errors import PluginError, TaskPluginTriggerError
from qtasks.plugins.base import BasePlugin, PluginRegistry, entry_for
from qtasks.plugins.triggers import TRIGGERS, OnError, render_markdown
from qtasks.runtime.starter import Starter
from qtasks.runtime.worker import Worker

from .plugin_backends import BACKENDS, app_on, run_tasks, worker_running


@pytest.fixture(params=BACKENDS)
async def backend_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueTasks]:
    """An async app on each backend in turn."""
    async with app_on(request.param, tmp_path) as app:
        yield app


DOCS = Path(__file__).resolve().parents[2] / "docs" / "triggers.md"


class Recorder(BasePlugin):
    """Records every trigger it hears with the keyword names it got."""

    def __init__(self, names: tuple[str, ...] = tuple(TRIGGERS), name: str = "recorder"):
        super().__init__(name)
        self.triggers_heard: list[tuple[str, tuple[str, ...]]] = []
        self.names = names
        self.started = 0
        self.stopped = 0

    def default_triggers(self) -> tuple[str, ...]:
        return self.names

    def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    def trigger(self, name: str, **kwargs: Any) -> None:
        self.triggers_heard.append((name, tuple(kwargs)))

    def heard(self) -> list[str]:
        return [name for name, _ in self.triggers_heard]


class Replace(BasePlugin):
    """Returns a fixed function of the payload for one trigger."""

    def __init__(self, trigger: str, change: Any, name: str | None = None) -> None:
        super().__init__(name)
        self.handlers = {trigger: change}


# -- the declarations and the docs ---------------------------------------------------------


def test_docs_table_is_generated_from_the_declarations() -> None:
    assert DOCS.read_text() == render_markdown(), (
        "docs/triggers.md is stale: python -m qtasks.plugins > docs/triggers.md"
    )


def test_every_trigger_is_named_for_its_component_and_documented() -> None:
    for name, spec in TRIGGERS.items():
        assert name.startswith(spec.component + "_")
        assert spec.when
        assert spec.payload
        assert spec.payload[0] in (spec.component, "app" if spec.component == "qtasks" else "")
        assert set(spec.replaces) <= set(spec.payload)


def test_unknown_trigger_names_suggest_close_ones(app: QueueTasks) -> None:
    with pytest.raises(ConfigurationError, match="did you mean task_executor_args_replace"):
        app.add_plugin(Recorder(), ["task_executor_arg_replace"])


def test_component_must_fire_the_triggers(app: QueueTasks) -> None:
    app.add_plugin(Recorder(), ["task_executor_args_replace"], component="worker")  # worker's
    app.add_plugin(Recorder(), ["storage_add"], component="storage")
    with pytest.raises(ConfigurationError, match="fired by storage, not by broker"):
        app.add_plugin(Recorder(), ["storage_add"], component="broker")
    with pytest.raises(ConfigurationError, match="unknown component"):
        app.add_plugin(Recorder(), ["storage_add"], component="db")


def test_a_plugin_must_listen_to_something_and_be_a_plugin(app: QueueTasks) -> None:
    with pytest.raises(ConfigurationError, match="listens to no trigger"):
        app.add_plugin(BasePlugin())
    with pytest.raises(ConfigurationError, match=r"subclass qtasks\.plugins\.base\.BasePlugin"):
        app.add_plugin(object(), ["storage_add"])  # type: ignore[arg-type]


def test_a_trigger_nobody_listens_to_is_not_in_the_registry() -> None:
    registry = PluginRegistry()
    registry.add(entry_for(Recorder(), ["worker_start"]))
    assert "worker_start" in registry
    assert "task_executor_args_replace" not in registry  # the whole cost: one dict lookup


async def test_fire_without_listeners_changes_nothing() -> None:
    assert await PluginRegistry().fire("task_executor_run_task", result=1) == {}


# -- replacements ----------------------------------------------------------------------------


async def test_two_plugins_chain_their_replacements_in_order(backend_app: QueueTasks) -> None:
    app = backend_app
    seen: list[tuple[str, list[Any], dict[str, Any]]] = []

    def first(task_executor: Any, task: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        seen.append(("first", args, kwargs))
        return {"args": [a * 10 for a in args]}

    async def second(task_executor: Any, task: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        seen.append(("second", args, kwargs))
        assert task.name == "add"
        assert task.uuid is not None
        return {"args": [a + 1 for a in args], "kwargs": {"extra": 5}}

    app.add_plugin(Replace("task_executor_args_replace", first, "first"))
    app.add_plugin(Replace("task_executor_args_replace", second, "second"), component="worker")

    @app.task
    def add(x: int, y: int, extra: int = 0) -> int:
        return x + y + extra

    (final,) = await run_tasks(app, [await add.add_task(1, 2)])
    assert final.returning == 11 + 21 + 5
    assert seen == [("first", [1, 2], {}), ("second", [10, 20], {})]


async def test_result_triggers_replace_the_stored_result(app: QueueTasks, run_until_idle) -> None:
    app.add_plugin(Replace("task_executor_run_task", lambda result, **_: {"result": result * 2}))
    app.add_plugin(
        Replace("task_executor_run_task_gen", lambda result, **_: {"result": sum(result)})
    )
    app.add_plugin(Replace("task_executor_decode", lambda result, **_: {"result": [result]}))

    @app.task
    async def plain() -> int:
        return 4

    @app.task
    def gen() -> Any:
        yield 1
        yield 2

    a, b = await plain.add_task(), await gen.add_task()
    await run_until_idle(app)
    assert (await app.get(a.uuid)).returning == [8]
    assert (await app.get(b.uuid)).returning == [3]


async def test_producer_triggers_replace_message_record_and_envelope(app: QueueTasks) -> None:
    import msgspec

    def bump_priority(app: Any, message: Any) -> Any:
        return {"message": msgspec.structs.replace(message, priority=7)}

    def tag_record(storage: Any, message: Any, record: Any) -> Any:
        return {"record": msgspec.structs.replace(record, name="renamed-record")}

    app.add_plugin(Replace("qtasks_add_task_before_broker", bump_priority))
    app.add_plugin(Replace("storage_add", tag_record))
    app.add_plugin(Replace("qtasks_get", lambda record, **_: {"record": None}))

    @app.task
    def job() -> None: ...

    record = await job.add_task()
    assert record.priority == 7
    assert record.name == "renamed-record"
    assert await app.get(record.uuid) is None  # qtasks_get replaced it
    assert len(app.storage) == 1


async def test_a_replaced_message_must_still_fit_the_signature(app: QueueTasks) -> None:
    import msgspec

    app.add_plugin(
        Replace(
            "qtasks_add_task_before_broker",
            lambda app, message: {"message": msgspec.structs.replace(message, args=[])},
        )
    )

    @app.task
    def need(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="a plugin's message"):
        await need.add_task(1)
    assert len(app.storage) == 0


@pytest.mark.parametrize(
    ("returned", "why"),
    [
        ({"args": {"a": 1}}, "replacement 'args' must be a list or tuple"),
        ({"argz": [1]}, "'argz' cannot be replaced"),
        (5, "return None or a mapping with some of 'args', 'kwargs'"),
        ({"kwargs": {1: 2}}, "replacement 'kwargs' must be a mapping with str keys"),
    ],
)
async def test_a_malformed_replacement_fails_the_task_and_is_not_retried(
    recording_storage, run_until_idle, returned: Any, why: str
) -> None:
    app = QueueTasks(broker_url="memory://", storage=recording_storage)
    app.add_plugin(Replace("task_executor_args_replace", lambda **_: returned, "shaper"))

    @app.task(retry=3)
    def job(x: int) -> int:
        return x

    record = await job.add_task(1)
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert final.status is TaskStatusEnum.ERROR
    assert final.error_type == "PluginError"
    assert "plugin 'shaper' failed in trigger 'task_executor_args_replace'" in final.error_message
    assert why in final.error_message
    assert recording_storage.statuses(record.uuid)[-1] is TaskStatusEnum.ERROR
    assert TaskStatusEnum.RETRY not in recording_storage.statuses(record.uuid)
    await app.stop()


async def test_a_notification_trigger_rejects_a_return_value() -> None:
    registry = PluginRegistry()
    registry.add(entry_for(Replace("starter_start", lambda **_: {"x": 1}, "talker")))
    with pytest.raises(PluginError, match="'x' cannot be replaced; starter_start replaces nothing"):
        await registry.fire("starter_start", starter=None, app=None, worker=None)


# -- errors ------------------------------------------------------------------------------------


async def test_a_raising_plugin_fails_its_task_and_the_worker_goes_on(
    backend_app: QueueTasks,
) -> None:
    app = backend_app

    def explode(task: Any, **_: Any) -> None:
        if task.args == [0]:
            raise RuntimeError("boom")

    app.add_plugin(Replace("task_executor_args_replace", explode, "exploder"))

    @app.task
    async def job(x: int) -> int:
        return x

    finals = await run_tasks(app, [await job.add_task(i) for i in range(4)])
    assert [f.status for f in finals] == [TaskStatusEnum.ERROR] + [TaskStatusEnum.SUCCESS] * 3
    assert finals[0].error_message == (
        "plugin 'exploder' failed in trigger 'task_executor_args_replace': RuntimeError: boom"
    )
    assert [f.returning for f in finals[1:]] == [1, 2, 3]


async def test_raising_in_worker_triggers_fails_only_that_task(
    app: QueueTasks, run_until_idle
) -> None:
    def before(message: Any, **_: Any) -> None:
        if message.args == [1]:
            raise ValueError("before")

    def after(message: Any, **_: Any) -> None:
        if message.args == [2]:
            raise ValueError("after")

    app.add_plugin(Replace("worker_execute_before", before, "b"))
    app.add_plugin(Replace("worker_execute_after", after, "a"))

    @app.task(retry=2)
    def job(x: int) -> int:
        return x

    records = [await job.add_task(i) for i in range(3)]
    await run_until_idle(app)
    finals = [await app.get(r.uuid) for r in records]
    assert [f.status for f in finals] == [
        TaskStatusEnum.SUCCESS,
        TaskStatusEnum.ERROR,
        TaskStatusEnum.ERROR,
    ]
    assert "plugin 'b' failed in trigger 'worker_execute_before'" in finals[1].error_message
    assert "plugin 'a' failed in trigger 'worker_execute_after'" in finals[2].error_message


async def test_a_producer_trigger_error_reaches_the_caller(app: QueueTasks) -> None:
    app.add_plugin(Replace("broker_add_before", lambda **_: 1 / 0, "divider"))

    @app.task
    def job() -> None: ...

    with pytest.raises(PluginError, match="plugin 'divider' failed in trigger 'broker_add_before'"):
        await job.add_task()


async def test_a_logged_trigger_error_changes_nothing(
    app: QueueTasks, run_until_idle, caplog: pytest.LogCaptureFixture
) -> None:
    app.add_plugin(Replace("storage_save", lambda **_: 1 / 0, "saver"))
    assert TRIGGERS["storage_save"].on_error is OnError.LOG

    @app.task
    def job() -> int:
        return 1

    record = await job.add_task()
    with caplog.at_level(logging.ERROR, logger="qtasks.plugins.base"):
        await run_until_idle(app)
    assert (await app.get(record.uuid)).returning == 1
    assert "plugin 'saver' failed in trigger 'storage_save': ZeroDivisionError" in caplog.text


async def test_worker_execute_after_may_replace_the_outcome(
    app: QueueTasks, run_until_idle
) -> None:
    from qtasks.executors import Outcome, OutcomeKind

    def forgive(outcome: Outcome, **_: Any) -> Any:
        if outcome.kind is OutcomeKind.ERROR:
            return {"outcome": Outcome(OutcomeKind.SUCCESS, result="forgiven")}
        return None

    app.add_plugin(Replace("worker_execute_after", forgive))

    @app.task
    def fails() -> None:
        raise RuntimeError("x")

    record = await fails.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert (final.status, final.returning) == (TaskStatusEnum.SUCCESS, "forgiven")


# -- TaskPluginTriggerError / ctx.plugin_error ------------------------------------------------


async def test_plugin_error_hands_the_task_to_plugins(backend_app: QueueTasks) -> None:
    app = backend_app
    handled: list[dict[str, Any]] = []

    def on_error(task: Any, error: TaskPluginTriggerError, result: Any, **_: Any) -> Any:
        handled.append(error.kwargs)
        if error.kwargs.get("fallback") is not None:
            return {"result": error.kwargs["fallback"]}
        return None

    app.add_plugin(Replace("task_executor_run_task_trigger_error", on_error))

    @app.task(echo=True)
    async def lookup(ctx: TaskContext, key: str) -> str:
        ctx.plugin_error("not cached", fallback=f"default-{key}" if key != "none" else None)
        return "unreachable"

    @app.task
    def raises() -> None:
        raise TaskPluginTriggerError(fallback=42)

    finals = await run_tasks(
        app, [await lookup.add_task("a"), await lookup.add_task("none"), await raises.add_task()]
    )
    assert finals[0].returning == "default-a"
    assert finals[1].status is TaskStatusEnum.ERROR
    assert finals[1].error_type == "TaskPluginTriggerError"
    assert finals[1].error_message == "not cached"
    assert finals[2].returning == 42
    assert len(handled) == 3


async def test_plugin_error_without_listeners_fails_the_task(
    app: QueueTasks, run_until_idle
) -> None:
    @app.task(echo=True)
    def job(ctx: TaskContext) -> None:
        ctx.plugin_error(reason="nobody listens")

    record = await job.add_task()
    await run_until_idle(app)
    final = await app.get(record.uuid)
    assert (final.status, final.error_type) == (TaskStatusEnum.ERROR, "TaskPluginTriggerError")


# -- per-task plugins and lifecycles ----------------------------------------------------------


async def test_task_plugins_apply_to_their_task_only(app: QueueTasks, run_until_idle) -> None:
    doubler = Replace("task_executor_run_task", lambda result, **_: {"result": result * 2})
    log = Recorder(("worker_execute_before",), name="log")

    @app.task(plugins=[doubler, (log, ["worker_execute_before"])])
    def mine() -> int:
        return 5

    @app.task
    def other() -> int:
        return 5

    a, b = await mine.add_task(), await other.add_task()
    await run_until_idle(app)
    assert (await app.get(a.uuid)).returning == 10
    assert (await app.get(b.uuid)).returning == 5
    assert log.heard() == ["worker_execute_before"]
    assert (log.started, log.stopped) == (1, 1)  # with the worker


def test_task_plugins_can_only_use_per_task_triggers(app: QueueTasks) -> None:
    with pytest.raises(ConfigurationError, match="does not fire while one task runs"):

        @app.task(plugins=[(Recorder(), ["broker_add_before"])])
        def job() -> None: ...


async def test_app_plugins_start_with_the_app_and_worker_plugins_with_the_worker(
    app: QueueTasks,
) -> None:
    on_app = Recorder(("storage_add",), name="app")
    on_worker = Recorder(("worker_execute_before",), name="worker")
    app.add_plugin(on_app)
    app.add_plugin(on_worker, component="worker")
    await app.start()
    assert (on_app.started, on_worker.started) == (1, 0)
    async with worker_running(app):
        assert on_worker.started == 1
    assert on_worker.stopped == 1
    await app.stop()
    assert on_app.stopped == 1
    await app.start()  # started again after a stop
    assert on_app.started == 2


async def test_a_plugin_that_cannot_start_stops_the_app_start(app: QueueTasks) -> None:
    class Broken(Recorder):
        def start(self) -> None:
            raise OSError("no socket")

    ok = Recorder(("storage_add",), name="ok")
    app.add_plugin(ok)
    app.add_plugin(Broken(("storage_add",), name="broken"))
    with pytest.raises(PluginError, match="plugin 'broken' failed in trigger 'start'"):
        await app.start()
    assert (ok.started, ok.stopped) == (1, 1)


def test_the_sync_app_forwards_add_plugin() -> None:
    app = SyncQueueTasks(broker_url="memory://")
    plugin = Recorder(("qtasks_add_task_before_broker",))
    app.add_plugin(plugin)

    @app.task
    def job() -> None: ...

    job.add_task()
    assert plugin.heard() == ["qtasks_add_task_before_broker"]
    assert app.plugins is app.core.plugins
    app.close()


# -- every trigger fires, with the payload it declares ---------------------------------------


async def test_every_declared_trigger_fires_with_its_declared_payload(app: QueueTasks) -> None:
    recorder = Recorder()
    app.add_plugin(recorder)

    @app.task(retry=1, retry_backoff=0.0)
    def flaky(ctx_attempts: list[int] | None = None) -> None:
        raise ValueError("again")

    @app.task
    def steps() -> Any:
        yield 1

    @app.task(echo=True)
    async def handover(ctx: TaskContext) -> None:
        ctx.plugin_error()

    @app.task
    async def fine() -> int:
        return 1

    starter = Starter()
    worker = Worker(concurrency=2)
    serving = asyncio.ensure_future(starter.serve(app, worker))
    records = [await t.add_task() for t in (flaky, steps, handover, fine)]
    for record in records:
        await app.wait(record.uuid, 10)
    await app.get(records[0].uuid)
    starter.request_stop()
    await serving

    heard = dict(recorder.triggers_heard)
    missing = set(TRIGGERS) - set(heard)
    assert not missing, f"never fired: {sorted(missing)}"
    for name, keywords in recorder.triggers_heard:
        assert keywords == TRIGGERS[name].payload, name
