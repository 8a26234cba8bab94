"""Task-aware logging: every line logged while a task runs carries its id and name.

`TaskExecutor.run` puts itself in the `current_task` context variable for the whole
attempt. asyncio tasks copy context variables, and the worker's thread pool runs each
sync call in a copy of the caller's context, so lines logged from an async task, a sync
task in its thread, a dependency or a plugin during the attempt all see it — qtasks's
own lines and the user's plain `logging` calls alike.

`TaskFieldsFilter` (a `logging.Filter` for handlers) copies it onto each record as
`task_id`, `task_name` and `worker_id` (None outside a task), so any format can use
`%(task_id)s`. `JsonFormatter` prints one JSON object per line, `TextFormatter` the
CLI's usual line with the task appended. `qtasks run --log-format json|text` sets both up;
code that configures logging itself adds them to its own handlers:

    handler = logging.StreamHandler()
    handler.addFilter(TaskFieldsFilter())
    handler.setFormatter(JsonFormatter())
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtasks.runtime.executor import TaskExecutor

current_task: contextvars.ContextVar[TaskExecutor | None] = contextvars.ContextVar(
    "qtasks_current_task", default=None
)
"""The executor running the current task attempt; None outside a task.

Holds the executor rather than strings so setting it costs nothing on the worker's hot
path: the uuid becomes text only when a line is actually logged.
"""

TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"
"""Time, level, process id (several workers share one terminal) and logger name."""

TASK_FIELDS = ("task_id", "task_name", "worker_id")
"""The attributes TaskFieldsFilter puts on every record."""


class TaskFieldsFilter(logging.Filter):
    """Adds `task_id`, `task_name` and `worker_id` to every record; never drops one.

    `worker_id` is the running task's worker, else the one given here (the process's
    worker, for lines logged outside tasks), else None.
    """

    def __init__(self, worker_id: str | None = None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        executor = current_task.get()
        if executor is None:
            record.task_id = record.task_name = None
            record.worker_id = self.worker_id
            return True
        message = executor.message
        record.task_id = str(message.uuid)
        record.task_name = message.name
        worker = executor.worker
        record.worker_id = worker.id if worker is not None else self.worker_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, task_id, task_name,
    worker_id, plus `exc_info` (the formatted traceback) when there is one.

    The task fields come from TaskFieldsFilter; without it they are looked up here, so
    the formatter works on a handler that has no filter too.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = _task_fields(record)
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with ` [task NAME ID]` after the message of lines logged in a task.

    Lines of a task's own `ctx.logger` (loggers `qtasks.task.*`) start with the task
    already, so they are left as they are.
    """

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _task_fields(record)
        if fields["task_id"] is None or record.name.startswith("qtasks.task."):
            return text
        first, newline, rest = text.partition("\n")  # keep tracebacks below the line
        return f"{first} [task {fields['task_name']} {fields['task_id']}]{newline}{rest}"


def _task_fields(record: logging.LogRecord) -> dict[str, Any]:
    if not hasattr(record, "task_id"):
        TaskFieldsFilter().filter(record)
    return {name: getattr(record, name, None) for name in TASK_FIELDS}


def configure(
    level: str | int,
    log_format: str = "text",
    *,
    worker_id: str | None = None,
    stream: Any = None,
) -> logging.Handler | None:
    """Log to `stream` (default stderr) in `log_format`, unless logging is set up already.

    When the root logger has handlers (the app's module configured logging), they stay
    and only get the TaskFieldsFilter (so their formats may use `%(task_id)s`), plus the
    JSON formatter when `log_format` is "json". Returns the handler it created, if any.
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}; use text or json")
    root = logging.getLogger()
    if root.handlers:
        for handler in root.handlers:
            _add_task_filter(handler, worker_id)
            if log_format == "json":
                handler.setFormatter(JsonFormatter())
        return None
    handler = logging.StreamHandler(stream)
    _add_task_filter(handler, worker_id)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _add_task_filter(handler: logging.Handler, worker_id: str | None) -> None:
    """One TaskFieldsFilter per handler, however often logging is configured."""
    for existing in handler.filters:
        if isinstance(existing, TaskFieldsFilter):
            existing.worker_id = worker_id or existing.worker_id
            return
    handler.addFilter(TaskFieldsFilter(worker_id))
