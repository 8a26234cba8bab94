"""The asyncio core app: task registry, component wiring and the producer API.

`qtasks.asyncio.QueueTasks` is this class; the sync `qtasks.QueueTasks` drives it from a
private event-loop thread. Components are started lazily by the first call that needs
them, and `serve()` runs a worker until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

from qtasks.config import (
    BROKER_URL_ENV,
    DEFAULT_SQLITE_URL,
    STORAGE_URL_ENV,
    QueueConfig,
    url_from_env,
)
from qtasks.errors import ConfigurationError, TaskAlreadyRegistered, WaitTimeout
from qtasks.interfaces import Broker, GlobalConfig, Storage
from qtasks.message import Envelope, Task, TaskMessage, new_uuid, record_for
from qtasks.middlewares import TaskMiddleware, as_middleware
from qtasks.retry import BackoffPolicy
from qtasks.runtime.executor import TaskExecutor
from qtasks.serializers import JsonSerializer, Serializer
from qtasks.task import ADD_TASK_OPTIONS, AsyncTask, TaskDefinition, build_definition
from qtasks.urls import backend_for, redact_url

if TYPE_CHECKING:
    from typing import ParamSpec

    from qtasks.runtime.starter import Starter
    from qtasks.runtime.worker import Worker

    P = ParamSpec("P")

R = TypeVar("R")
log = logging.getLogger(__name__)


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
        serializer: Serializer | None = None,
        executor: type[TaskExecutor] = TaskExecutor,
    ) -> None:
        if not name or not isinstance(name, str):
            raise ConfigurationError("the app name must be a non-empty string")
        self.name = name
        self.config = config or QueueConfig()
        self.serializer = serializer or JsonSerializer()
        self.executor_class = executor
        self.tasks: dict[str, TaskDefinition] = {}
        self.middlewares: list[TaskMiddleware] = []
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
            raise ConfigurationError(
                f"{redact_url(url)} provides no {part}; pass {part}=... or a "
                f"{part}_url that does (for example storage_url='sqlite:///qtasks.sqlite3')"
            )
        return factory(url, self.name, self.config)

    def _companion_url(self) -> str | None:
        """The URL the storage and global config follow when none is given."""
        return self.storage_url or self.broker_url or getattr(self.broker, "url", None)

    def _build_storage(self) -> Storage:
        url = self.storage_url or self.broker_url or getattr(self.broker, "url", None)
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
        echo: bool = False,
        decode: Callable[[Any], Any] | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        executor: type[TaskExecutor] | None = None,
        middlewares_before: Sequence[TaskMiddleware | type[TaskMiddleware]] = (),
        middlewares_after: Sequence[TaskMiddleware | type[TaskMiddleware]] = (),
        **metadata: Any,
    ) -> Callable[[Callable[P, R]], AsyncTask[P, R]]: ...

    def task(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Register a function as a task, bare (`@app.task`) or with options.

        Options: name, priority (lower runs first), queue, retry, retry_on_exc,
        retry_backoff, max_time, echo, decode, tags, description, generate_handler,
        executor, middlewares_before, middlewares_after; other keywords are kept as
        metadata.
        """

        def register(f: Callable[..., Any]) -> AsyncTask[Any, Any]:
            return AsyncTask(self, self.register(f, **options))

        return register(func) if func is not None else register

    def register(self, func: Callable[..., Any], **options: Any) -> TaskDefinition:
        """Add a task definition (what `@app.task` does) and return it."""
        known = {
            "name", "priority", "queue", "retry", "retry_on_exc", "retry_backoff", "max_time",
            "echo", "decode", "tags", "description", "generate_handler", "executor",
            "middlewares_before", "middlewares_after",
        }  # fmt: skip
        metadata = {k: v for k, v in options.items() if k not in known}
        kwargs = {k: v for k, v in options.items() if k in known}
        definition = build_definition(func, metadata=metadata, **kwargs)
        if definition.name in self.tasks:
            raise TaskAlreadyRegistered(definition.name)
        self.tasks[definition.name] = definition
        return definition

    def add_middleware(self, middleware: TaskMiddleware | type[TaskMiddleware]) -> None:
        """Run a middleware around every task of this app."""
        self.middlewares.append(as_middleware(middleware))

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
            await self.global_config.start()
            await self.storage.start()
            await self.broker.start()
            self._started = True

    async def stop(self) -> None:
        """Stop the components in reverse order (idempotent)."""
        if not self._started:
            return
        self._started = False
        for part in (self.broker, self.storage, self.global_config):
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
        record = await self.send(message)
        if timeout is None:
            return record
        return await self.storage.wait(str(message.uuid), timeout)

    async def send(self, message: TaskMessage) -> Task:
        """Record and publish a built message; on a publish failure the record is removed."""
        body = self.serializer.encode(message)  # EncodeError before anything is written
        if not self._started:
            await self.start()
        record = record_for(message)
        envelope = Envelope(
            str(message.uuid),
            message.queue,
            message.priority,
            message.eta,
            message.created_at,
            body,
        )
        await self.broker.enqueue(self.storage, [record], [envelope])
        return record

    async def get(self, uuid: Any) -> Task | None:
        """The task's record, or None if unknown or expired."""
        if not self._started:
            await self.start()
        return await self.storage.get(str(uuid))

    async def wait(self, uuid: Any, timeout: float) -> Task:
        """The task's final record; WaitTimeout (carrying the uuid) if it takes longer."""
        if not self._started:
            await self.start()
        task = await self.storage.wait(str(uuid), timeout)
        if task is None:
            raise WaitTimeout(str(uuid), timeout)
        return task

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} broker={type(self.broker).__name__} "
            f"tasks={len(self.tasks)}>"
        )


__all__ = ["ADD_TASK_OPTIONS", "AsyncQueueTasks"]
