"""The sync app: a thin facade that drives the asyncio core from one private loop thread.

Every producer method forwards to the core in one line through `Portal.call`; no logic
lives here. `run_forever()` runs the worker on the calling (main) thread's own loop so
signals work as usual.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from qtasks.app import AsyncQueueTasks, TaskCall
from qtasks.config import QueueConfig
from qtasks.message import DeadLetter, Task
from qtasks.task import AsyncTask, TaskDefinition, TaskStream, caller_locals

if TYPE_CHECKING:
    from qtasks.interfaces import Broker, GlobalConfig, Storage
    from qtasks.middlewares import TaskMiddleware
    from qtasks.plugins.base import BasePlugin
    from qtasks.router import Router
    from qtasks.runtime.executor import TaskExecutor
    from qtasks.runtime.starter import Starter
    from qtasks.runtime.worker import Worker
    from qtasks.serializers import Serializer

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class Portal:
    """One event loop in a daemon thread; sync code runs coroutines on it and blocks."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="qtasks-portal", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    @property
    def running(self) -> bool:
        """True while the loop thread exists."""
        return self._loop is not None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the portal loop and return its result (re-raising its error)."""
        loop = self._ensure()
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return fut.result()

    def close(self) -> None:
        """Stop the loop thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class SyncTaskStream:
    """`TaskStream` for sync code: `for step in task.stream(...)`; each step is awaited on
    the portal loop (see `qtasks.task.TaskStream` for what it yields and raises)."""

    def __init__(self, portal: Portal, stream: TaskStream) -> None:
        self.portal = portal
        self.async_stream = stream

    uuid = property(lambda self: self.async_stream.uuid, doc="The task followed.")
    record = property(lambda self: self.async_stream.record, doc="The final record, at the end.")
    result = property(lambda self: self.async_stream.result, doc="The task's result, at the end.")

    def start(self) -> SyncTaskStream:
        """Enqueue the task (or check the record exists); the first iteration calls it."""
        self.portal.call(self.async_stream.start())
        return self

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return self.portal.call(self.async_stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __repr__(self) -> str:
        return repr(self.async_stream)


class SyncTask(Generic[P, R]):
    """What `@app.task` returns on the sync app: call it locally or `.add_task(...)`."""

    def __init__(self, app: QueueTasks, task: AsyncTask[P, R]) -> None:
        self.app = app
        self.async_task = task
        self.definition: TaskDefinition = task.definition
        self.__name__ = task.definition.name
        self.__doc__ = task.definition.description
        self.__wrapped__ = task.definition.func

    @property
    def name(self) -> str:
        """The registered name."""
        return self.definition.name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, now, as a plain call (no queue)."""
        return self.async_task(*args, **kwargs)

    @overload
    def add_task(
        self,
        *args: Any,
        priority: int | None = ...,
        timeout: None = ...,
        delay: float | None = ...,
        eta: datetime | float | None = ...,
        queue: str | None = ...,
        headers: dict[str, str] | None = ...,
        task_kwargs: dict[str, Any] | None = ...,
        **kwargs: Any,
    ) -> Task: ...

    @overload
    def add_task(
        self,
        *args: Any,
        priority: int | None = ...,
        timeout: float,
        delay: float | None = ...,
        eta: datetime | float | None = ...,
        queue: str | None = ...,
        headers: dict[str, str] | None = ...,
        task_kwargs: dict[str, Any] | None = ...,
        **kwargs: Any,
    ) -> Task | None: ...

    def add_task(self, *args: Any, **kwargs: Any) -> Task | None:
        """Enqueue this task; with `timeout` wait for and return the finished record."""
        result: Task | None = self.app.portal.call(self.async_task.add_task(*args, **kwargs))
        return result

    def stream(self, *args: Any, **kwargs: Any) -> SyncTaskStream:
        """Enqueue this generator task and iterate its steps as they happen (options as in
        `add_task`); see `qtasks.task.AsyncTask.stream`."""
        return SyncTaskStream(self.app.portal, self.async_task.stream(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<SyncTask {self.definition.name!r} ({self.definition.kind.value})>"


class QueueTasks:
    """The sync app; same constructor and API as `qtasks.asyncio.QueueTasks`, without await."""

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
        executor: type[TaskExecutor] | None = None,
    ) -> None:
        extra: dict[str, Any] = {"executor": executor} if executor is not None else {}
        self.core = AsyncQueueTasks(
            name,
            broker_url,
            storage_url,
            broker=broker,
            storage=storage,
            global_config=global_config,
            worker=worker,
            starter=starter,
            config=config,
            serializer=serializer,
            **extra,
        )
        self.portal = Portal()
        atexit.register(self.close)

    # Read-through views of the core, so code can treat both apps alike.
    name = property(lambda self: self.core.name, doc="The app name.")
    config = property(lambda self: self.core.config, doc="The app's QueueConfig.")
    broker = property(lambda self: self.core.broker, doc="The broker.")
    storage = property(lambda self: self.core.storage, doc="The storage.")
    global_config = property(lambda self: self.core.global_config, doc="The global config.")
    tasks = property(lambda self: self.core.tasks, doc="Registered task definitions by name.")
    plugins = property(lambda self: self.core.plugins, doc="Trigger name -> listening plugins.")
    dependency_overrides = property(
        lambda self: self.core.dependency_overrides,
        doc="Dependency -> replacement, applied when a task next resolves it (for tests).",
    )

    @overload
    def task(self, func: Callable[P, R], /) -> SyncTask[P, R]: ...

    @overload
    def task(
        self, func: None = None, /, **options: Any
    ) -> Callable[[Callable[P, R]], SyncTask[P, R]]: ...

    def task(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Register a function as a task; options as on the async app."""
        localns = caller_locals()

        def register(f: Callable[..., Any]) -> SyncTask[Any, Any]:
            definition = self.core.register(f, localns=localns, **options)
            return SyncTask(self, AsyncTask(self.core, definition))

        return register(func) if func is not None else register

    def include_router(self, router: Router) -> None:
        """Register a router's tasks in this app; their handles then enqueue through it."""
        for handle, definition in self.core.register_router(router):
            handle._bind(SyncTask(self, AsyncTask(self.core, definition)))

    def add_middleware(self, middleware: TaskMiddleware | type[TaskMiddleware]) -> None:
        """Run a middleware around every task of this app."""
        self.core.add_middleware(middleware)

    def add_plugin(
        self,
        plugin: BasePlugin,
        trigger_names: Sequence[str] | None = None,
        component: str | None = None,
    ) -> None:
        """Make `plugin` listen to triggers; see `qtasks.asyncio.QueueTasks.add_plugin`."""
        self.core.add_plugin(plugin, trigger_names, component)

    def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Task | None:
        """Enqueue a task by name; see `qtasks.asyncio.QueueTasks.add_task`."""
        return self.portal.call(self.core.add_task(task_name, *args, **kwargs))

    def add_tasks(self, calls: Iterable[TaskCall | Sequence[Any]]) -> list[Task]:
        """Enqueue many tasks at once; see `qtasks.asyncio.QueueTasks.add_tasks`."""
        return self.portal.call(self.core.add_tasks(calls))

    def get(self, uuid: Any) -> Task | None:
        """The task's record, or None if unknown or expired."""
        return self.portal.call(self.core.get(uuid))

    def wait(self, uuid: Any, timeout: float) -> Task:
        """The task's final record; WaitTimeout (carrying the uuid) if it takes longer."""
        return self.portal.call(self.core.wait(uuid, timeout))

    def stream(self, uuid: Any, *, timeout: float | None = None) -> SyncTaskStream:
        """Follow a task already enqueued, step by step; see `qtasks.asyncio.QueueTasks.stream`."""
        return SyncTaskStream(self.portal, self.core.stream(uuid, timeout=timeout))

    def dead_letters(
        self,
        queues: Sequence[str] | None = None,
        limit: int = 100,
        uuids: Sequence[Any] | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, newest first; see `qtasks.asyncio.QueueTasks.dead_letters`."""
        return self.portal.call(self.core.dead_letters(queues, limit, uuids))

    def retry_dead_letters(
        self, uuids: Sequence[Any] | None = None, queues: Sequence[str] | None = None
    ) -> list[str]:
        """Send dead letters again; see `qtasks.asyncio.QueueTasks.retry_dead_letters`."""
        return self.portal.call(self.core.retry_dead_letters(uuids, queues))

    def drop_dead_letters(
        self, uuids: Sequence[Any] | None = None, queues: Sequence[str] | None = None
    ) -> list[str]:
        """Delete dead letters; see `qtasks.asyncio.QueueTasks.drop_dead_letters`."""
        return self.portal.call(self.core.drop_dead_letters(uuids, queues))

    def run_forever(
        self, *, concurrency: int | None = None, queues: Sequence[str] | None = None
    ) -> None:
        """Run a worker in this thread until SIGTERM/SIGINT (or Ctrl+C)."""
        self.close()  # components move from the portal loop to this thread's loop
        asyncio.run(self.core.serve(concurrency=concurrency, queues=queues))

    def close(self) -> None:
        """Stop the components and the portal thread; the app can be used again after."""
        if self.portal.running:
            self.portal.call(self.core.stop())
            self.portal.close()

    def __enter__(self) -> QueueTasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<QueueTasks {self.core.name!r} broker={type(self.core.broker).__name__}>"
