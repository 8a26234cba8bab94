"""The `qtasks` command line: click parses argv into `args` dataclasses, `commands` act.

Exit codes: 0 done; 1 failed (or a supervisor gave up on crashing workers); 2 wrong usage
or configuration, including an app that cannot be loaded (retrying will not help);
130 interrupted.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Sequence

import click

from qtasks.cli import commands
from qtasks.cli.args import LOG_LEVELS, GlobalArgs, RunArgs, parse_log_level, parse_queues
from qtasks.cli.loader import AppLoadError
from qtasks.errors import ConfigurationError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        version = importlib.metadata.version("qtasks")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        version = "unknown"
    click.echo(f"qtasks {version}")
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
@click.pass_obj
def run(
    obj: GlobalArgs,
    concurrency: int | None,
    processes: int,
    queues: tuple[str, ...] | None,
    log_level: str | None,
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
    )
    return commands.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`) and return the exit code."""
    try:
        # standalone_mode=False: click raises instead of calling sys.exit, so tests can call
        # main() in process; the exit codes below are the ones click would have used.
        result = cli.main(args=argv, prog_name="qtasks", standalone_mode=False)
    except ConfigurationError as exc:
        click.echo(f"Error: {exc}", err=True)
        return EXIT_USAGE
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
