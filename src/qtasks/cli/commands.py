"""The commands: each takes its parsed arguments, calls a runtime function, returns an exit code."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

from qtasks.cli.args import RunArgs, parse_log_level
from qtasks.cli.loader import AppLoadError, ServableApp, load_app
from qtasks.errors import ConfigurationError
from qtasks.runtime.supervisor import supervise

LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"
"""Time, level, process id (several workers share one terminal) and logger name."""

NO_APP_MESSAGE = "no app given: pass -A module:app or set QTASKS_APP"

log = logging.getLogger(__name__)


def run(args: RunArgs) -> int:
    """Run workers for the app: in this process, or N child processes under a supervisor."""
    # Loaded here even for N processes: a wrong -A is reported once, before any child starts.
    core = load_app_from_cwd(args.app_path)
    configure_logging(args.log_level, default=core.config.logs_default_level)
    if args.processes == 1:
        asyncio.run(core.serve(concurrency=args.concurrency, queues=args.queues))
        return 0
    log.info("app %r: supervising %d worker processes", core.name, args.processes)
    child = dataclasses.replace(args, processes=1)
    return supervise(lambda index: child_command(child), args.processes)


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


def configure_logging(level: str | None, *, default: str) -> None:
    """Log to stderr at `level`, else `default`, unless logging was set up already.

    When the app's module configured logging itself, its handlers stay; only an explicit
    `level` is applied to the root logger.
    """
    try:
        name = parse_log_level(level or default)
    except ValueError as exc:
        raise ConfigurationError(f"logs_default_level: {exc}") from None
    root = logging.getLogger()
    if root.handlers:
        if level is not None:
            root.setLevel(name)
        return
    logging.basicConfig(level=name, format=LOG_FORMAT, stream=sys.stderr)
