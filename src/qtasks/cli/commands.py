"""The commands: each takes its parsed arguments, calls a runtime function, returns an exit code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click
import msgspec

from qtasks import logs
from qtasks.cli import operations
from qtasks.cli.args import (
    AddArgs,
    DeadLetterArgs,
    InspectArgs,
    PurgeArgs,
    RunArgs,
    TaskIdArgs,
    WebArgs,
    parse_log_level,
)
from qtasks.cli.loader import AppLoadError, ServableApp, load_app
from qtasks.cli.operations import OperationError
from qtasks.errors import ConfigurationError, QTasksError, UnknownTask
from qtasks.logs import TEXT_FORMAT
from qtasks.message import TaskStatusEnum
from qtasks.runtime.supervisor import supervise, watch_supervisor

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

LOG_FORMAT = TEXT_FORMAT
"""Time, level, process id (several workers share one terminal) and logger name."""

NO_APP_MESSAGE = "no app given: pass -A module:app or set QTASKS_APP"

log = logging.getLogger(__name__)


def run(args: RunArgs) -> int:
    """Run workers for the app: in this process, or N child processes under a supervisor."""
    # Loaded here even for N processes: a wrong -A is reported once, before any child starts.
    from qtasks.app import AsyncQueueTasks

    core = load_app_from_cwd(args.app_path)
    one = args.processes == 1
    # The supervisor of N children runs no worker: its own lines carry no worker id.
    worker_id = core.worker.id if one and isinstance(core, AsyncQueueTasks) else None
    configure_logging(
        args.log_level,
        default=core.config.logs_default_level,
        log_format=args.log_format,
        worker_id=worker_id,
    )
    if one:
        watch_supervisor()  # a child of `--processes N`: do not outlive the supervisor
        if args.metrics_port is not None:
            serve_metrics_for(core, args.metrics_host, args.metrics_port)
        asyncio.run(core.serve(concurrency=args.concurrency, queues=args.queues))
        return 0
    log.info("app %r: supervising %d worker processes", core.name, args.processes)
    return supervise(lambda index: child_command(args.for_child(index)), args.processes)


def serve_metrics_for(core: ServableApp, host: str, port: int) -> None:
    """Serve the worker's Prometheus metrics while it runs; bound now, so a busy port or a
    missing `metrics` extra stops `run` before anything starts (ConfigurationError)."""
    from qtasks.app import AsyncQueueTasks
    from qtasks.metrics import MetricsPlugin

    if not isinstance(core, AsyncQueueTasks):
        raise ConfigurationError("--metrics-port needs a qtasks app (QueueTasks)")
    plugin = MetricsPlugin(port, host)
    plugin.bind()
    core.add_plugin(plugin, component="worker")


def child_command(args: RunArgs) -> list[str]:
    """The argv that runs `args` in a fresh interpreter (the children of a supervisor)."""
    return [sys.executable, "-m", "qtasks", *args.to_argv()]


def load_app_from_cwd(app_path: str | None) -> ServableApp:
    """Load the app with the current directory importable, as `python -m` would have it."""
    if app_path is None:
        raise AppLoadError(NO_APP_MESSAGE)
    cwd = os.getcwd()
    # The `qtasks` script's sys.path[0] is its bin directory, not where the user is.
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    return load_app(app_path)


def configure_logging(
    level: str | None,
    *,
    default: str,
    log_format: str = "text",
    worker_id: str | None = None,
) -> None:
    """Log to stderr at `level`, else `default`, unless logging was set up already.

    Lines logged while a task runs carry its id and name (qtasks.logs). When the app's
    module configured logging itself, its handlers stay (they get the task fields, and the
    JSON formatter for `log_format="json"`); only an explicit `level` is applied to the
    root logger.
    """
    try:
        name = parse_log_level(level or default)
    except ValueError as exc:
        raise ConfigurationError(f"logs_default_level: {exc}") from None
    root = logging.getLogger()
    had_handlers = bool(root.handlers)
    logs.configure(name, log_format, worker_id=worker_id, stream=sys.stderr)
    if had_handlers and level is not None:
        root.setLevel(name)


# -- operator commands: look at and steer a running system ------------------------------

EXIT_FAILED = 1
EXIT_USAGE = 2


def _on_app(app_path: str, action: Callable[[AsyncQueueTasks], Awaitable[str]]) -> int:
    """Load the app, run `action` on it (started, then stopped) and print what it returns.

    Exit 1 with a one-line error when a backend cannot be reached or the operation cannot
    be done; 2 for arguments the app rejects (a ConfigurationError propagates: main()
    reports it with 2 as well).
    """
    from qtasks.app import AsyncQueueTasks

    core = load_app_from_cwd(app_path)
    assert isinstance(core, AsyncQueueTasks)  # load_app returns the async core

    async def run() -> str:
        try:
            await core.start()
            return await action(core)
        finally:
            await core.stop()

    try:
        text = asyncio.run(run())
    except ConfigurationError:
        raise
    except (UnknownTask, TypeError, ValueError) as exc:
        click.echo(f"Error: {exc}", err=True)
        return EXIT_USAGE
    except (QTasksError, OSError) as exc:
        click.echo(f"Error: {_one_line(exc)}", err=True)
        return EXIT_FAILED
    click.echo(text)
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def inspect(args: InspectArgs) -> int:
    """Print one `stats inspect` topic as text tables or JSON."""
    from qtasks.stats import AsyncStats  # rich and the stats code load only when used

    async def action(core: AsyncQueueTasks) -> str:
        ask = AsyncStats(core).inspect()
        names, as_json = args.names, args.json
        if args.topic == "app":
            return await ask.app(json=True) if as_json else str(await ask.app())
        if args.topic == "tasks":
            return await ask.tasks(*names, json=True) if as_json else str(await ask.tasks(*names))
        if args.topic == "task":
            name = names[0]
            return await ask.task(name, json=True) if as_json else str(await ask.task(name))
        if args.topic == "workers":
            return await ask.workers(json=True) if as_json else str(await ask.workers())
        if args.topic == "queues":
            if as_json:
                return await ask.queues(*names, json=True)
            return str(await ask.queues(*names))
        if args.topic == "task_status":
            status = await ask.task_status(names[0])
            if status.data is None:
                raise OperationError(str(status))
            return status.json() if as_json else str(status)
        count = int(names[0]) if names else 10
        return await ask.failures(count, json=True) if as_json else str(await ask.failures(count))

    return _on_app(args.app_path, action)


class StepProgress:
    """What `add --wait` shows while a generator task runs: a line per step as it arrives,
    under a spinner that counts them. The spinner is drawn on a terminal only and is gone
    at the end, so piped output is just the step lines (then the record)."""

    def __init__(self, name: str) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        self.name = name
        self.count = 0
        # No file given: rich writes to whatever sys.stdout is at print time.
        self.console = Console(highlight=False, soft_wrap=True)
        self._spinner = Spinner("dots", text=f"{name}: waiting for the first step")
        self._live = Live(self._spinner, console=self.console, transient=True)

    def __enter__(self) -> StepProgress:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def step(self, value: Any) -> None:
        """Show one step (JSON data) above the spinner."""
        from rich.text import Text

        self.count += 1
        shown = msgspec.json.encode(value).decode()
        # The spinner first: printing redraws it below the new line.
        self._spinner.update(text=f"{self.name}: {self.count} step(s), running")
        self.console.print(Text(f"step {self.count}: {shown}"))


def add(args: AddArgs) -> int:
    """Enqueue a task; print its uuid, and with --wait its final record.

    Waiting for a generator task shows its steps live (StepProgress) before the record.
    """
    from qtasks.stats import report
    from qtasks.task import FunctionKind

    async def action(core: AsyncQueueTasks) -> str:
        definition = core.tasks.get(args.name)
        generator = definition is not None and definition.kind in (
            FunctionKind.GENERATOR,
            FunctionKind.ASYNC_GENERATOR,
        )
        waiting = args.wait_seconds is not None
        progress = StepProgress(args.name) if generator and waiting else None
        with progress if progress is not None else contextlib.nullcontext():
            record, final = await operations.add(
                core,
                args.name,
                args.args,
                dict(args.kwargs),
                priority=args.priority,
                queue=args.queue,
                wait_seconds=args.wait_seconds,
                on_step=None if progress is None else progress.step,
            )
        if args.wait_seconds is None:
            return f"enqueued {record.name} {record.uuid}"
        if final is None:
            raise OperationError(
                f"task {record.uuid} did not finish within {args.wait_seconds:g}s "
                f"(it stays queued; see: qtasks stats inspect task_status {record.uuid})"
            )
        if final.status is not TaskStatusEnum.SUCCESS:
            raise OperationError(
                f"task {final.uuid} ended with status {final.status.value}: "
                f"{final.error_type}: {final.error_message}"
            )
        return report.record_text(final)

    return _on_app(args.app_path, action)


def cancel(args: TaskIdArgs) -> int:
    """Cancel a task that has not started."""

    async def action(core: AsyncQueueTasks) -> str:
        record = await operations.cancel(core, args.uuid)
        return f"cancelled {record.name} {record.uuid}"

    return _on_app(args.app_path, action)


def retry(args: TaskIdArgs) -> int:
    """Enqueue a failed task again with the same arguments."""

    async def action(core: AsyncQueueTasks) -> str:
        new = await operations.retry(core, args.uuid)
        return f"retrying {new.name} {args.uuid} as {new.uuid}"

    return _on_app(args.app_path, action)


def purge(args: PurgeArgs) -> int:
    """Drop the queued messages of some queues."""

    async def action(core: AsyncQueueTasks) -> str:
        queues = list(args.queues) if args.queues else operations.app_queues(core)
        dropped = await operations.purge(core, queues)
        return f"purged {dropped} queued task(s) from {', '.join(queues)}"

    return _on_app(args.app_path, action)


def dlq(args: DeadLetterArgs) -> int:
    """List, retry or drop dead letters."""
    from qtasks.stats import report

    async def action(core: AsyncQueueTasks) -> str:
        if args.action == "list":
            letters = await operations.dead_letters(core, args.queues, args.limit)
            if args.json:
                return report.to_json([report.dead_letter_data(x) for x in letters])
            return report.dead_letters_text(letters)
        done = await operations.settle_dead_letters(core, args.action, args.uuids, args.queues)
        verb = "sent again" if args.action == "retry" else "dropped"
        return f"{len(done)} dead letter(s) {verb}" + "".join(f"\n{u}" for u in done)

    return _on_app(args.app_path, action)


# -- the web dashboard -------------------------------------------------------------------


def web(args: WebArgs) -> int:
    """Serve the dashboard with uvicorn until interrupted; exit 2 without the `web` extra."""
    from qtasks.web import INSTALL_HINT

    try:
        import uvicorn

        from qtasks.web.app import create_app
    except (ImportError, ConfigurationError):
        click.echo(f"Error: {INSTALL_HINT}", err=True)
        return EXIT_USAGE
    from qtasks.app import AsyncQueueTasks

    core = load_app_from_cwd(args.app_path)
    assert isinstance(core, AsyncQueueTasks)  # load_app returns the async core
    configure_logging(None, default=core.config.logs_default_level)
    dashboard = create_app(core, token=args.token, basic=args.basic)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    click.echo(f"qtasks dashboard for app {core.name!r}: http://{shown}:{args.port}/", err=True)
    uvicorn.run(dashboard, host=args.host, port=args.port, log_level="warning")
    return 0
