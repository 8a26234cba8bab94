"""The `qtasks` command line: click parses argv into `args` dataclasses, `commands` act.

Exit codes: 0 done; 1 failed (or a supervisor gave up on crashing workers); 2 wrong usage
or configuration, including an app that cannot be loaded (retrying will not help);
130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from qtasks.cli import commands
from qtasks.cli.args import (
    INSPECT_TOPICS,
    LOG_FORMATS,
    LOG_LEVELS,
    AddArgs,
    DeadLetterArgs,
    GlobalArgs,
    PurgeArgs,
    RunArgs,
    TaskIdArgs,
    WebArgs,
    parse_basic,
    parse_inspect,
    parse_json_object,
    parse_json_values,
    parse_log_level,
    parse_queues,
)
from qtasks.cli.loader import AppLoadError
from qtasks.errors import BrokerError, ConfigurationError, StorageError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from qtasks._version import __version__

    click.echo(f"qtasks {__version__}")
    ctx.exit()


def _queues(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        return parse_queues(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-A",
    "--app",
    "app_path",
    envvar="QTASKS_APP",
    metavar="MODULE:APP",
    help="The app: module:attribute, module:factory() or module (meaning module:app). "
    "Default: $QTASKS_APP.",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
@click.pass_context
def cli(ctx: click.Context, app_path: str | None) -> None:
    """qtasks: a task queue for Python."""
    ctx.obj = GlobalArgs(app_path=app_path)


@cli.command()
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Tasks one process runs at once.  [default: the app's max_tasks_process]",
)
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; with more than 1 a supervisor restarts any that crash.",
)
@click.option(
    "-Q",
    "--queues",
    metavar="A,B",
    callback=_queues,
    help="Comma-separated queues to consume.  [default: the worker's]",
)
@click.option(
    "-l",
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="Log level.  [default: the app's logs_default_level]",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    help="text lines, or one JSON object per line (time, level, logger, message, task_id, "
    "task_name, worker_id).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (the metrics extra); with "
    "--processes N, child i serves PORT+i.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on.",
)
@click.pass_obj
def run(
    obj: GlobalArgs,
    concurrency: int | None,
    processes: int,
    queues: tuple[str, ...] | None,
    log_level: str | None,
    log_format: str,
    metrics_port: int | None,
    metrics_host: str,
) -> int:
    """Run workers until SIGTERM/SIGINT.

    On the first signal workers finish their running tasks; a second one stops them at once.
    """
    if obj.app_path is None:
        raise AppLoadError(commands.NO_APP_MESSAGE)
    args = RunArgs(
        app_path=obj.app_path,
        concurrency=concurrency,
        processes=processes,
        queues=queues,
        log_level=parse_log_level(log_level) if log_level is not None else None,
        log_format=log_format.lower(),
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    try:
        args.check_metrics_ports()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return commands.run(args)


def _app_path(obj: GlobalArgs) -> str:
    if obj.app_path is None:
        raise AppLoadError(commands.NO_APP_MESSAGE)
    return obj.app_path


@cli.group()
def stats() -> None:
    """Look at a running system."""


@stats.command(
    "inspect",
    epilog="Examples: stats inspect tasks; stats inspect task send_email --json; "
    "stats inspect queues default json=True; stats inspect failures 20.",
)
@click.argument("topic", type=click.Choice(INSPECT_TOPICS))
@click.argument("names", nargs=-1)
@click.option(
    "--json", "json_flag", is_flag=True, help="Print JSON (QTasks's json=True works too)."
)
@click.pass_obj
def inspect_command(obj: GlobalArgs, topic: str, names: tuple[str, ...], json_flag: bool) -> int:
    """Show TOPIC: app, tasks [NAME...], task NAME, workers, queues [QUEUE...],
    task_status UUID or failures [COUNT]."""
    try:
        args = parse_inspect(_app_path(obj), topic, names, json_flag)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return commands.inspect(args)


def _json_values(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[Any, ...]:
    try:
        return parse_json_values(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    try:
        return parse_json_object(value) if value is not None else {}
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.argument("name")
@click.argument("args", nargs=-1, callback=_json_values)
@click.option(
    "--kwargs",
    "kwargs",
    metavar="JSON",
    callback=_json_object,
    help='Keyword arguments as a JSON object, e.g. \'{"to": "a@b.c"}\'.',
)
@click.option("--priority", type=int, help="Priority (lower runs first).")
@click.option("-Q", "--queue", help="Queue to send to.  [default: the task's]")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait up to SECONDS for the result and print it.",
)
@click.pass_obj
def add(
    obj: GlobalArgs,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    priority: int | None,
    queue: str | None,
    wait_seconds: float | None,
) -> int:
    """Enqueue task NAME; ARGS are JSON values.

    Quote strings as JSON: qtasks -A m:app add greet '"bob"' --kwargs '{"loud": true}'
    """
    args_ = AddArgs(_app_path(obj), name, args, kwargs, priority, queue, wait_seconds)
    return commands.add(args_)


@cli.command()
@click.argument("uuid")
@click.pass_obj
def cancel(obj: GlobalArgs, uuid: str) -> int:
    """Cancel a task that has not started.

    The task is taken off its queue and recorded as `cancel`. A task a worker has already
    claimed (running, or prefetched) is left alone and runs to its end.
    """
    return commands.cancel(TaskIdArgs(_app_path(obj), uuid))


@cli.command()
@click.argument("uuid")
@click.pass_obj
def retry(obj: GlobalArgs, uuid: str) -> int:
    """Enqueue a failed or cancelled task again with the same arguments."""
    return commands.retry(TaskIdArgs(_app_path(obj), uuid))


@cli.command()
@click.option(
    "-Q",
    "--queues",
    metavar="A,B",
    callback=_queues,
    help="Comma-separated queues to empty.  [default: every queue of the app]",
)
@click.option("--yes", is_flag=True, help="Confirm: drop the queued tasks.")
@click.pass_obj
def purge(obj: GlobalArgs, queues: tuple[str, ...] | None, yes: bool) -> int:
    """Drop the queued tasks of some queues.

    Messages no worker has claimed yet are dropped and their records become `cancel`.
    """
    app_path = _app_path(obj)
    if not yes:
        raise click.UsageError("purge drops queued tasks for good; pass --yes to confirm")
    return commands.purge(PurgeArgs(app_path, queues))


@cli.group()
def dlq() -> None:
    """Dead letters: tasks set aside instead of run (failed for good, worker_lost,
    undecodable, unknown task). List them, send them again, or drop them."""


_dlq_queues = click.option(
    "-Q",
    "--queues",
    metavar="A,B",
    callback=_queues,
    help="Comma-separated queues.  [default: every queue of the app]",
)


@dlq.command("list")
@_dlq_queues
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def dlq_list(obj: GlobalArgs, queues: tuple[str, ...] | None, limit: int, as_json: bool) -> int:
    """Print the dead letters, newest first."""
    return commands.dlq(
        DeadLetterArgs(_app_path(obj), "list", queues=queues, limit=limit, json=as_json)
    )


def _dlq_settle(action: str, help_all: str) -> Any:
    @dlq.command(action)
    @click.argument("uuids", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help=help_all)
    @_dlq_queues
    @click.pass_obj
    def command(
        obj: GlobalArgs, uuids: tuple[str, ...], all_: bool, queues: tuple[str, ...] | None
    ) -> int:
        app_path = _app_path(obj)
        if bool(uuids) == all_:
            raise click.UsageError(f"name the dead letters to {action} (UUID...) or pass --all")
        return commands.dlq(DeadLetterArgs(app_path, action, uuids, all_, queues))

    return command


dlq_retry = _dlq_settle("retry", "Send every dead letter of the queues again.")
dlq_retry.help = """Send dead letters again under their uuids, attempts starting over."""
dlq_drop = _dlq_settle("drop", "Drop every dead letter of the queues.")
dlq_drop.help = """Delete dead letters for good."""


def _basic(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, str] | None:
    try:
        return parse_basic(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("the token is empty")
    return value


@cli.command(
    epilog="Example: qtasks -A examples.quickstart:app web --port 8000, then open "
    "http://127.0.0.1:8000/"
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True)
@click.option(
    "--token",
    envvar="QTASKS_WEB_TOKEN",
    callback=_token,
    help="Require this token: Authorization: Bearer TOKEN, or ?token=TOKEN once (sets a "
    "cookie). Default: $QTASKS_WEB_TOKEN.",
)
@click.option(
    "--basic",
    metavar="USER:PASS",
    callback=_basic,
    help="Require HTTP basic auth with these credentials.",
)
@click.option(
    "--insecure-bind",
    is_flag=True,
    help="Serve a non-loopback address without --token or --basic anyway.",
)
@click.pass_obj
def web(
    obj: GlobalArgs,
    host: str,
    port: int,
    token: str | None,
    basic: tuple[str, str] | None,
    insecure_bind: bool,
) -> int:
    """Serve the web dashboard: overview, tasks, tracebacks, retry / cancel / purge.

    Without --token or --basic it only binds a loopback address (127.0.0.1, ::1).
    Needs the web extra: pip install 'qtasks[web]'.
    """
    args = WebArgs(_app_path(obj), host, port, token, basic, insecure_bind)
    try:
        args.check_bind()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return commands.web(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`) and return the exit code."""
    try:
        # standalone_mode=False: click raises instead of calling sys.exit, so tests can call
        # main() in process; the exit codes below are the ones click would have used.
        result = cli.main(args=argv, prog_name="qtasks", standalone_mode=False)
    except ConfigurationError as exc:
        click.echo(f"Error: {exc}", err=True)
        return EXIT_USAGE
    except (BrokerError, StorageError) as exc:
        # A backend that cannot be reached when a command (`run` included) starts: one
        # line, exit 1; a process manager restarting `run` retries it.
        click.echo(f"Error: {exc}", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort as exc:
        click.echo("Aborted!", err=True)
        return EXIT_INTERRUPTED if isinstance(exc.__cause__, KeyboardInterrupt) else 1
    return result if isinstance(result, int) else 0


def entrypoint() -> None:
    """The `qtasks` console script."""
    sys.exit(main())
