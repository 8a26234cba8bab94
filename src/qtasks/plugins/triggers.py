"""Every trigger qtasks fires, declared once: when it fires, what it passes, what it replaces.

Names follow QTasks: `{component}_{function}_{addition}`, where the app is `qtasks`. The
core fires them at the boundaries of each part (around the calls into the broker,
storage and global config), so every backend, built in or third party, has them without
writing any plugin code.

How a trigger is fired (`PluginRegistry.fire`):

* Plugins listening to it are called in the order they were added (app-wide ones first,
  then the task's own), each as `plugin.trigger(name, **payload)`, sync or async.
* A plugin returns None (nothing to change) or a mapping whose keys are some of the
  trigger's `replaces`; each value is checked and replaces that payload value, so the
  next plugin sees it (replacements chain). Any other return value is an error, never
  silently ignored.
* What happens when a plugin raises (or returns a wrong shape) is the trigger's
  `on_error`: the task fails, the caller gets `PluginError`, or the error is logged and
  the unchanged values are used.
* A trigger nobody listens to costs one dict lookup: the call sites test
  `name in registry` before building the payload.

`python -m qtasks.plugins` prints the table of docs/triggers.md.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

COMPONENTS = ("qtasks", "broker", "storage", "global_config", "worker", "task_executor", "starter")
"""The parts that fire triggers; `qtasks` is the app."""

PER_TASK_COMPONENTS = ("worker", "task_executor")
"""Components whose plugins start and stop with the worker (not with the app)."""


class OnError(enum.Enum):
    """What a plugin's exception (or wrong return) does in one trigger."""

    FAIL_TASK = "fails the task"
    RAISE = "raises to the caller"
    LOG = "logged"

    @property
    def meaning(self) -> str:
        """The long form, for the docs."""
        return _ON_ERROR_MEANING[self]


_ON_ERROR_MEANING = {
    OnError.FAIL_TASK: "the task fails with PluginError (never retried); the worker goes on",
    OnError.RAISE: "the caller (add_task, app.start, ...) gets PluginError",
    OnError.LOG: "logged as an error naming the plugin; the unchanged values are used",
}


Check = Callable[[Any], Any]
"""Checks one replacement value: returns the value to use or raises TypeError saying why."""


def _instance_of(*types: type, optional: bool = False) -> Check:
    names = " or ".join(t.__name__ for t in types) + (" or None" if optional else "")

    def check(value: Any) -> Any:
        if (value is None and optional) or isinstance(value, types):
            return value
        raise TypeError(f"must be {names}, got {type(value).__name__}")

    check.__doc__ = names
    return check


def _any_value(value: Any) -> Any:
    return value


_any_value.__doc__ = "any storable value"


def _args(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"must be a list or tuple, got {type(value).__name__}")


_args.__doc__ = "list or tuple"


def _kwargs(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise TypeError(f"must be a mapping with str keys, got {type(value).__name__}")


_kwargs.__doc__ = "dict with str keys"


@dataclasses.dataclass(frozen=True)
class TriggerSpec:
    """One trigger: who fires it, when, with which keyword arguments, what it replaces."""

    name: str
    component: str
    when: str
    payload: tuple[str, ...]
    """The keyword arguments a plugin receives, in order (see PAYLOAD for each)."""
    replaces: Mapping[str, Check] = dataclasses.field(default_factory=dict)
    """Payload keys a plugin may replace, each with the check its new value must pass."""
    on_error: OnError = OnError.RAISE

    @property
    def per_task(self) -> bool:
        """True if it fires while one task runs, so `@app.task(plugins=...)` may use it."""
        return self.on_error is OnError.FAIL_TASK or self.component == "task_executor"

    def check_return(self, value: Any) -> dict[str, Any]:
        """The replacements a plugin's return value asks for; TypeError if it is malformed."""
        if not isinstance(value, Mapping):
            if not self.replaces:
                raise TypeError(f"{self.name} replaces nothing: return None, not {value!r:.80}")
            raise TypeError(
                f"return None or a mapping with some of {_keys(self.replaces)}, "
                f"not {type(value).__name__}"
            )
        changes: dict[str, Any] = {}
        for key, new in value.items():
            check = self.replaces.get(key)
            if check is None:
                what = _keys(self.replaces) if self.replaces else "nothing"
                raise TypeError(f"{key!r} cannot be replaced; {self.name} replaces {what}")
            try:
                changes[key] = check(new)
            except TypeError as exc:
                raise TypeError(f"replacement {key!r} {exc}") from None
        return changes


def _keys(replaces: Mapping[str, Check]) -> str:
    return ", ".join(repr(k) for k in replaces)


TRIGGERS: dict[str, TriggerSpec] = {}
"""Every trigger by name, in declaration order (the order of the docs table)."""


def _declare(
    name: str,
    when: str,
    payload: Sequence[str],
    replaces: Mapping[str, Check] | None = None,
    on_error: OnError = OnError.RAISE,
) -> str:
    component = next(c for c in COMPONENTS if name.startswith(c + "_"))
    assert name not in TRIGGERS, name
    assert all(key in payload for key in replaces or {}), name
    assert all(key in PAYLOAD for key in payload), name
    TRIGGERS[name] = TriggerSpec(name, component, when, tuple(payload), replaces or {}, on_error)
    return name


def _types() -> dict[str, Any]:
    # Imported here: qtasks.plugins must not import the app's modules at import time.
    from qtasks.message import Envelope, Task, TaskMessage
    from qtasks.runtime.executor import Outcome

    return {"Envelope": Envelope, "Task": Task, "TaskMessage": TaskMessage, "Outcome": Outcome}


class _Lazy:
    """A check on a class that cannot be imported when this module loads."""

    def __init__(self, type_name: str, optional: bool = False) -> None:
        self.type_name = type_name
        self.optional = optional
        self.__doc__ = type_name + (" or None" if optional else "")

    def __call__(self, value: Any) -> Any:
        return _instance_of(_types()[self.type_name], optional=self.optional)(value)


class _LazyList(_Lazy):
    """A check for a list of instances of a class imported late."""

    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.__doc__ = f"list of {type_name}"

    def __call__(self, value: Any) -> Any:
        item = _types()[self.type_name]
        if isinstance(value, (list, tuple)) and all(isinstance(v, item) for v in value):
            return list(value)
        raise TypeError(f"must be a list of {self.type_name}")


PAYLOAD: dict[str, str] = {
    "app": "the app (AsyncQueueTasks)",
    "broker": "the app's broker",
    "storage": "the app's storage",
    "global_config": "the app's global config",
    "worker": "the Worker",
    "starter": "the Starter",
    "task_executor": "the TaskExecutor running the task",
    "message": "the TaskMessage (.uuid, .name, .args, .kwargs, .priority, .attempt, ...)",
    "task": "the TaskMessage being run (.uuid, .name, .attempt, ...)",
    "definition": "the TaskDefinition (.name, .func, .metadata, ...)",
    "record": "a stored Task record (see *fires* for which), or None if there is none",
    "records": "list of Task records",
    "uuid": "the task uuid asked for (str)",
    "envelope": "the Envelope a broker moves (uuid, queue, priority, eta, created_at, body)",
    "deliveries": "list of Delivery (body, queue, priority, delivery_count, ...)",
    "info": "the worker's registry entry (dict): id, host, pid, queues, concurrency, ...",
    "outcome": "the Outcome of the attempt: kind, result, error_type, error_message, ...",
    "args": "positional arguments the function gets (the context first for echo tasks)",
    "kwargs": "keyword arguments the function gets (injected ones included)",
    "result": "the task's result so far",
    "error": "the TaskPluginTriggerError raised (.kwargs holds what the task passed)",
}
"""What each payload keyword is; the same keyword means the same thing in every trigger."""

# -- qtasks (the app) --------------------------------------------------------------------

QTASKS_START = _declare(
    "qtasks_start",
    "app.start(): after the global config, storage and broker started",
    ["app"],
)
QTASKS_STOP = _declare(
    "qtasks_stop",
    "app.stop(): before the components stop",
    ["app"],
    on_error=OnError.LOG,
)
QTASKS_ADD_TASK_BEFORE_BROKER = _declare(
    "qtasks_add_task_before_broker",
    "add_task: the message is built and its arguments checked, nothing is written yet",
    ["app", "message"],
    {"message": _Lazy("TaskMessage")},
)
QTASKS_ADD_TASK_AFTER_BROKER = _declare(
    "qtasks_add_task_after_broker",
    "add_task: the `new` record is stored and the message published",
    ["app", "message", "record"],
    {"record": _Lazy("Task")},
    on_error=OnError.LOG,  # the task is enqueued: an error here must not say otherwise
)
QTASKS_GET = _declare(
    "qtasks_get",
    "app.get(uuid): after the record was read",
    ["app", "uuid", "record"],
    {"record": _Lazy("Task", optional=True)},
)

# -- broker ------------------------------------------------------------------------------

BROKER_START = _declare("broker_start", "app.start(): after the broker started", ["broker"])
BROKER_STOP = _declare(
    "broker_stop",
    "app.stop(): before the broker stops (broker-scope dependencies are closed after it)",
    ["broker"],
    on_error=OnError.LOG,
)
BROKER_ADD_BEFORE = _declare(
    "broker_add_before",
    "add_task: before the broker publishes the message (and stores its record)",
    [
        "broker",
        "message",
        "envelope",
    ],
    {"envelope": _Lazy("Envelope")},
)
BROKER_ADD_AFTER = _declare(
    "broker_add_after",
    "add_task: after the broker published the message",
    ["broker", "message", "envelope"],
    on_error=OnError.LOG,
)
BROKER_FETCH = _declare(
    "broker_fetch",
    "worker: after a batch of deliveries was claimed from the broker",
    ["broker", "worker", "deliveries"],
    on_error=OnError.LOG,
)
BROKER_ACK = _declare(
    "broker_ack",
    "worker: after finished deliveries were acked (their records are stored)",
    ["broker", "worker", "deliveries"],
    on_error=OnError.LOG,
)

# -- storage -----------------------------------------------------------------------------

STORAGE_START = _declare("storage_start", "app.start(): after the storage started", ["storage"])
STORAGE_STOP = _declare(
    "storage_stop",
    "app.stop(): before the storage stops (storage-scope dependencies are closed after it)",
    ["storage"],
    on_error=OnError.LOG,
)
STORAGE_ADD = _declare(
    "storage_add",
    "add_task: before the `new` record is stored",
    ["storage", "message", "record"],
    {"record": _Lazy("Task")},
)
STORAGE_SAVE = _declare(
    "storage_save",
    "worker: before a batch of records (process, retry, final) is saved",
    ["storage", "worker", "records"],
    {"records": _LazyList("Task")},
    on_error=OnError.LOG,
)

# -- global_config -----------------------------------------------------------------------

GLOBAL_CONFIG_START = _declare(
    "global_config_start", "app.start(): after the global config started", ["global_config"]
)
GLOBAL_CONFIG_STOP = _declare(
    "global_config_stop",
    "app.stop(): before the global config stops",
    ["global_config"],
    on_error=OnError.LOG,
)
GLOBAL_CONFIG_REGISTER_WORKER = _declare(
    "global_config_register_worker",
    "worker: before it registers or refreshes its entry (every heartbeat interval)",
    ["global_config", "worker", "info"],
    {"info": _kwargs},
    on_error=OnError.LOG,
)

# -- worker ------------------------------------------------------------------------------

WORKER_START = _declare("worker_start", "worker.start(): once it is fetching", ["worker"])
WORKER_STOP = _declare(
    "worker_stop",
    "worker.stop(): after running tasks drained, before worker-scope dependencies close",
    ["worker"],
    on_error=OnError.LOG,
)
WORKER_EXECUTE_BEFORE = _declare(
    "worker_execute_before",
    "a delivery was decoded and its task found; before the `process` record is saved",
    ["worker", "message", "definition", "record"],
    {"record": _Lazy("Task")},
    on_error=OnError.FAIL_TASK,
)
WORKER_EXECUTE_AFTER = _declare(
    "worker_execute_after",
    "the executor returned; before the outcome is recorded",
    ["worker", "message", "definition", "outcome"],
    {"outcome": _Lazy("Outcome")},
    on_error=OnError.FAIL_TASK,
)
WORKER_TASK_ERROR_RETRY = _declare(
    "worker_task_error_retry",
    "an attempt failed and will be retried (after worker_execute_after)",
    ["worker", "message", "definition", "outcome"],
    {"outcome": _Lazy("Outcome")},
    on_error=OnError.FAIL_TASK,
)

# -- task_executor -----------------------------------------------------------------------

TASK_EXECUTOR_ARGS_REPLACE = _declare(
    "task_executor_args_replace",
    "arguments are bound, injected (context, Depends, State) and validated; before middlewares",
    [
        "task_executor",
        "task",
        "args",
        "kwargs",
    ],
    {"args": _args, "kwargs": _kwargs},
    on_error=OnError.FAIL_TASK,
)
TASK_EXECUTOR_RUN_TASK = _declare(
    "task_executor_run_task",
    "a function that is not a generator returned; before middlewares_after",
    ["task_executor", "task", "result"],
    {"result": _any_value},
    on_error=OnError.FAIL_TASK,
)
TASK_EXECUTOR_RUN_TASK_GEN = _declare(
    "task_executor_run_task_gen",
    "a generator task finished; before middlewares_after",
    ["task_executor", "task", "result"],
    {"result": _any_value},
    on_error=OnError.FAIL_TASK,
)
TASK_EXECUTOR_RUN_TASK_TRIGGER_ERROR = _declare(
    "task_executor_run_task_trigger_error",
    "the task raised TaskPluginTriggerError (ctx.plugin_error); if no plugin returns a "
    "result the task fails with that error",
    [
        "task_executor",
        "task",
        "error",
        "result",
    ],
    {"result": _any_value},
    on_error=OnError.FAIL_TASK,
)
TASK_EXECUTOR_DECODE = _declare(
    "task_executor_decode",
    "after middlewares_after and the task's decode=; before the result is stored",
    ["task_executor", "task", "result"],
    {"result": _any_value},
    on_error=OnError.FAIL_TASK,
)
TASK_EXECUTOR_TASK_CLOSE = _declare(
    "task_executor_task_close",
    "the attempt ended (any outcome but a worker shutdown) and task-scope dependencies closed",
    ["task_executor", "task", "outcome"],
    on_error=OnError.LOG,
)

# -- starter -----------------------------------------------------------------------------

STARTER_START = _declare(
    "starter_start",
    "starter.serve(): the app and the worker started",
    ["starter", "app", "worker"],
)
STARTER_STOP = _declare(
    "starter_stop",
    "starter.serve(): the worker stopped; before the app's components stop",
    ["starter", "app", "worker"],
    on_error=OnError.LOG,
)


def spec(name: str) -> TriggerSpec:
    """The declaration of one trigger; ValueError naming close matches if unknown."""
    try:
        return TRIGGERS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, TRIGGERS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown trigger {name!r}{hint} (see docs/triggers.md)") from None


def render_markdown() -> str:
    """The trigger table of docs/triggers.md."""
    lines = [
        "# Triggers",
        "",
        "Generated from `src/qtasks/plugins/triggers.py` by",
        "`python -m qtasks.plugins > docs/triggers.md`; a test keeps them equal.",
        "",
        "A plugin receives the payload as keyword arguments and returns None (change nothing)",
        "or a mapping with some of the keys under *replaces*; the next plugin sees the",
        "replaced values. Any other return value is an error. *If a plugin raises* says what",
        "its exception (or a malformed return) does.",
        "",
    ]
    for component in COMPONENTS:
        lines += [
            f"## {component}",
            "",
            "| trigger | fires | payload | replaces | if a plugin raises |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t in TRIGGERS.values():
            if t.component != component:
                continue
            payload = ", ".join(f"`{n}`" for n in t.payload)
            replaces = (
                ", ".join(f"`{k}` ({(c.__doc__ or '').strip()})" for k, c in t.replaces.items())
                or "—"
            )
            lines.append(f"| `{t.name}` | {t.when} | {payload} | {replaces} | {t.on_error.value} |")
        lines.append("")
    lines += ["## If a plugin raises", ""]
    lines += [f"- *{e.value}*: {e.meaning}" for e in OnError]
    lines += ["", "## Payload keywords", ""]
    lines += [f"- `{key}`: {what}" for key, what in PAYLOAD.items()]
    return "\n".join(lines) + "\n"
