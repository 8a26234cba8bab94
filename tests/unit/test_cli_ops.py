"""The operator commands (stats inspect, add, cancel, retry, purge), in process via main().

Each test writes an app module to a fresh folder, on memory:// (its state lives in the
module, which main() loads from sys.modules) or on an SQLite file there, and checks the
command's output and exit code.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qtasks import TaskStatusEnum
from qtasks.cli.main import main
from qtasks.cli.operations import CANCELLED_MESSAGE
from qtasks.runtime.worker import Worker

PREFIX = "qt_cli_ops_test_"

APP_SOURCE = """
    from qtasks.asyncio import QueueTasks
    from qtasks.brokers.memory import MemoryBroker
    from qtasks.errors import BrokerError

    app = QueueTasks("ops", broker_url=URL)

    @app.task
    async def hello(name: str, punctuation: str = "!") -> str:
        return f"hi {name}{punctuation}"

    @app.task
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.task(queue="other", priority=3)
    async def elsewhere() -> None:
        pass

    class UnreachableBroker(MemoryBroker):
        async def start(self):
            raise BrokerError("cannot connect to redis://10.255.0.1:6379/0: timed out\\nmore")

    unreachable = QueueTasks("down", broker=UnreachableBroker(), storage_url="memory://")

    from qtasks.interfaces import Broker, Storage
    from qtasks.storages.memory import MemoryStorage

    class PlainBroker(MemoryBroker):  # the interface's defaults: no discard, no purge
        discard = Broker.discard
        purge = Broker.purge
        dead_letters = Broker.dead_letters
        drop_dead_letters = Broker.drop_dead_letters

    class PlainStorage(MemoryStorage):  # cannot list records by status
        recent = Storage.recent

    limited = QueueTasks(
        "limited", broker=PlainBroker(), storage=PlainStorage(), storage_url="memory://"
    )
"""


@pytest.fixture(params=["memory", "sqlite"])
def ops(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """The app module (memory:// or an SQLite file in tmp_path), imported as main() will."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    name = PREFIX + uuid.uuid4().hex[:8]
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'q.db'}"
    source = textwrap.dedent(APP_SOURCE).replace("URL", repr(url))
    (tmp_path / f"{name}.py").write_text(source)
    module = importlib.import_module(name)
    yield module
    asyncio.run(module.app.stop())
    for loaded in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[loaded]


def run(module: ModuleType, *argv: str, app: str = "app") -> int:
    return main(["-A", f"{module.__name__}:{app}", *argv])


def on_app(module: ModuleType, coro_fn: Any) -> Any:
    """Run `coro_fn(app)` on a loop of its own, then stop the app (as a separate process)."""

    async def go() -> Any:
        await module.app.start()
        try:
            return await coro_fn(module.app)
        finally:
            await module.app.stop()

    return asyncio.run(go())


def work(module: ModuleType, *uuids: Any) -> dict[str, Any]:
    """Run a worker until `uuids` are final; return its registry entry, re-registered after
    it stopped, as a worker in another process would still have it."""

    async def go(app: Any) -> dict[str, Any]:
        worker = Worker()
        await app.start()
        await worker.start(app)
        for u in uuids:
            await app.wait(u, 5)
        info = worker.info()
        await worker.stop()
        await app.global_config.register_worker(info)
        return info

    result: dict[str, Any] = on_app(module, go)
    return result


def add(module: ModuleType, name: str, *args: Any, **options: Any) -> str:
    async def go(app: Any) -> str:
        record = await app.add_task(name, *args, **options)
        return str(record.uuid)

    result: str = on_app(module, go)
    return result


def get(module: ModuleType, task_uuid: str) -> Any:
    return on_app(module, lambda app: app.get(task_uuid))


# -- stats inspect ---------------------------------------------------------------------


def test_inspect_app_as_text_and_json(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ops, "stats", "inspect", "app") == 0
    out = capsys.readouterr().out
    assert "app ops" in out
    assert "3: boom, elsewhere, hello" in out
    assert "0 alive, 0 lost" in out
    for form in (["--json"], ["json=True"]):
        assert run(ops, "stats", "inspect", "app", *form) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["name"] == "ops"
        assert data["queues"] == ["default", "other"]


def test_inspect_tasks_workers_and_failures_after_work(
    ops: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = add(ops, "hello", "amy")
    bad = add(ops, "boom")
    info = work(ops, ok, bad)

    assert run(ops, "stats", "inspect", "tasks") == 0
    out = capsys.readouterr().out
    assert "processed" in out
    assert "hello" in out
    assert "boom" in out

    assert run(ops, "stats", "inspect", "tasks", "hello", "--json") == 0
    (hello,) = json.loads(capsys.readouterr().out)
    assert (hello["name"], hello["processed"], hello["succeeded"]) == ("hello", 1, 1)

    assert run(ops, "stats", "inspect", "task", "boom", "json=True") == 0
    boom = json.loads(capsys.readouterr().out)
    assert (boom["failed"], boom["succeeded"]) == (1, 0)
    assert sum(boom["duration"]["counts"]) == 1

    assert run(ops, "stats", "inspect", "task", "boom") == 0
    assert "duration mean / p95" in capsys.readouterr().out

    assert run(ops, "stats", "inspect", "workers") == 0
    out = capsys.readouterr().out
    assert info["id"][:8] in out
    assert "alive" in out

    assert run(ops, "stats", "inspect", "workers", "--json") == 0
    (worker,) = json.loads(capsys.readouterr().out)
    assert worker["status"] == "alive"
    assert worker["tasks"]["hello"]["succeeded"] == 1

    assert run(ops, "stats", "inspect", "failures") == 0
    out = capsys.readouterr().out
    assert bad in out
    assert "RuntimeError: kaput" in out

    assert run(ops, "stats", "inspect", "failures", "5", "--json") == 0
    assert [r["uuid"] for r in json.loads(capsys.readouterr().out)] == [bad]

    assert run(ops, "stats", "inspect", "task_status", bad) == 0
    out = capsys.readouterr().out
    assert "Traceback" in out
    assert "RuntimeError: kaput" in out

    assert run(ops, "stats", "inspect", "task_status", ok, "--json") == 0
    assert json.loads(capsys.readouterr().out)["returning"] == "hi amy!"


def test_inspect_queues(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    add(ops, "hello", "a")
    add(ops, "hello", "b", priority=2)
    add(ops, "elsewhere")
    add(ops, "hello", "later", delay=3600)
    assert run(ops, "stats", "inspect", "queues") == 0
    out = capsys.readouterr().out
    default_row = next(line for line in out.splitlines() if line.strip().startswith("default"))
    assert default_row.split()[:5] == ["default", "3", "2", "1", "0"]
    assert "0:1 2:1" in default_row
    assert run(ops, "stats", "inspect", "queues", "other", "--json") == 0
    (other,) = json.loads(capsys.readouterr().out)
    assert (other["queue"], other["ready"], other["by_priority"]) == ("other", 1, {"3": 1})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["task"], "exactly one task name"),
        (["task_status"], "exactly one task uuid"),
        (["app", "extra"], "takes no names"),
        (["failures", "many"], "positive count"),
        (["tasks", "json=maybe"], "json=True or json=False"),
        (["nonsense"], "Invalid value"),
    ],
)
def test_inspect_usage_errors_exit_2(
    ops: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(ops, "stats", "inspect", *argv) == 2
    assert message in capsys.readouterr().err


def test_inspect_unknown_task_or_uuid(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ops, "stats", "inspect", "task", "nope") == 2
    assert "nope" in capsys.readouterr().err
    assert run(ops, "stats", "inspect", "task_status", "123") == 1
    assert capsys.readouterr().err == "Error: no task 123 (unknown or expired)\n"


# -- add -------------------------------------------------------------------------------


def test_add_enqueues_with_json_arguments(
    ops: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(ops, "add", "hello", '"bob"', "--kwargs", '{"punctuation": "?"}', "--priority", "4")
    assert code == 0
    out = capsys.readouterr().out.split()
    assert out[:2] == ["enqueued", "hello"]
    record = get(ops, out[2])
    assert (record.args, record.kwargs, record.priority) == (["bob"], {"punctuation": "?"}, 4)
    assert record.status is TaskStatusEnum.NEW

    assert run(ops, "add", "elsewhere", "-Q", "default") == 0
    record = get(ops, capsys.readouterr().out.split()[2])
    assert record.queue == "default"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hello", "bob"], "is not a JSON value"),
        (["hello", '"a"', "--kwargs", "[1]"], "must be a JSON object"),
        (["hello", '"a"', "--kwargs", "{"], "is not valid JSON"),
        (["hello"], "missing a required argument"),
        (["hello", "--wait", "-1"], "Invalid value"),
    ],
)
def test_add_bad_arguments_exit_2(
    ops: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run(ops, "add", *argv) == 2
    assert message in capsys.readouterr().err


def test_add_wait_reports_a_timeout(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ops, "add", "hello", '"x"', "--wait", "0") == 1
    err = capsys.readouterr().err
    assert "did not finish within 0s" in err
    assert err.count("\n") == 1


# -- cancel ----------------------------------------------------------------------------


def test_cancel_a_queued_task(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    task_uuid = add(ops, "hello", "x")
    assert run(ops, "cancel", task_uuid) == 0
    assert capsys.readouterr().out == f"cancelled hello {task_uuid}\n"
    record = get(ops, task_uuid)
    assert record.status is TaskStatusEnum.CANCEL
    assert record.error_message == CANCELLED_MESSAGE
    assert on_app(ops, lambda app: app.broker.queue_sizes(["default"])) == {"default": 0}

    assert run(ops, "cancel", task_uuid) == 1
    assert "already finished with status cancel" in capsys.readouterr().err
    assert run(ops, "cancel", "123") == 1
    assert "no task 123" in capsys.readouterr().err


def test_cancel_leaves_a_claimed_task_alone(
    ops: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    task_uuid = add(ops, "hello", "x")

    async def claim(app: Any) -> None:
        await app.start()
        (delivery,) = await app.broker.fetch(["default"], 1, 0.0)
        assert delivery is not None

    # A broker gives its claims back when it stops: claim without stopping, as a worker
    # that is still running would hold it.
    asyncio.run(claim(ops.app))
    assert run(ops, "cancel", task_uuid) == 1
    err = capsys.readouterr().err
    assert "claimed by a worker" in err
    assert "run to its end" in err
    assert get(ops, task_uuid).status is TaskStatusEnum.NEW


# -- retry -----------------------------------------------------------------------------


def test_retry_a_failed_task(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    bad = add(ops, "hello", "x")
    work(ops, bad)
    assert run(ops, "retry", bad) == 1  # it succeeded
    assert "only failed or cancelled tasks" in capsys.readouterr().err

    failed = add(ops, "boom")
    work(ops, failed)
    assert run(ops, "retry", failed) == 0
    words = capsys.readouterr().out.split()
    assert words[:3] == ["retrying", "boom", failed]
    new = get(ops, words[-1])
    assert (new.name, new.status, new.args) == ("boom", TaskStatusEnum.NEW, [])
    assert on_app(ops, lambda app: app.broker.queue_sizes(["default"])) == {"default": 1}

    assert run(ops, "retry", "123") == 1
    assert "no task 123" in capsys.readouterr().err


# -- purge -----------------------------------------------------------------------------


def test_purge_needs_yes_and_empties_queues(
    ops: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    queued = [add(ops, "hello", str(n)) for n in range(3)]
    other = add(ops, "elsewhere")
    assert run(ops, "purge") == 2
    assert "pass --yes" in capsys.readouterr().err

    assert run(ops, "purge", "-Q", "default", "--yes") == 0
    assert capsys.readouterr().out == "purged 3 queued task(s) from default\n"
    assert all(get(ops, u).status is TaskStatusEnum.CANCEL for u in queued)
    assert get(ops, other).status is TaskStatusEnum.NEW

    assert run(ops, "purge", "--yes") == 0
    assert capsys.readouterr().out == "purged 1 queued task(s) from default, other\n"
    sizes = on_app(ops, lambda app: app.broker.queue_sizes(["default", "other"]))
    assert sizes == {"default": 0, "other": 0}


# -- errors every command shares ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "inspect", "queues"],
        ["add", "x"],
        ["cancel", "123"],
        ["retry", "123"],
        ["purge", "--yes"],
    ],
)
def test_unreachable_broker_is_one_line_and_exit_1(
    ops: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert run(ops, *argv, app="unreachable") == 1
    err = capsys.readouterr().err
    assert err == "Error: cannot connect to redis://10.255.0.1:6379/0: timed out\n"


def test_backends_without_support_say_so(
    ops: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(ops, "stats", "inspect", "failures", app="limited") == 1
    assert "PlainStorage cannot list failed tasks" in capsys.readouterr().err
    task_uuid = on_app_named(ops, "limited", lambda app: app.add_task("x"))
    assert run(ops, "cancel", str(task_uuid.uuid), app="limited") == 1
    assert "cannot cancel: PlainBroker cannot remove queued messages" in capsys.readouterr().err
    assert run(ops, "purge", "--yes", app="limited") == 1
    assert "cannot purge: PlainBroker cannot purge queues" in capsys.readouterr().err
    assert run(ops, "stats", "inspect", "queues", app="limited") == 0
    assert "default" in capsys.readouterr().out
    assert run(ops, "dlq", "list", app="limited") == 1
    assert "cannot list dead letters: PlainBroker keeps no dead letters" in capsys.readouterr().err
    assert run(ops, "dlq", "drop", "--all", app="limited") == 1
    assert "cannot drop dead letters: PlainBroker" in capsys.readouterr().err


def on_app_named(module: ModuleType, name: str, coro_fn: Any) -> Any:
    """`on_app` for another app of the module."""
    app = getattr(module, name)

    async def go() -> Any:
        await app.start()
        try:
            return await coro_fn(app)
        finally:
            await app.stop()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "inspect", "app"],
        ["add", "x"],
        ["cancel", "1"],
        ["retry", "1"],
        ["purge"],
        ["dlq", "list"],
        ["dlq", "drop", "--all"],
    ],
)
def test_no_app_exits_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QTASKS_APP", raising=False)
    assert main(argv) == 2
    assert "no app given" in capsys.readouterr().err


# -- dlq ---------------------------------------------------------------------------------


def test_dlq_list_retry_drop(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ops, "dlq", "list") == 0
    assert capsys.readouterr().out.strip() == "no dead letters"
    first, second, third = add(ops, "boom"), add(ops, "boom"), add(ops, "nope")
    work(ops, first, second, third)

    assert run(ops, "dlq", "list") == 0
    out = capsys.readouterr().out
    for u in (first, second, third):
        assert u in out
    assert "RuntimeError: kaput" in out
    assert "unknown_task" in out
    assert "failed" in out

    assert run(ops, "dlq", "list", "--json", "--limit", "2") == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 2
    assert {"uuid", "reason", "detail", "queue", "body", "dead_at"} <= set(data[0])

    assert run(ops, "dlq", "retry", first) == 0
    assert capsys.readouterr().out == f"1 dead letter(s) sent again\n{first}\n"
    assert get(ops, first).status is TaskStatusEnum.NEW
    work(ops, first)
    assert get(ops, first).status is TaskStatusEnum.ERROR, "boom fails again"

    missing = str(uuid.uuid4())
    assert run(ops, "dlq", "drop", second, missing) == 1
    assert f"no dead letter {missing}" in capsys.readouterr().err
    assert run(ops, "dlq", "drop", second) == 0
    assert capsys.readouterr().out == f"1 dead letter(s) dropped\n{second}\n"

    assert run(ops, "dlq", "drop") == 2
    assert "UUID...) or pass --all" in capsys.readouterr().err
    assert run(ops, "dlq", "drop", "--all", "-Q", "other") == 0
    assert capsys.readouterr().out.startswith("0 dead letter(s) dropped")
    assert run(ops, "dlq", "drop", "--all") == 0
    assert capsys.readouterr().out.startswith("2 dead letter(s) dropped")
    assert run(ops, "dlq", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_dlq_retry_all(ops: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    bad = add(ops, "boom")
    work(ops, bad)
    assert run(ops, "dlq", "retry", "--all") == 0
    assert capsys.readouterr().out == f"1 dead letter(s) sent again\n{bad}\n"
    assert run(ops, "dlq", "retry", "--all", bad) == 2
