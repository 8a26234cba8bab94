"""The public names: everything in `qtasks.__all__` imports, the documented aliases hold."""

from __future__ import annotations

import importlib
import inspect

import pytest

import qtasks


@pytest.mark.parametrize("name", qtasks.__all__)
def test_every_public_name_is_importable_and_documented(name: str) -> None:
    obj = getattr(qtasks, name)
    module = importlib.import_module("qtasks")
    assert getattr(module, name) is obj
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert inspect.getdoc(obj), f"qtasks.{name} has no docstring"


def test_all_has_no_duplicates_and_is_sorted() -> None:
    assert len(set(qtasks.__all__)) == len(qtasks.__all__)
    assert list(qtasks.__all__) == sorted(qtasks.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from qtasks import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(qtasks.__all__)


def test_executors_module() -> None:
    from qtasks.executors import AsyncTaskExecutor, TaskExecutor

    assert AsyncTaskExecutor is TaskExecutor
    assert TaskExecutor is qtasks.TaskExecutor


def test_asyncio_module_exports_the_async_app() -> None:
    from qtasks.asyncio import AsyncTask, QueueTasks

    assert QueueTasks is qtasks.AsyncQueueTasks
    assert AsyncTask is qtasks.AsyncTask
    assert QueueTasks is not qtasks.QueueTasks  # the top-level one is the sync facade


def test_sync_app_is_the_top_level_queue_tasks() -> None:
    from qtasks.sync import QueueTasks

    assert qtasks.QueueTasks is QueueTasks


def test_error_tree() -> None:
    for name in (
        "BrokerError",
        "ConfigurationError",
        "DecodeError",
        "EncodeError",
        "StorageError",
        "TaskAlreadyRegistered",
        "TaskTimeout",
        "UnknownTask",
        "WaitTimeout",
    ):
        assert issubclass(getattr(qtasks, name), qtasks.QTasksError), name
    assert issubclass(qtasks.TaskAlreadyRegistered, qtasks.ConfigurationError)
    # control flow that user code raises stands apart from errors
    assert not issubclass(qtasks.Retry, qtasks.QTasksError)
    assert not issubclass(qtasks.Cancel, qtasks.QTasksError)


def test_errors_carry_their_context() -> None:
    assert qtasks.UnknownTask("x").name == "x"
    assert qtasks.TaskAlreadyRegistered("x").name == "x"
    timeout = qtasks.TaskTimeout("job", 1.5)
    assert (timeout.name, timeout.max_time) == ("job", 1.5)
    wait = qtasks.WaitTimeout("abc", 2.0)
    assert (wait.uuid, wait.timeout) == ("abc", 2.0)
    assert qtasks.Cancel("why").reason == "why"
    assert qtasks.Cancel().reason == "cancelled"


def test_status_enum_values() -> None:
    statuses = qtasks.TaskStatusEnum
    assert {s.value for s in statuses} == {"new", "process", "retry", "success", "error", "cancel"}
    assert statuses("success") is statuses.SUCCESS
    assert str(statuses.ERROR) == "error"
    assert statuses.SUCCESS == "success"
    final = {s for s in statuses if s.is_final}
    assert final == {statuses.SUCCESS, statuses.ERROR, statuses.CANCEL}


def test_package_is_typed() -> None:
    from importlib import resources

    assert resources.files("qtasks").joinpath("py.typed").is_file()
