"""The `qtasks` command line, called in process through `main(argv) -> int`."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from qtasks.cli import commands
from qtasks.cli.args import RunArgs, parse_log_level, parse_queues
from qtasks.cli.main import main
from qtasks.runtime.supervisor import ChildCommand

PREFIX = "qt_cli_test_"

# An app whose serve() records its arguments instead of running a worker, and a sync app
# served through a Starter that does the same: the CLI sees real qtasks apps.
APP_SOURCE = """
    from qtasks.app import AsyncQueueTasks
    from qtasks.config import QueueConfig
    from qtasks.errors import ConfigurationError
    from qtasks.sync import QueueTasks

    calls = []

    class RecordingApp(AsyncQueueTasks):
        async def serve(self, *, concurrency=None, queues=None):
            calls.append({"app": self.name, "concurrency": concurrency, "queues": queues})

    class RecordingStarter:
        async def serve(self, app, worker):
            calls.append({"app": app.name, "starter": True})

    class InterruptedApp(AsyncQueueTasks):
        async def serve(self, *, concurrency=None, queues=None):
            raise KeyboardInterrupt

    class MisconfiguredApp(AsyncQueueTasks):
        async def serve(self, *, concurrency=None, queues=None):
            raise ConfigurationError("the broker URL is wrong")

    app = RecordingApp("recording", broker_url="memory://")
    sync_app = QueueTasks("sync", broker_url="memory://", starter=RecordingStarter())
    quiet = RecordingApp("quiet", "memory://", config=QueueConfig(logs_default_level="warning"))
    loud = RecordingApp("loud", "memory://", config=QueueConfig(logs_default_level="LOUD"))
    interrupted = InterruptedApp("interrupted", broker_url="memory://")
    misconfigured = MisconfiguredApp("misconfigured", broker_url="memory://")
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module in a fresh current directory with the apps above; returns its name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the cwd on it
    monkeypatch.delenv("QTASKS_APP", raising=False)
    name = PREFIX + uuid.uuid4().hex[:8]
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP_SOURCE))
    yield name
    for module in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[module]


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with its level and handlers put back after the test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


def calls(module: str) -> list[dict[str, object]]:
    """What the module's recording apps were asked to do."""
    recorded: list[dict[str, object]] = sys.modules[module].calls
    return recorded


# -- options that need no app ----------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"qtasks {importlib.metadata.version('qtasks')}\n"


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["run", "--help"]])
def test_help_needs_no_app(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("Usage: qtasks")


def test_no_command_shows_help_as_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "Commands:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "No such option '--bogus'"),
        (["nope"], "No such command 'nope'"),
        (["-A", "m:app", "run", "--concurrency", "0"], "0 is not in the range x>=1"),
        (["-A", "m:app", "run", "--processes", "x"], "'x' is not a valid integer"),
        (["-A", "m:app", "run", "--queues", "a,,b"], "expected comma-separated queue names"),
        (["-A", "m:app", "run", "--log-level", "loud"], "'loud' is not one of"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: qtasks")
    assert message in err


# -- run in this process -----------------------------------------------------------------


def test_run_serves_the_app_with_the_options(app_module: str, root_logger: logging.Logger) -> None:
    argv = ["-A", f"{app_module}:app", "run", "-c", "3", "--queues", "a, b", "-l", "debug"]
    assert main(argv) == 0
    assert calls(app_module) == [{"app": "recording", "concurrency": 3, "queues": ("a", "b")}]
    assert root_logger.level == logging.DEBUG


def test_run_defaults(app_module: str) -> None:
    assert main(["--app", f"{app_module}:app", "run"]) == 0
    assert calls(app_module) == [{"app": "recording", "concurrency": None, "queues": None}]


def test_run_a_sync_app_serves_its_core(app_module: str) -> None:
    assert main(["-A", f"{app_module}:sync_app", "run"]) == 0
    assert calls(app_module) == [{"app": "sync", "starter": True}]


def test_app_from_environment(app_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTASKS_APP", f"{app_module}:app")
    assert main(["run"]) == 0
    assert calls(app_module)[0]["app"] == "recording"


def test_option_wins_over_environment(app_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTASKS_APP", f"{app_module}:nothing_here")
    assert main(["-A", f"{app_module}:app", "run"]) == 0


def test_current_directory_is_importable(app_module: str) -> None:
    sys.path[:] = [p for p in sys.path if p not in ("", str(Path.cwd()))]
    assert main(["-A", f"{app_module}:app", "run"]) == 0
    assert sys.path[0] == str(Path.cwd())


def test_configuration_error_while_serving(
    app_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-A", f"{app_module}:misconfigured", "run"]) == 2
    assert capsys.readouterr().err == "Error: the broker URL is wrong\n"


def test_bad_default_log_level_in_config(
    app_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-A", f"{app_module}:loud", "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: logs_default_level: unknown log level 'LOUD'; use one of DEBUG")


def test_interrupted_exits_130(app_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-A", f"{app_module}:interrupted", "run"]) == 130
    assert "Aborted!" in capsys.readouterr().err


# -- logging -------------------------------------------------------------------------------


def test_logging_uses_the_app_default_level_and_a_clear_format(
    root_logger: logging.Logger,
) -> None:
    root_logger.handlers[:] = []  # as in a fresh process, where the CLI adds its handler
    commands.configure_logging(None, default="warning")
    assert root_logger.level == logging.WARNING
    (handler,) = root_logger.handlers
    assert handler.formatter is not None
    record = logging.LogRecord("qtasks.worker", logging.WARNING, __file__, 1, "hi", None, None)
    line = handler.formatter.format(record)
    assert f"WARNING [{record.process}] qtasks.worker: hi" in line
    assert line[:4].isdigit()  # starts with the time


def test_logging_set_up_by_the_app_is_kept(root_logger: logging.Logger) -> None:
    root_logger.handlers[:] = [logging.NullHandler()]
    root_logger.setLevel(logging.ERROR)
    commands.configure_logging(None, default="DEBUG")
    assert root_logger.level == logging.ERROR  # the app's own choice
    commands.configure_logging("INFO", default="DEBUG")
    assert root_logger.level == logging.INFO  # an explicit --log-level wins
    assert len(root_logger.handlers) == 1


def test_run_uses_the_app_default_log_level(app_module: str, root_logger: logging.Logger) -> None:
    root_logger.handlers[:] = []
    assert main(["-A", f"{app_module}:quiet", "run"]) == 0
    assert root_logger.level == logging.WARNING


# -- run with several processes ------------------------------------------------------------


def test_processes_run_a_supervisor_with_the_same_options(
    app_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[ChildCommand, int]] = []

    def fake_supervise(command: ChildCommand, processes: int) -> int:
        seen.append((command, processes))
        return 0

    monkeypatch.setattr(commands, "supervise", fake_supervise)
    argv = ["-A", f"{app_module}:app", "run", "-p", "3", "-c", "4", "-Q", "a,b", "-l", "info"]
    assert main(argv) == 0
    ((command, processes),) = seen
    assert processes == 3
    assert list(command(0)) == [
        sys.executable,
        "-m",
        "qtasks",
        "-A",
        f"{app_module}:app",
        "run",
        "--processes",
        "1",
        "--concurrency",
        "4",
        "--queues",
        "a,b",
        "--log-level",
        "INFO",
    ]
    assert calls(app_module) == []  # the parent only loads the app to check it


def test_processes_report_a_bad_app_once_before_starting(
    app_module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(command: ChildCommand, processes: int) -> int:
        raise AssertionError("no child should start")

    monkeypatch.setattr(commands, "supervise", fail)
    assert main(["-A", f"{app_module}:missing", "run", "-p", "2"]) == 2
    assert capsys.readouterr().err.startswith("Error: module")


def test_supervisor_exit_code_is_returned(app_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "supervise", lambda command, processes: 1)
    assert main(["-A", f"{app_module}:app", "run", "-p", "2"]) == 1


# -- argument data -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        RunArgs("m:app"),
        RunArgs("m:app", concurrency=2, processes=3, queues=("a", "b"), log_level="DEBUG"),
    ],
)
def test_run_args_round_trip_through_argv(args: RunArgs, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RunArgs] = []

    def fake_run(parsed: RunArgs) -> int:
        seen.append(parsed)
        return 0

    monkeypatch.setattr(commands, "run", fake_run)
    assert main(args.to_argv()) == 0
    assert seen == [args]


def test_parse_queues_and_levels() -> None:
    assert parse_queues(" a ,b") == ("a", "b")
    assert parse_log_level("warning") == "WARNING"
    with pytest.raises(ValueError, match="queue names"):
        parse_queues("")
    with pytest.raises(ValueError, match="unknown log level"):
        parse_log_level("verbose")


# -- the entry points ------------------------------------------------------------------------


def run_python(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run the interpreter of this venv without QTASKS_APP, capturing its output."""
    env = {k: v for k, v in os.environ.items() if k != "QTASKS_APP"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=30, check=False, env=env
    )


def test_python_dash_m_qtasks() -> None:
    result = run_python(["-m", "qtasks", "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("qtasks ")


def test_entrypoint_exits_with_the_code() -> None:
    result = run_python(["-c", "from qtasks.cli.main import entrypoint; entrypoint()", "run"])
    assert result.returncode == 2
    assert result.stderr == "Error: no app given: pass -A module:app or set QTASKS_APP\n"


def test_run_with_an_unreachable_broker_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    (tmp_path / "unreachable_app.py").write_text(
        "from qtasks import QueueTasks\n"
        "app = QueueTasks('u', broker_url='redis://user:s3cr3t-pw@127.0.0.1:1/0')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["-A", "unreachable_app:app", "run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Redis at redis://user:***@127.0.0.1:1/0")
    assert err.count("\n") == 1
    assert "s3cr3t-pw" not in err
