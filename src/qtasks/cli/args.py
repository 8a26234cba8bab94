"""What the command line asked for, as frozen dataclasses; no I/O, no click.

`main.py` turns argv into these, `commands.py` acts on them. `RunArgs.to_argv` is the
inverse of parsing, so a supervisor can start children with the same options.
"""

from __future__ import annotations

import dataclasses

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""Level names accepted by --log-level and `QueueConfig.logs_default_level`."""


@dataclasses.dataclass(frozen=True)
class GlobalArgs:
    """Options given before the command name."""

    app_path: str | None = None
    """`-A/--app` or QTASKS_APP; None when neither was given."""


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """`qtasks -A APP run`: start workers for an app."""

    app_path: str
    """Where the app is, `module:attribute` (see `qtasks.cli.loader.load_app`)."""
    concurrency: int | None = None
    """Tasks one process runs at once; None keeps the app's `max_tasks_process`."""
    processes: int = 1
    """Worker processes; more than one starts a supervisor with that many children."""
    queues: tuple[str, ...] | None = None
    """Queues to consume; None means the worker's default."""
    log_level: str | None = None
    """Log level name; None means the app's `logs_default_level`."""

    def to_argv(self) -> list[str]:
        """The argv (after the program name) that parses back into these arguments."""
        argv = ["-A", self.app_path, "run", "--processes", str(self.processes)]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        if self.queues is not None:
            argv += ["--queues", ",".join(self.queues)]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level]
        return argv


def parse_queues(text: str) -> tuple[str, ...]:
    """Split `a,b` into queue names; ValueError on an empty name."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise ValueError(f"expected comma-separated queue names, got {text!r}")
    return names


def parse_log_level(text: str) -> str:
    """The canonical level name for `info`, `INFO`, ...; ValueError for anything else."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {text!r}; use one of {', '.join(LOG_LEVELS)}")
    return level
