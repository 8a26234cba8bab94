"""`load_app`: every way to name an app, and one clear line (exit code 2) for each mistake."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qtasks.app import AsyncQueueTasks
from qtasks.cli.loader import AppLoadError, load_app
from qtasks.cli.main import main
from qtasks.sync import QueueTasks

PREFIX = "qt_loader_test_"

MakeModule = Callable[..., str]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write a module into a fresh current directory; returns its unique dotted name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the cwd on it
    monkeypatch.syspath_prepend(str(tmp_path))  # for load_app called directly

    def make(source: str, *, package: bool = False) -> str:
        name = PREFIX + uuid.uuid4().hex[:8]
        body = textwrap.dedent(source)
        if package:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("")
            (tmp_path / name / "sub.py").write_text(body)
            return f"{name}.sub"
        (tmp_path / f"{name}.py").write_text(body)
        return name

    yield make
    for module in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[module]


APPS = """
    from qtasks.app import AsyncQueueTasks
    from qtasks.sync import QueueTasks

    app = QueueTasks("sync-app", broker_url="memory://")
    core = AsyncQueueTasks("async-app", broker_url="memory://")
    answer = 42

    class apps:
        main = AsyncQueueTasks("nested-app", broker_url="memory://")

    def create_app():
        return AsyncQueueTasks("made-app", broker_url="memory://")

    def create_nothing():
        return None
"""


def load_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, check it failed with code 2 and one line, and return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("Error: ")
    return err.removeprefix("Error: ").rstrip("\n")


# -- what loads ------------------------------------------------------------------------


def test_sync_app_gives_its_async_core(make_module: MakeModule) -> None:
    module = make_module(APPS)
    core = load_app(f"{module}:app")
    facade = sys.modules[module].app
    assert isinstance(facade, QueueTasks)
    assert core is facade.core


def test_async_app_is_its_own_core(make_module: MakeModule) -> None:
    module = make_module(APPS)
    core = load_app(f"{module}:core")
    assert isinstance(core, AsyncQueueTasks)
    assert core.name == "async-app"


def test_bare_module_means_attribute_app(make_module: MakeModule) -> None:
    assert load_app(make_module(APPS)).name == "sync-app"


def test_dotted_attribute(make_module: MakeModule) -> None:
    assert load_app(f"{make_module(APPS)}:apps.main").name == "nested-app"


def test_factory_is_called(make_module: MakeModule) -> None:
    assert load_app(f"{make_module(APPS)}:create_app()").name == "made-app"


def test_module_in_a_package(make_module: MakeModule) -> None:
    assert load_app(f"{make_module(APPS, package=True)}:core").name == "async-app"


def test_subclass_of_an_app_is_an_app(make_module: MakeModule) -> None:
    module = make_module(
        """
        from qtasks.app import AsyncQueueTasks

        class MyApp(AsyncQueueTasks):
            pass

        app = MyApp("mine", broker_url="memory://")
        """
    )
    assert load_app(module).name == "mine"


def test_error_is_a_configuration_error() -> None:
    from qtasks.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="expected module:attribute"):
        load_app("a:b:c")


# -- what fails, as the CLI reports it ---------------------------------------------------


@pytest.mark.parametrize(
    "path", ["a:b:c", "", ":app", "mod:", "1mod:app", "mod:app(1)", ".rel:app"]
)
def test_bad_format(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    message = load_error(["-A", path, "run"], capsys)
    assert message == f"expected module:attribute, got {path!r}"


def test_file_path_instead_of_module(capsys: pytest.CaptureFixture[str]) -> None:
    message = load_error(["-A", "proj/tasks.py:app", "run"], capsys)
    assert (
        message == "expected module:attribute (a module name, not a file), got 'proj/tasks.py:app'"
    )


def test_missing_module(make_module: MakeModule, capsys: pytest.CaptureFixture[str]) -> None:
    message = load_error(["-A", f"{PREFIX}missing:app", "run"], capsys)
    assert message.startswith(f"module '{PREFIX}missing' not found; run qtasks from the directory")


def test_missing_parent_package(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    message = load_error(["-A", f"{PREFIX}nopkg.tasks:app", "run"], capsys)
    assert message.startswith(f"module '{PREFIX}nopkg.tasks' not found")


def test_module_whose_own_import_is_missing(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(f"import {PREFIX}not_installed\napp = None\n")
    message = load_error(["-A", f"{module}:app", "run"], capsys)
    assert message == (
        f"importing {module!r} failed: ModuleNotFoundError: No module named '{PREFIX}not_installed'"
    )


def test_module_with_a_broken_import(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module("from os import no_such_name\n")
    message = load_error(["-A", module, "run"], capsys)
    assert message.startswith(f"importing {module!r} failed: ImportError: cannot import name")


def test_missing_attribute_suggests_apps(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(APPS)
    message = load_error(["-A", f"{module}:ap", "run"], capsys)
    assert message == f"module {module!r} has no attribute 'ap' (qtasks apps in it: app, core)"


def test_missing_dotted_attribute(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(APPS)
    message = load_error(["-A", f"{module}:apps.other", "run"], capsys)
    assert message.startswith(f"module {module!r} has no attribute 'apps.other'")


def test_bare_module_without_app(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(
        "from qtasks.app import AsyncQueueTasks\nw = AsyncQueueTasks(broker_url='memory://')\n"
    )
    message = load_error(["-A", module, "run"], capsys)
    assert message == (
        f"module {module!r} has no attribute 'app'; name the app: -A {module}:<attribute> "
        f"(qtasks apps in it: w)"
    )


def test_missing_attribute_without_apps(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module("x = 1\n")
    message = load_error(["-A", f"{module}:app", "run"], capsys)
    assert message == f"module {module!r} has no attribute 'app'"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("answer", "is an object of type int"),
        ("apps", "is the class apps"),
        ("create_nothing()", "returned an object of type NoneType"),
    ],
)
def test_not_an_app(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str], target: str, expected: str
) -> None:
    module = make_module(APPS)
    message = load_error(["-A", f"{module}:{target}", "run"], capsys)
    assert (
        message
        == f"'{module}:{target}' {expected}, not a qtasks app (QueueTasks or AsyncQueueTasks)"
    )


def test_factory_that_is_not_callable(
    make_module: MakeModule, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(APPS)
    message = load_error(["-A", f"{module}:answer()", "run"], capsys)
    assert message == f"'{module}:answer' is an object of type int, not a factory to call"


def test_missing_app_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QTASKS_APP", raising=False)
    message = load_error(["run"], capsys)
    assert message == "no app given: pass -A module:app or set QTASKS_APP"


def test_error_from_load_app_is_one_line() -> None:
    with pytest.raises(AppLoadError) as info:
        load_app(f"{PREFIX}missing")
    assert "\n" not in str(info.value)
