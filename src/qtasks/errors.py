"""Every error qtasks raises, in one tree.

    QTasksError
    ├── ConfigurationError        bad URL, unknown scheme, missing extra, bad -A value
    │   ├── TaskAlreadyRegistered two tasks with one name
    │   └── StateNotSupported     the storage keeps no State
    ├── BrokerError               a broker could not publish, fetch or ack
    ├── StorageError              a storage could not read or write a record
    ├── EncodeError               arguments or a result cannot be encoded (nothing written)
    │   └── PayloadTooLarge       an encoded message exceeds max_payload_bytes (nothing written)
    ├── DecodeError               a message on the wire cannot be decoded; `.reason` says why
    ├── UnknownTask               no task is registered under that name
    ├── WorkerLost                delivered max_deliveries times, never finished
    │   └── TaskInterrupted       an at_most_once task started and never finished: not rerun
    ├── TaskTimeout               a task ran longer than its max_time
    ├── WaitTimeout               app.wait() gave up before the task finished
    ├── TaskFailed                a streamed task ended with status error or cancel
    ├── TaskNotFound              no record of a task uuid (unknown, expired or evicted)
    ├── StateLockTimeout          a State lock was not acquired in time
    └── PluginError               a plugin raised, or returned a replacement of the wrong shape

Control flow that task code raises stands apart: `Retry` asks for another attempt,
`Cancel` ends the task with status `cancel`, and `TaskPluginTriggerError` hands the task
over to the plugins listening to `task_executor_run_task_trigger_error`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtasks.message import Task


class QTasksError(Exception):
    """Root of every error qtasks raises."""


class ConfigurationError(QTasksError):
    """The app or a component was set up wrongly; the message says how to fix it."""


class TaskAlreadyRegistered(ConfigurationError):  # noqa: N818 - names users know from QTasks
    """A second task was registered under a name already taken."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"a task named {name!r} is already registered; "
            f"pass name=... to @app.task to register it under another name"
        )
        self.name = name


class BrokerError(QTasksError):
    """The broker failed to move a message."""


class StorageError(QTasksError):
    """The storage failed to read or write a record."""


class EncodeError(QTasksError, TypeError):
    """A value cannot be encoded for the wire; nothing was written."""


class PayloadTooLarge(EncodeError):  # noqa: N818 - names what happened, as users see it
    """An encoded task message is larger than `QueueConfig.max_payload_bytes`.

    Raised by `add_task`/`add_tasks` before anything is written or sent.
    """

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(
            f"task {name!r}: the encoded message is {size:,} bytes, more than "
            f"max_payload_bytes={limit:,}; nothing was enqueued. Pass large data by "
            f"reference (a path, URL or database key) or raise QueueConfig.max_payload_bytes"
        )
        self.name = name
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[PayloadTooLarge], tuple[str, int, int]]:
        # Rebuilt from its fields when pickled (e.g. across worker processes).
        return (type(self), (self.name, self.size, self.limit))


class DecodeError(QTasksError, ValueError):
    """Bytes from the broker are not a valid task message.

    `reason` is machine-readable (dead letters and metrics group by it); the message is
    for people. The JSON serializer's reasons: `empty`, `payload_too_large`,
    `bad_signature`, `pickle_refused`, `wrong_serializer` (a msgpack message), `not_utf8`,
    `invalid_json`, `too_deep`, `unsupported_version`, `bad_schema`. The msgpack
    serializer's are the same, with `invalid_msgpack` for `invalid_json` (and
    `wrong_serializer` for a JSON message). Other serializers may add their own.
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        # Keeps `reason` when pickled (e.g. across worker processes).
        return (type(self), (str(self), self.reason))


class UnknownTask(QTasksError, LookupError):  # noqa: N818 - names users know from QTasks
    """No task is registered under this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no task named {name!r} is registered in this app")
        self.name = name


class WorkerLost(QTasksError):  # noqa: N818 - names what happened, as users see it
    """A task was delivered more than `max_deliveries` times without finishing."""

    def __init__(self, deliveries: int) -> None:
        super().__init__(
            f"worker_lost: the task was handed to a worker {deliveries} times and never "
            f"finished (the worker died each time); not running it again. Raise "
            f"QueueConfig.max_deliveries if this task legitimately outlives workers"
        )
        self.deliveries = deliveries
        self.reason = "worker_lost"


class TaskInterrupted(WorkerLost):
    """An `at_most_once` task started and did not finish; it is not run again."""

    def __init__(self, attempt: int, status: str) -> None:
        QTasksError.__init__(
            self,
            f"worker_lost: attempt {attempt} of this at_most_once task started (its record "
            f"says {status!r}) on a worker that stopped before finishing it (killed, lost, or "
            f"given up on at shutdown); it is not run a second time. Send it again yourself "
            f"(qtasks dlq retry) if running it twice is safe after all",
        )
        self.deliveries = attempt
        self.reason = "worker_lost"


class TaskTimeout(QTasksError, TimeoutError):  # noqa: N818 - names users know from QTasks
    """The task ran longer than its max_time."""

    def __init__(self, name: str, max_time: float) -> None:
        super().__init__(f"task {name!r} exceeded max_time={max_time}s")
        self.name = name
        self.max_time = max_time


class WaitTimeout(QTasksError, TimeoutError):  # noqa: N818 - names users know from QTasks
    """Waiting for a task's final status ran out of time."""

    def __init__(self, uuid: str, timeout: float) -> None:
        super().__init__(f"task {uuid} did not finish within {timeout}s")
        self.uuid = uuid
        self.timeout = timeout


class StateNotSupported(ConfigurationError, NotImplementedError):  # noqa: N818
    """The app's storage keeps no State (its State methods are not implemented)."""

    def __init__(self, storage: object) -> None:
        name = type(storage).__name__
        super().__init__(
            f"{name} keeps no State; use a storage that does (memory://, sqlite:///..., "
            f"redis://...) or implement the state_* methods of qtasks.interfaces.Storage"
        )
        self.storage = name


class StateLockTimeout(QTasksError, TimeoutError):  # noqa: N818 - reads as what happened
    """A State lock could not be acquired within `wait_seconds`."""

    def __init__(self, state: str, key: str, wait_seconds: float) -> None:
        super().__init__(f"lock {key!r} of state {state!r} not acquired within {wait_seconds}s")
        self.state = state
        self.key = key
        self.wait_seconds = wait_seconds


class PluginError(QTasksError):
    """A plugin failed in a trigger (or returned a replacement of the wrong shape).

    The message names the plugin and the trigger; the plugin's own exception is the
    `__cause__`. Raised inside a task it fails that task, never the worker.
    """

    def __init__(self, plugin: str, trigger: str, reason: str) -> None:
        super().__init__(f"plugin {plugin!r} failed in trigger {trigger!r}: {reason}")
        self.plugin = plugin
        self.trigger = trigger
        self.reason = reason


class Retry(Exception):  # noqa: N818 - a control-flow signal, named for what the user asks
    """Raise inside a task to ask for another attempt, optionally after `delay` seconds."""

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay


class Cancel(Exception):  # noqa: N818 - a control-flow signal, named for what the user asks
    """Raise inside a task (or call `ctx.cancel()`) to end it with status `cancel`."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "cancelled")
        self.reason = reason or "cancelled"


class TaskPluginTriggerError(Exception):
    """Raise inside a task (or call `ctx.plugin_error(...)`) to hand it over to plugins.

    Plugins listening to `task_executor_run_task_trigger_error` receive it as `error`; one
    that returns `{"result": value}` makes the task succeed with that value. When none
    does, the task fails with this error. Keyword arguments are kept in `kwargs`.
    """

    def __init__(self, message: str = "", **kwargs: object) -> None:
        super().__init__(message or "plugin trigger requested")
        self.kwargs = kwargs


class TaskFailed(QTasksError):  # noqa: N818 - names what happened, as users see it
    """A task a stream followed ended with status `error` or `cancel`.

    `record` is its final record (`error_type`, `error_message`, `traceback`): what
    `add_task(timeout=...)` would have returned.
    """

    def __init__(self, record: Task) -> None:
        super().__init__(
            f"task {record.name} {record.uuid} ended with status {record.status.value}: "
            f"{record.error_type}: {record.error_message}"
        )
        self.record = record
        self.uuid = str(record.uuid)
        self.status = record.status
        self.error_type = record.error_type
        self.error_message = record.error_message
        self.traceback = record.traceback


class TaskNotFound(QTasksError, LookupError):  # noqa: N818 - names what happened
    """No record of this task uuid: never enqueued here, or expired (result_ttl_seconds)."""

    def __init__(self, uuid: str) -> None:
        super().__init__(
            f"no record of task {uuid}: never enqueued here, expired (result_ttl_seconds) "
            f"or evicted by the backend"
        )
        self.uuid = uuid
