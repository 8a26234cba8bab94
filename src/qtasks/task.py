"""`@app.task`: the registered definition and the handle users call `add_task` on."""

from __future__ import annotations

import collections
import dataclasses
import enum
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from qtasks.errors import TaskFailed, TaskNotFound, WaitTimeout
from qtasks.message import DEFAULT_QUEUE, Task, TaskMessage, TaskStatusEnum
from qtasks.middlewares import TaskMiddleware, as_middleware
from qtasks.plugins.base import PluginEntry, task_plugin_entries
from qtasks.plugins.depends import CallPlan, build_call_plan
from qtasks.retry import BackoffPolicy

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.plugins.base import BasePlugin
    from qtasks.runtime.executor import TaskExecutor

P = ParamSpec("P")
R = TypeVar("R")

ADD_TASK_OPTIONS = frozenset(
    {"priority", "timeout", "delay", "eta", "queue", "headers", "task_kwargs"}
)
"""Keyword names `add_task` keeps for itself; pass a task argument with one of these names
inside `task_kwargs={...}`."""


class FunctionKind(enum.Enum):
    """How a task function is called."""

    SYNC = "sync"
    ASYNC = "async"
    GENERATOR = "generator"
    ASYNC_GENERATOR = "async_generator"

    @property
    def on_loop(self) -> bool:
        """True when the function's code runs on the worker's event loop (not a thread)."""
        return self in (FunctionKind.ASYNC, FunctionKind.ASYNC_GENERATOR)


def caller_locals(depth: int = 2) -> dict[str, Any] | None:
    """A copy of the local names of the frame `depth` calls up (the code decorating a task).

    Annotations written as strings (`from __future__ import annotations`) may name classes
    local to that code; registration resolves them with these names.
    """
    try:
        frame = sys._getframe(depth)
    except ValueError:  # pragma: no cover - not that deep
        return None
    return dict(frame.f_locals)


def function_kind(func: Callable[..., Any]) -> FunctionKind:
    """Classify a function (unwrapping functools.partial and decorators)."""
    target = inspect.unwrap(func)
    if inspect.isasyncgenfunction(target):
        return FunctionKind.ASYNC_GENERATOR
    if inspect.isgeneratorfunction(target):
        return FunctionKind.GENERATOR
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - async callable objects
    ):
        return FunctionKind.ASYNC
    return FunctionKind.SYNC


@dataclasses.dataclass
class TaskDefinition:
    """Everything `@app.task` learned about one task, fixed at registration."""

    name: str
    func: Callable[..., Any]
    kind: FunctionKind
    priority: int | None = None
    queue: str = DEFAULT_QUEUE
    retry: int = 0
    retry_on_exc: tuple[type[BaseException], ...] | None = None
    retry_backoff: BackoffPolicy | None = None
    max_time: float | None = None
    at_most_once: bool = False
    echo: bool = False
    decode: Callable[[Any], Any] | None = None
    tags: tuple[str, ...] = ()
    description: str | None = None
    generate_handler: Callable[[Any], Any] | None = None
    executor: type[TaskExecutor] | None = None
    middlewares_before: list[TaskMiddleware] = dataclasses.field(default_factory=list)
    middlewares_after: list[TaskMiddleware] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    signature: inspect.Signature | None = None
    """The signature arguments are bound against (without the context of echo tasks and
    without injected parameters: Depends and State)."""
    plugins: tuple[PluginEntry, ...] = ()
    """This task's own plugins (they run after the app's)."""
    call_plan: CallPlan | None = None
    """How injected and validated parameters are filled; None when there are none."""

    _fitting_shapes: set[tuple[int, tuple[str, ...]]] = dataclasses.field(
        default_factory=set, repr=False, compare=False
    )

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Raise TypeError if the arguments do not fit the function's signature."""
        if self.signature is None:
            return
        # Whether arguments bind depends only on how many positionals and which keyword
        # names there are, never on values: remember shapes that fit (a hot path).
        shape = (len(args), tuple(kwargs))
        if shape in self._fitting_shapes:
            return
        self.signature.bind(*args, **kwargs)
        if len(self._fitting_shapes) < 64:
            self._fitting_shapes.add(shape)


def build_definition(
    func: Callable[..., Any],
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
    metadata: dict[str, Any] | None = None,
    localns: dict[str, Any] | None = None,
) -> TaskDefinition:
    """Validate options and build the definition; errors here are the user's to fix.

    `localns` resolves string annotations naming classes local to the registering code
    (State classes and models defined inside a function).
    """
    if not callable(func):
        raise TypeError(f"@app.task needs a function, got {func!r}")
    task_name = name or getattr(func, "__name__", None)
    if not task_name:
        raise ValueError(f"cannot infer a task name for {func!r}; pass name=...")
    if retry is not None and retry < 0:
        raise ValueError(f"task {task_name!r}: retry must be >= 0, got {retry}")
    if max_time is not None and max_time <= 0:
        raise ValueError(f"task {task_name!r}: max_time must be > 0, got {max_time}")
    for exc_type in retry_on_exc or ():
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise TypeError(
                f"task {task_name!r}: retry_on_exc holds {exc_type!r}, not an exception"
            )
    if not isinstance(at_most_once, bool):
        raise TypeError(f"task {task_name!r}: at_most_once must be True or False")
    if generate_handler is not None and not callable(generate_handler):
        raise TypeError(f"task {task_name!r}: generate_handler must be callable")
    if executor is not None:
        from qtasks.runtime.executor import TaskExecutor

        if not (isinstance(executor, type) and issubclass(executor, TaskExecutor)):
            raise TypeError(f"task {task_name!r}: executor must be a TaskExecutor subclass")
    signature, plan = build_call_plan(func, task_name=task_name, echo=echo, localns=localns)
    return TaskDefinition(
        name=task_name,
        func=func,
        kind=function_kind(func),
        priority=priority,
        queue=queue or DEFAULT_QUEUE,
        retry=retry or 0,
        retry_on_exc=tuple(retry_on_exc) if retry_on_exc is not None else None,
        retry_backoff=retry_backoff,
        max_time=max_time,
        at_most_once=at_most_once,
        echo=echo,
        decode=decode,
        tags=tuple(tags),
        description=description or inspect.getdoc(func),
        generate_handler=generate_handler,
        executor=executor,
        middlewares_before=[as_middleware(m) for m in middlewares_before],
        middlewares_after=[as_middleware(m) for m in middlewares_after],
        metadata=dict(metadata or {}),
        signature=signature,
        plugins=task_plugin_entries(plugins),
        call_plan=plan,
    )


def check_streamable(definition: TaskDefinition) -> None:
    """TypeError unless the task is a generator (only generators have steps to stream)."""
    if definition.kind not in (FunctionKind.GENERATOR, FunctionKind.ASYNC_GENERATOR):
        raise TypeError(
            f"task {definition.name!r} is not a generator, so it has no steps to stream; "
            f"nothing was enqueued. Use add_task(..., timeout=...) for its result"
        )


class AsyncTask(Generic[P, R]):
    """What `@app.task` returns on the async app: call it locally or `await .add_task(...)`."""

    def __init__(self, app: AsyncQueueTasks, definition: TaskDefinition) -> None:
        self.app = app
        self.definition = definition
        self.__name__ = definition.name
        self.__doc__ = definition.description
        self.__wrapped__ = definition.func

    @property
    def name(self) -> str:
        """The registered name."""
        return self.definition.name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, now, as a plain call (no queue)."""
        result: R = self.definition.func(*args, **kwargs)
        return result

    @overload
    async def add_task(
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
    async def add_task(
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

    async def add_task(
        self,
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
        """Enqueue this task; with `timeout` wait for and return the finished record."""
        return await self.app.add_task(
            self.definition.name,
            *args,
            priority=priority,
            timeout=timeout,
            delay=delay,
            eta=eta,
            queue=queue,
            headers=headers,
            task_kwargs=task_kwargs,
            **kwargs,
        )

    def stream(
        self,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: datetime | float | None = None,
        queue: str | None = None,
        headers: dict[str, str] | None = None,
        task_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TaskStream:
        """Enqueue this generator task and follow its steps: `async for step in task.stream()`.

        Options as in `add_task`; `timeout` bounds the wait for the task's end (see
        `TaskStream`). Arguments are checked now; the task is sent at the first
        iteration. TypeError, with nothing enqueued, for a task that is not a generator
        (it has no steps: use `add_task(timeout=...)`).
        """
        check_streamable(self.definition)
        if task_kwargs:
            kwargs = {**kwargs, **task_kwargs}
        message = self.app.build_message(
            self.definition.name,
            args,
            kwargs,
            priority=priority,
            delay=delay,
            eta=eta,
            queue=queue,
            headers=headers,
        )
        return TaskStream(self.app, str(message.uuid), timeout=timeout, message=message)

    def __repr__(self) -> str:
        return f"<AsyncTask {self.definition.name!r} ({self.definition.kind.value})>"


STREAM_WAIT_CHUNK_SECONDS = 30.0
"""How long one storage wait of a stream without a timeout lasts (it then waits again)."""


class TaskStream:
    """The steps of one task as they happen: `async for step in stream`.

    A step is what a generator task yielded, after its generate_handler if it has one
    (one item of the result list a generator without `return` value gets). The stream
    replays the steps stored so far, then the live ones as the worker stores them, from
    any process, and ends when the task does:

    * `success`: the iteration stops; `record` is the final record and `result` its
      `returning` (the generator's return value, else the list of steps);
    * `error` or `cancel`: `TaskFailed` with the final record, after every step;
    * not finished within `timeout` seconds of the first iteration: `WaitTimeout`. The
      task goes on; `app.stream(uuid)` follows it again from its first step.

    A retried task's stream goes on through the retry: it shows every attempt's steps in
    turn. A task that is not a generator has no steps: its stream ends (or raises) when
    it does, with the result in `result`. Made by `task.stream(...)`, which enqueues the
    task at the first iteration (`uuid` is known at once), or by `app.stream(uuid)`,
    which follows a task already enqueued (`TaskNotFound` if there is no record of it).
    The storage must keep steps (memory, SQLite and Redis do); others raise
    NotImplementedError. Holds nothing between iterations: breaking off needs no cleanup.
    """

    def __init__(
        self,
        app: AsyncQueueTasks,
        uuid: str,
        *,
        timeout: float | None = None,
        message: TaskMessage | None = None,
    ) -> None:
        self.app = app
        self.uuid = uuid
        """The task followed (a plugin that replaces the message may change it at start)."""
        self.timeout = timeout
        self.record: Task | None = None
        """The final record, once the stream reached it."""
        self._message = message
        self._buffer: collections.deque[Any] = collections.deque()
        self._after = 0
        self._deadline: float | None = None
        self._started = False
        self._ended = False

    @property
    def result(self) -> Any:
        """The task's result (`record.returning`); None until the stream ended."""
        return None if self.record is None else self.record.returning

    async def start(self) -> TaskStream:
        """Enqueue the task (or check the record exists); the first iteration calls it."""
        if self._started:
            return self
        app = self.app
        if self._message is not None:
            record = await app.send(self._message)
            self._message = None
            self.uuid = str(record.uuid)
        elif await app.get(self.uuid) is None:
            raise TaskNotFound(self.uuid)
        if self.timeout is not None:
            self._deadline = time.monotonic() + self.timeout
        self._started = True
        return self

    def __aiter__(self) -> TaskStream:
        return self

    async def __anext__(self) -> Any:
        if not self._started:
            await self.start()
        while not self._buffer:
            if self.record is not None:
                self._end(self.record)
            deadline = self._deadline
            wait = STREAM_WAIT_CHUNK_SECONDS
            if deadline is not None:
                # Past the deadline one read still runs, without waiting: what is already
                # stored is never reported as a timeout.
                wait = min(max(deadline - time.monotonic(), 0.0), wait)
            page = await self.app.storage.steps(self.uuid, self._after, wait)
            self._buffer.extend(page.values)
            self._after = page.after
            if page.final is not None:
                self.record = page.final
            elif not page.values and deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(self.uuid, self.timeout or 0.0)
        return self._buffer.popleft()

    def _end(self, record: Task) -> None:
        """Raise what ends the iteration: TaskFailed once for a failed task, then stop."""
        if self._ended or record.status is TaskStatusEnum.SUCCESS:
            self._ended = True
            raise StopAsyncIteration
        self._ended = True
        raise TaskFailed(record)

    def __repr__(self) -> str:
        state = "new" if not self._started else "ended" if self.record else "following"
        return f"<TaskStream {self.uuid} {state}>"
