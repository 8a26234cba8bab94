"""The asyncio core app: task registry, component wiring and the producer API.

`qtasks.asyncio.QueueTasks` is this class; the sync `qtasks.QueueTasks` drives it from a
private event-loop thread. Components are started lazily by the first call that needs
them, and `serve()` runs a worker until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

from qtasks import dead_letters
from qtasks.config import (
    BROKER_URL_ENV,
    DEFAULT_SQLITE_URL,
    STORAGE_URL_ENV,
    QueueConfig,
    url_from_env,
)
from qtasks.errors import ConfigurationError, PayloadTooLarge, TaskAlreadyRegistered, WaitTimeout
from qtasks.interfaces import Broker, GlobalConfig, Storage
from qtasks.message import DeadLetter, Envelope, Task, TaskMessage, new_uuid, record_for
from qtasks.middlewares import TaskMiddleware, as_middleware
from qtasks.plugins.base import (
    BasePlugin,
    PluginRegistry,
    entry_for,
    start_plugins,
    stop_plugins,
)
from qtasks.plugins.depends import DependencyScope, Scope
from qtasks.plugins.triggers import (
    BROKER_ADD_AFTER,
    BROKER_ADD_BEFORE,
    BROKER_START,
    BROKER_STOP,
    GLOBAL_CONFIG_START,
    GLOBAL_CONFIG_STOP,
    QTASKS_ADD_TASK_AFTER_BROKER,
    QTASKS_ADD_TASK_BEFORE_BROKER,
    QTASKS_GET,
    QTASKS_START,
    QTASKS_STOP,
    STORAGE_ADD,
    STORAGE_START,
    STORAGE_STOP,
)
from qtasks.plugins.validation import plain_models
from qtasks.retry import BackoffPolicy
from qtasks.runtime.executor import TaskExecutor
from qtasks.serializers import Serializer, serializer_for
from qtasks.task import (
    ADD_TASK_OPTIONS,
    AsyncTask,
    TaskDefinition,
    TaskStream,
    build_definition,
    caller_locals,
)
from qtasks.urls import backend_for, redact_url

if TYPE_CHECKING:
    from typing import ParamSpec

    from qtasks.router import Router, RouterTask
    from qtasks.runtime.starter import Starter
    from qtasks.runtime.worker import Worker

    P = ParamSpec("P")

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskCall:
    """One task for `add_tasks`: its name, arguments and the options `add_task` takes."""

    task_name: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    priority: int | None = None
    delay: float | None = None
    eta: datetime | float | None = None
    queue: str | None = None
    headers: dict[str, str] | None = None

    @classmethod
    def of(cls, call: TaskCall | Sequence[Any]) -> TaskCall:
        """A TaskCall from itself or a tuple `(name[, args[, kwargs[, options]]])`."""
        if isinstance(call, TaskCall):
            return call
        if isinstance(call, str) or not 1 <= len(call) <= 4:
            raise TypeError(
                f"add_tasks takes TaskCall objects or (task_name, args, kwargs, options) "
                f"tuples, got {call!r:.80}"
            )
        name, args, kwargs, options = (*call, (), {}, {})[:4]
        return cls(name, tuple(args), dict(kwargs or {}), **dict(options or {}))


class AsyncQueueTasks:
    """The asyncio app: register tasks with `@app.task`, enqueue with `add_task`, run `serve()`."""

    def __init__(
        self,
        name: str = "QueueTasks",
        broker_url: str | None = None,
        storage_url: str | None = None,
        *,
        broker: Broker | None = None,
        storage: Storage | None = None,
        global_config: GlobalConfig | None = None,
        worker: Worker | None = None,
        starter: Starter | None = None,
        config: QueueConfig | None = None,
        serializer: Serializer | str | None = None,
        executor: type[TaskExecutor] = TaskExecutor,
    ) -> None:
        if not name or not isinstance(name, str):
            raise ConfigurationError("the app name must be a non-empty string")
        self.name = name
        self.config = config or QueueConfig()
        # JSON with the config's payload limit; wrapped to sign and verify when keys are set.
        self.serializer = serializer_for(self.config, serializer)
        self.executor_class = executor
        self.tasks: dict[str, TaskDefinition] = {}
        self.middlewares: list[TaskMiddleware] = []
        self.plugins = PluginRegistry()
        """Trigger name -> plugins listening (see `add_plugin` and qtasks.plugins.triggers)."""
        self.dependency_overrides: dict[Callable[..., Any], Callable[..., Any]] = {}
        """Dependency -> replacement, applied when a task next resolves it (for tests)."""
        self.dependency_scopes = {
            scope: DependencyScope(scope, owner=f"app {name!r}")
            for scope in (Scope.BROKER, Scope.STORAGE, Scope.GLOBAL_CONFIG, Scope.WORKER)
        }
        """Values of the component scopes (and of `worker` for executors run without one)."""
        self._task_plugins: dict[str, tuple[int, TaskDefinition, PluginRegistry]] = {}
        self.broker_url = url_from_env(broker_url, BROKER_URL_ENV)
        if self.broker_url is None and broker is None:
            self.broker_url = DEFAULT_SQLITE_URL
        self.storage_url = url_from_env(storage_url, STORAGE_URL_ENV)
        self.broker = broker if broker is not None else self._build("broker", self.broker_url)
        self.storage = storage if storage is not None else self._build_storage()
        self.global_config = (
            global_config if global_config is not None else self._build_global_config()
        )
        self._worker = worker
        self._starter = starter
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._start_loop: asyncio.AbstractEventLoop | None = None

    # -- wiring ------------------------------------------------------------------------

    def _build(self, part: str, url: str | None) -> Any:
        if url is None:
            raise ConfigurationError(f"no URL to build the {part} from")
        factory = getattr(backend_for(url), part)
        if factory is None:
            # Brokers such as amqp:// and kafka:// keep no results: say what to pair them with.
            raise ConfigurationError(
                f"{redact_url(url)} provides no {part} (it keeps no task results); pass "
                f"storage_url='redis://localhost:6379/0' or storage_url='sqlite:///qtasks.sqlite3'"
                f" (the global config follows it), or {part}=..."
            )
        return factory(url, self.name, self.config)

    def _companion_url(self) -> str | None:
        """The URL the storage and global config follow when none is given."""
        return self.storage_url or self.broker_url or getattr(self.broker, "url", None)

    def _build_storage(self) -> Storage:
        url = self._companion_url()
        if url is None:
            raise ConfigurationError(
                f"cannot tell which storage goes with {type(self.broker).__name__}; "
                f"pass storage=... or storage_url=..."
            )
        storage: Storage = self._build("storage", url)
        return storage

    def _build_global_config(self) -> GlobalConfig:
        url = self._companion_url()
        if url is None:
            raise ConfigurationError("pass global_config=... for a broker given as an instance")
        backend = backend_for(url)
        if backend.global_config is None and self.storage_url:
            url = self.storage_url
        global_config: GlobalConfig = self._build("global_config", url)
        return global_config

    @property
    def worker(self) -> Worker:
        """The worker `serve()` runs (built from the config unless one was given)."""
        if self._worker is None:
            from qtasks.runtime.worker import Worker

            self._worker = Worker()
        return self._worker

    @property
    def starter(self) -> Starter:
        """The starter that owns the process while serving."""
        if self._starter is None:
            from qtasks.runtime.starter import Starter

            self._starter = Starter()
        return self._starter

    # -- registration ------------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R], /) -> AsyncTask[P, R]: ...

    @overload
    def task(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        priority: int | None = None,
        queue: str | None = None,
        retry: int | None = None,
        retry_on_exc: Sequence[type[BaseException]] | None = None,
        retry_backoff: BackoffPolicy | None = None,
        max_time: float | None = None,
        at_most_once: bool = False,
        echo: bool = False,
        decode: Callable[[Any], Any] | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        executor: type[TaskExecutor] | None = None,
        middlewares_before: Sequence[TaskMiddleware | type[TaskMiddleware]] = (),
        middlewares_after: Sequence[TaskMiddleware | type[TaskMiddleware]] = (),
        plugins: Sequence[BasePlugin | tuple[BasePlugin, Sequence[str]]] = (),
        **metadata: Any,
    ) -> Callable[[Callable[P, R]], AsyncTask[P, R]]: ...

    def task(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Register a function as a task, bare (`@app.task`) or with options.

        Options: name, priority (lower runs first), queue, retry, retry_on_exc,
        retry_backoff, max_time, at_most_once (never start one attempt twice, even after
        a crash: see `qtasks.runtime.worker.Worker`), echo, decode, tags, description,
        generate_handler, executor, middlewares_before, middlewares_after, plugins (this
        task's own plugins: `plugin` or `(plugin, ["trigger", ...])`); other keywords are
        kept as metadata.
        """
        localns = caller_locals()

        def register(f: Callable[..., Any]) -> AsyncTask[Any, Any]:
            return AsyncTask(self, self.register(f, localns=localns, **options))

        return register(func) if func is not None else register

    def register(
        self, func: Callable[..., Any], /, *, localns: dict[str, Any] | None = None, **options: Any
    ) -> TaskDefinition:
        """Add a task definition (what `@app.task` does) and return it.

        `localns`: names to resolve string annotations with (the decorating code's locals).
        """
        known = {
            "name", "priority", "queue", "retry", "retry_on_exc", "retry_backoff", "max_time",
            "at_most_once", "echo", "decode", "tags", "description", "generate_handler", "executor",
            "middlewares_before", "middlewares_after", "plugins",
        }  # fmt: skip
        metadata = {k: v for k, v in options.items() if k not in known}
        kwargs = {k: v for k, v in options.items() if k in known}
        definition = build_definition(func, metadata=metadata, localns=localns, **kwargs)
        if definition.name in self.tasks:
            raise TaskAlreadyRegistered(definition.name)
        self.tasks[definition.name] = definition
        return definition

    def register_router(self, router: Router) -> list[tuple[RouterTask[Any, Any], TaskDefinition]]:
        """Register every task of `router`; the handles and their definitions.

        All names are checked first, so a clash registers none of the router's tasks.
        """
        for entry in router.entries:
            if entry.handle.name in self.tasks:
                raise TaskAlreadyRegistered(entry.handle.name)
        return [
            (
                entry.handle,
                self.register(entry.func, localns=entry.localns, **router.merged_options(entry)),
            )
            for entry in router.entries
        ]

    def include_router(self, router: Router) -> None:
        """Register a router's tasks in this app; their handles then enqueue through it."""
        for handle, definition in self.register_router(router):
            handle._bind(AsyncTask(self, definition))

    def add_middleware(self, middleware: TaskMiddleware | type[TaskMiddleware]) -> None:
        """Run a middleware around every task of this app."""
        self.middlewares.append(as_middleware(middleware))

    def add_plugin(
        self,
        plugin: BasePlugin,
        trigger_names: Sequence[str] | None = None,
        component: str | None = None,
    ) -> None:
        """Make `plugin` listen to `trigger_names` (default: the plugin's own `triggers`).

        With `component` ("worker", "broker", ...), every trigger must be one that part
        fires (the worker's include the task executor's). Plugins of `worker` and
        `task_executor` start and stop with the worker; the others with the app. Add
        plugins before the app starts. Unknown trigger names are a ConfigurationError.
        """
        self.plugins.add(entry_for(plugin, trigger_names, component))

    def plugins_for(self, definition: TaskDefinition) -> PluginRegistry:
        """The registry a task's triggers fire on: the app's plugins, then the task's own."""
        if not definition.plugins:
            return self.plugins
        cached = self._task_plugins.get(definition.name)
        if cached is not None and cached[0] == self.plugins.version and cached[1] is definition:
            return cached[2]
        merged = self.plugins.with_entries(definition.plugins)
        self._task_plugins[definition.name] = (self.plugins.version, definition, merged)
        return merged

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start global config, storage and broker (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._start_loop is not loop:
            self._start_lock = asyncio.Lock()
            self._start_loop = loop
        assert self._start_lock is not None
        async with self._start_lock:
            if self._started:
                return
            plugins = self.plugins
            owned = plugins.owned_by("app")
            await start_plugins(owned)
            started: list[Broker | Storage | GlobalConfig] = []
            try:
                for part, trigger, key in (
                    (self.global_config, GLOBAL_CONFIG_START, "global_config"),
                    (self.storage, STORAGE_START, "storage"),
                    (self.broker, BROKER_START, "broker"),
                ):
                    await part.start()
                    started.append(part)
                    if trigger in plugins:
                        await plugins.fire(trigger, **{key: part})
                if QTASKS_START in plugins:
                    await plugins.fire(QTASKS_START, app=self)
            except BaseException:
                for part in reversed(started):
                    await self._stop_part(part)
                await stop_plugins(owned)
                raise
            self._started = True

    async def stop(self) -> None:
        """Stop the components in reverse order (idempotent); each closes its scope first."""
        scopes = self.dependency_scopes
        await scopes[Scope.WORKER].close()
        if not self._started:
            for scope in (Scope.BROKER, Scope.STORAGE, Scope.GLOBAL_CONFIG):
                await scopes[scope].close()
            return
        self._started = False
        plugins = self.plugins
        if QTASKS_STOP in plugins:
            await plugins.fire(QTASKS_STOP, app=self)
        for part, trigger, key, scope in (
            (self.broker, BROKER_STOP, "broker", Scope.BROKER),
            (self.storage, STORAGE_STOP, "storage", Scope.STORAGE),
            (self.global_config, GLOBAL_CONFIG_STOP, "global_config", Scope.GLOBAL_CONFIG),
        ):
            if trigger in plugins:
                await plugins.fire(trigger, **{key: part})
            await scopes[scope].close()
            await self._stop_part(part)
        await stop_plugins(plugins.owned_by("app"))

    @staticmethod
    async def _stop_part(part: Broker | Storage | GlobalConfig) -> None:
        try:
            await part.stop()
        except Exception:
            log.exception("stopping %s failed", type(part).__name__)

    async def __aenter__(self) -> AsyncQueueTasks:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(
        self, *, concurrency: int | None = None, queues: Sequence[str] | None = None
    ) -> None:
        """Run a worker in this process until SIGTERM/SIGINT, then drain gracefully."""
        worker = self.worker
        if concurrency is not None:
            worker.concurrency = concurrency
        if queues:
            worker.queues = list(queues)
        await self.starter.serve(self, worker)

    run_forever = serve

    # -- producer API ------------------------------------------------------------------

    def build_message(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        priority: int | None = None,
        delay: float | None = None,
        eta: datetime | float | None = None,
        queue: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> TaskMessage:
        """The message `add_task` would send; checks arguments of locally known tasks."""
        definition = self.tasks.get(task_name)
        if definition is not None:
            try:
                definition.bind(args, kwargs)
            except TypeError as exc:
                raise TypeError(
                    f"task {task_name!r}{definition.signature}: {exc}; nothing was enqueued"
                ) from None
        if headers and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise TypeError(f"headers must map str to str, got {headers!r}; nothing was enqueued")
        now = time.time()
        when: float | None
        if eta is not None and delay is not None:
            raise ValueError("pass either delay= or eta=, not both")
        if delay is not None:
            when = now + float(delay) if delay > 0 else None
        elif isinstance(eta, datetime):
            if eta.tzinfo is None:
                raise ValueError("eta must be timezone-aware (e.g. datetime.now(timezone.utc))")
            when = eta.timestamp()
        else:
            when = eta
        if priority is None:
            if definition is not None and definition.priority is not None:
                priority = definition.priority
            else:
                priority = self.config.default_task_priority
        if "pydantic" in sys.modules:  # its models are sent as their JSON data
            args, kwargs = plain_models(args, kwargs)
        return TaskMessage(
            uuid=new_uuid(),
            name=task_name,
            args=list(args),
            kwargs=kwargs,
            priority=int(priority),
            queue=queue or (definition.queue if definition is not None else "default"),
            eta=when,
            created_at=now,
            headers=headers or {},
        )

    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: datetime | float | None = None,
        queue: str | None = None,
        headers: dict[str, str] | None = None,
        task_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Task | None:
        """Enqueue a task by name and return its `new` record.

        With `timeout` (seconds) wait for the task to finish and return its final record,
        or None if the time runs out (use `wait()` for an exception instead). Keyword
        names in `ADD_TASK_OPTIONS` are options; pass task arguments with those names in
        `task_kwargs`.
        """
        if task_kwargs:
            kwargs = {**kwargs, **task_kwargs}
        message = self.build_message(
            task_name,
            args,
            kwargs,
            priority=priority,
            delay=delay,
            eta=eta,
            queue=queue,
            headers=headers,
        )
        uuid = message.uuid
        if _has_add_triggers(self.plugins):
            record = await self.send(message)
        else:
            # send() without the plugin hooks, inline: one coroutine less per call, and the
            # message is not kept alive while the write is queued (see Batcher).
            record, envelope = self._encoded(message)
            del message
            if not self._started:
                await self.start()
            await self.broker.enqueue(self.storage, [record], [envelope])
        if timeout is None:
            return record
        return await self.storage.wait(str(uuid), timeout)

    async def add_tasks(self, calls: Iterable[TaskCall | Sequence[Any]]) -> list[Task]:
        """Enqueue many tasks at once and return their `new` records, in order.

        Each call is a `TaskCall` or a tuple `(task_name, args, kwargs, options)` (the
        trailing parts optional; options as in `add_task`, without `timeout`). Every call
        is checked and encoded before anything is written, so a bad one enqueues nothing.
        Then records and messages go to the broker in `enqueue` calls of up to 1,000 tasks
        each, started one after another without waiting, so the broker stores one chunk
        while the next is prepared (Redis: one script call per chunk). If one fails, the
        others may be stored: the error is raised once all have returned. With plugins on
        the add_task triggers, each task goes through them one by one, as with `add_task`.
        """
        build = self.build_message
        messages = (
            build(
                call.task_name,
                call.args,
                dict(call.kwargs),
                priority=call.priority,
                delay=call.delay,
                eta=call.eta,
                queue=call.queue,
                headers=call.headers,
            )
            if isinstance(call, TaskCall)
            # A tuple is the usual form: not made a TaskCall first (a hot path).
            else _build_from_parts(build, call)
            for call in calls
        )
        if _has_add_triggers(self.plugins):
            built = list(messages)  # every one checked before any is sent
            return [await self.send(m) for m in built]
        # Each message is encoded as soon as it is built and then dropped (its record and
        # envelope are all that is kept): fewer live objects for the garbage collector.
        encoded = self._encoded
        envelopes: list[Envelope] = []
        records: list[Task] = []
        for message in messages:  # every one checked and encoded before any is written
            record, envelope = encoded(message)
            records.append(record)
            envelopes.append(envelope)
        if not self._started:
            await self.start()
        step = _ADD_TASKS_CHUNK
        if len(records) <= step:
            if records:
                await self.broker.enqueue(self.storage, records, envelopes)
            return records
        writes = []
        for i in range(0, len(records), step):
            chunk = self.broker.enqueue(
                self.storage, records[i : i + step], envelopes[i : i + step]
            )
            writes.append(asyncio.ensure_future(chunk))
            await asyncio.sleep(0)  # let it send before the next chunk is prepared
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return records

    async def send(self, message: TaskMessage) -> Task:
        """Record and publish a built message; on a publish failure the record is removed.

        Fires the add_task triggers (qtasks_add_task_*, storage_add, broker_add_*).
        """
        plugins = self.plugins
        if plugins and QTASKS_ADD_TASK_BEFORE_BROKER in plugins:
            if not self._started:
                await self.start()
            changes = await plugins.fire(QTASKS_ADD_TASK_BEFORE_BROKER, app=self, message=message)
            if "message" in changes:
                message = self._checked(changes["message"])
        record, envelope = self._encoded(message)
        if not self._started:
            await self.start()
        if plugins:
            if STORAGE_ADD in plugins:
                changes = await plugins.fire(
                    STORAGE_ADD, storage=self.storage, message=message, record=record
                )
                record = changes.get("record", record)
            if BROKER_ADD_BEFORE in plugins:
                changes = await plugins.fire(
                    BROKER_ADD_BEFORE, broker=self.broker, message=message, envelope=envelope
                )
                envelope = changes.get("envelope", envelope)
        await self.broker.enqueue(self.storage, [record], [envelope])
        if plugins:
            if BROKER_ADD_AFTER in plugins:
                await plugins.fire(
                    BROKER_ADD_AFTER, broker=self.broker, message=message, envelope=envelope
                )
            if QTASKS_ADD_TASK_AFTER_BROKER in plugins:
                changes = await plugins.fire(
                    QTASKS_ADD_TASK_AFTER_BROKER, app=self, message=message, record=record
                )
                record = changes.get("record", record)
        return record

    def _encoded(self, message: TaskMessage) -> tuple[Task, Envelope]:
        """The `new` record and the envelope of a message; checked before any I/O.

        EncodeError or PayloadTooLarge before anything is written, even the first start.
        """
        body = self.serializer.encode(message)
        limit = self.config.max_payload_bytes
        if limit is not None and len(body) > limit:
            raise PayloadTooLarge(message.name, len(body), limit)
        envelope = Envelope(
            str(message.uuid),
            message.queue,
            message.priority,
            message.eta,
            message.created_at,
            body,
        )
        return record_for(message), envelope

    def _checked(self, message: TaskMessage) -> TaskMessage:
        """A message a plugin put in place of the built one: its arguments must still fit."""
        definition = self.tasks.get(message.name)
        if definition is not None:
            try:
                definition.bind(message.args, message.kwargs)
            except TypeError as exc:
                raise TypeError(
                    f"task {message.name!r}{definition.signature}: a plugin's message: {exc}; "
                    f"nothing was enqueued"
                ) from None
        return message

    async def get(self, uuid: Any) -> Task | None:
        """The task's record, or None if unknown or expired."""
        if not self._started:
            await self.start()
        record = await self.storage.get(str(uuid))
        plugins = self.plugins
        if plugins and QTASKS_GET in plugins:
            changes = await plugins.fire(QTASKS_GET, app=self, uuid=str(uuid), record=record)
            record = changes.get("record", record)
        return record

    async def wait(self, uuid: Any, timeout: float) -> Task:
        """The task's final record; WaitTimeout (carrying the uuid) if it takes longer."""
        if not self._started:
            await self.start()
        task = await self.storage.wait(str(uuid), timeout)
        if task is None:
            raise WaitTimeout(str(uuid), timeout)
        return task

    def stream(self, uuid: Any, *, timeout: float | None = None) -> TaskStream:
        """Follow a task already enqueued: `async for step in app.stream(uuid)`.

        Its steps so far first, then live ones, until it ends (see `TaskStream`: the
        final record is in `.record`, a failure raises TaskFailed, `timeout` WaitTimeout).
        """
        return TaskStream(self, str(uuid), timeout=timeout)

    async def dead_letters(
        self,
        queues: Sequence[str] | None = None,
        limit: int = 100,
        uuids: Sequence[Any] | None = None,
    ) -> list[DeadLetter]:
        """Messages set aside instead of run (failed for good, worker_lost, undecodable,
        unknown task), newest first; `queues` defaults to every queue of the app's tasks."""
        return await dead_letters.list_dead_letters(
            self, queues, limit, None if uuids is None else [str(u) for u in uuids]
        )

    async def retry_dead_letters(
        self, uuids: Sequence[Any] | None = None, queues: Sequence[str] | None = None
    ) -> list[str]:
        """Send dead letters again under their uuids (all of `queues` when `uuids` is None);
        the uuids sent. Their records go back to `new` and their attempts start over."""
        return await dead_letters.retry_dead_letters(
            self, None if uuids is None else [str(u) for u in uuids], queues
        )

    async def drop_dead_letters(
        self, uuids: Sequence[Any] | None = None, queues: Sequence[str] | None = None
    ) -> list[str]:
        """Delete dead letters (all of `queues` when `uuids` is None); the uuids deleted."""
        return await dead_letters.drop_dead_letters(
            self, None if uuids is None else [str(u) for u in uuids], queues
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} broker={type(self.broker).__name__} "
            f"tasks={len(self.tasks)}>"
        )


_ADD_TASKS_CHUNK = 1000


def _has_add_triggers(plugins: PluginRegistry) -> bool:
    # A function, not an inline genexpr: that would make `plugins` a cell in add_task.
    return bool(plugins) and any(t in plugins for t in _ADD_TRIGGERS)


_CALL_OPTIONS = frozenset(f.name for f in dataclasses.fields(TaskCall)) - {
    "task_name",
    "args",
    "kwargs",
}


def _build_from_parts(build: Callable[..., TaskMessage], call: Sequence[Any]) -> TaskMessage:
    name, args, kwargs, options = _call_parts(call)
    return build(name, args, kwargs, **options)


def _call_parts(call: Sequence[Any]) -> tuple[str, Sequence[Any], dict[str, Any], dict[str, Any]]:
    """(name, args, kwargs, options) of an `add_tasks` tuple, checked as `TaskCall.of` does."""
    if isinstance(call, str) or not 1 <= len(call) <= 4:
        raise TypeError(
            f"add_tasks takes TaskCall objects or (task_name, args, kwargs, options) "
            f"tuples, got {call!r:.80}"
        )
    n = len(call)
    args = call[1] if n > 1 else ()
    if type(args) is not tuple and type(args) is not list:
        args = tuple(args)
    kwargs = dict(call[2]) if n > 2 and call[2] else {}
    options = dict(call[3]) if n > 3 and call[3] else {}
    unknown = options.keys() - _CALL_OPTIONS
    if unknown:
        raise TypeError(f"add_tasks: unknown option(s) {sorted(unknown)} in {call!r:.80}")
    return call[0], args, kwargs, options


_ADD_TRIGGERS = (
    QTASKS_ADD_TASK_BEFORE_BROKER,
    STORAGE_ADD,
    BROKER_ADD_BEFORE,
    BROKER_ADD_AFTER,
    QTASKS_ADD_TASK_AFTER_BROKER,
)

__all__ = ["ADD_TASK_OPTIONS", "AsyncQueueTasks", "TaskCall"]
