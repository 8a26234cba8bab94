"""What the command line asked for, as frozen dataclasses; no I/O, no click.

`main.py` turns argv into these, `commands.py` acts on them. `RunArgs.to_argv` is the
inverse of parsing, so a supervisor can start children with the same options.
"""

from __future__ import annotations

import dataclasses
import json as json_module
from collections.abc import Sequence
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""Level names accepted by --log-level and `QueueConfig.logs_default_level`."""

LOG_FORMATS = ("text", "json")
"""What --log-format accepts (see qtasks.logs)."""


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
    log_format: str = "text"
    """One of LOG_FORMATS: `text` lines, or one JSON object per line."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (child i of a supervisor: port + i); None: off."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on."""

    def to_argv(self) -> list[str]:
        """The argv (after the program name) that parses back into these arguments."""
        argv = ["-A", self.app_path, "run", "--processes", str(self.processes)]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        if self.queues is not None:
            argv += ["--queues", ",".join(self.queues)]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level]
        if self.log_format != "text":
            argv += ["--log-format", self.log_format]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port), "--metrics-host", self.metrics_host]
        return argv

    def for_child(self, index: int) -> RunArgs:
        """The arguments of a supervisor's child `index`: one process, its own metrics port."""
        port = self.metrics_port
        if port:  # 0 asks the system for a free port, in every child alike
            port += index
        return dataclasses.replace(self, processes=1, metrics_port=port)

    def check_metrics_ports(self) -> None:
        """ValueError when port + processes - 1 runs past the last port."""
        if self.metrics_port is None or self.metrics_port == 0:
            return
        last = self.metrics_port + self.processes - 1
        if last > 65535:
            raise ValueError(
                f"--metrics-port {self.metrics_port} with --processes {self.processes} needs "
                f"ports up to {last}, past 65535; pick a lower port"
            )


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


INSPECT_TOPICS = ("app", "tasks", "task", "workers", "queues", "task_status", "failures")
"""What `qtasks stats inspect` can show."""


@dataclasses.dataclass(frozen=True)
class InspectArgs:
    """`qtasks -A APP stats inspect TOPIC [NAMES...] [--json]`."""

    app_path: str
    topic: str
    """One of INSPECT_TOPICS."""
    names: tuple[str, ...] = ()
    """Task names (tasks, task), queue names (queues), a uuid (task_status), a count (failures)."""
    json: bool = False


@dataclasses.dataclass(frozen=True)
class AddArgs:
    """`qtasks -A APP add NAME [ARGS...]`: enqueue one task from a shell."""

    app_path: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    priority: int | None = None
    queue: str | None = None
    wait_seconds: float | None = None
    """Wait this long for the result and print it; None returns at once."""


@dataclasses.dataclass(frozen=True)
class TaskIdArgs:
    """`qtasks -A APP cancel UUID` and `retry UUID`."""

    app_path: str
    uuid: str


@dataclasses.dataclass(frozen=True)
class PurgeArgs:
    """`qtasks -A APP purge [-Q A,B] --yes`."""

    app_path: str
    queues: tuple[str, ...] | None = None
    """Queues to empty; None means every queue of the app's tasks and `default`."""


@dataclasses.dataclass(frozen=True)
class DeadLetterArgs:
    """`qtasks -A APP dlq list|retry|drop [UUID...] [--all] [-Q A,B] [--limit N] [--json]`."""

    app_path: str
    action: str
    """list, retry or drop."""
    uuids: tuple[str, ...] = ()
    """The letters to retry or drop; empty with `all_` means every letter of the queues."""
    all_: bool = False
    queues: tuple[str, ...] | None = None
    """None means every queue of the app's tasks and `default`."""
    limit: int = 100
    json: bool = False


def parse_inspect(app_path: str, topic: str, words: Sequence[str], json_flag: bool) -> InspectArgs:
    """Topic and words of `stats inspect`, accepting QTasks's `json=True` among the words.

    ValueError for a word or a count of words the topic does not take.
    """
    names: list[str] = []
    json_output = json_flag
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key.strip().lower() == "json":
            if value.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"expected json=True or json=False, got {word!r}")
            json_output = json_output or value.strip().lower() in ("true", "1")
        else:
            names.append(word)
    if topic not in INSPECT_TOPICS:
        raise ValueError(f"unknown topic {topic!r}; use one of {', '.join(INSPECT_TOPICS)}")
    if topic in ("app", "workers") and names:
        raise ValueError(f"'{topic}' takes no names, got {' '.join(names)}")
    if topic in ("task", "task_status") and len(names) != 1:
        what = "task name" if topic == "task" else "task uuid"
        raise ValueError(f"'{topic}' takes exactly one {what}")
    bad_count = len(names) > 1 or (names and not (names[0].isdigit() and int(names[0]) > 0))
    if topic == "failures" and bad_count:
        raise ValueError("'failures' takes at most one positive count, e.g. failures 20")
    return InspectArgs(app_path=app_path, topic=topic, names=tuple(names), json=json_output)


def parse_json_values(values: Sequence[str]) -> tuple[Any, ...]:
    """Each word as a JSON value; ValueError naming the first that is not one."""
    out = []
    for word in values:
        try:
            out.append(json_module.loads(word))
        except ValueError:
            raise ValueError(
                f"argument {word!r} is not a JSON value; quote strings as JSON, e.g. '\"{word}\"'"
            ) from None
    return tuple(out)


def parse_json_object(text: str) -> dict[str, Any]:
    """`--kwargs` as a JSON object; ValueError otherwise."""
    try:
        value = json_module.loads(text)
    except ValueError as exc:
        raise ValueError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--kwargs must be a JSON object, got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class WebArgs:
    """`qtasks -A APP web [--host H] [--port P] [--token T] [--basic U:P] [--insecure-bind]`."""

    app_path: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Bearer token (or `?token=` once, which sets a cookie); None for no token."""
    basic: tuple[str, str] | None = None
    """(user, password) for HTTP basic auth; None for none."""
    insecure_bind: bool = False
    """Serve a non-loopback address without auth anyway."""

    def check_bind(self) -> None:
        """ValueError when the host is reachable from other machines and nothing guards it."""
        guarded = self.token is not None or self.basic is not None
        if not (guarded or self.insecure_bind or is_loopback(self.host)):
            raise ValueError(
                f"refusing to serve the dashboard on {self.host} without auth: anyone who "
                f"can reach it could retry, cancel and purge tasks. Pass --token or "
                f"--basic user:pass, bind 127.0.0.1, or pass --insecure-bind"
            )


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def parse_basic(text: str) -> tuple[str, str]:
    """`user:pass` as (user, password); ValueError without a user or a password."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected user:password, e.g. --basic admin:s3cret")
    return user, password
