"""`TaskExecutor`: runs ONE task, from its arguments to an `Outcome`.

Subclass it to change how tasks run, and pass it as `@app.task(executor=...)` or
`QueueTasks(executor=...)`. Override `execute()` (returns the task's result) or one of
its steps and call `super()`:

    prepare_args()        bind and check the arguments; validate annotated models; inject
                          the context (echo tasks), Depends and State
    run_middlewares_before() / run_middlewares_after(result)
    call()                call the function: sync in the thread pool, async on the loop,
                          generators step by step through `handle_yield`
    handle_yield(value)   what a generator's yield becomes (the generate_handler's result)
    publish_step(value)   hand that result to producers streaming the task (task.stream())

`execute()` also fires the task_executor_* triggers (see qtasks.plugins.triggers).
`run()` is the worker's entry point: it applies `max_time`, captures the error, makes the
retry decision and closes the task-scope dependencies. It never raises except for
cancellation.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import functools
import inspect
import time
import traceback
from collections.abc import AsyncGenerator, Generator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from qtasks.context import SyncTaskContext, TaskContext, current_context
from qtasks.errors import (
    Cancel,
    EncodeError,
    PluginError,
    Retry,
    TaskPluginTriggerError,
    TaskTimeout,
)
from qtasks.logs import current_task
from qtasks.plugins.depends import DependencyScope, Scope, build_call
from qtasks.plugins.triggers import (
    TASK_EXECUTOR_ARGS_REPLACE,
    TASK_EXECUTOR_DECODE,
    TASK_EXECUTOR_RUN_TASK,
    TASK_EXECUTOR_RUN_TASK_GEN,
    TASK_EXECUTOR_RUN_TASK_TRIGGER_ERROR,
    TASK_EXECUTOR_TASK_CLOSE,
)
from qtasks.plugins.validation import ValidationFailed
from qtasks.retry import Backoff, backoff_delay, should_retry
from qtasks.runtime.threads import TaskThreadPool
from qtasks.serializers import to_builtins
from qtasks.storages.steps import StepWriter
from qtasks.task import FunctionKind, TaskDefinition

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.message import TaskMessage
    from qtasks.runtime.worker import Worker


class ArgumentsMismatch(TypeError):  # noqa: N818 - reads as the reason recorded on the task
    """The message's arguments do not fit the task's signature; never retried."""


class OutcomeKind(enum.Enum):
    """How one attempt ended."""

    SUCCESS = "success"
    ERROR = "error"
    RETRY = "retry"
    CANCEL = "cancel"


@dataclasses.dataclass(slots=True)
class Outcome:
    """The end of one attempt: a result, or an error and what to do about it."""

    kind: OutcomeKind
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    retry_delay: float = 0.0


_STOP_ITERATION = object()

NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ArgumentsMismatch,
    EncodeError,
    ValidationFailed,
    PluginError,
)
"""Failures the same message would hit again: recorded as `error` at once."""


class TaskExecutor:
    """Runs one task; replace per task with `@app.task(executor=...)`."""

    worker: Worker | None = None
    """The worker running this task (None when run directly, e.g. in tests)."""
    error: BaseException | None = None
    """What ended the attempt, if it did not succeed."""
    _task_scope: DependencyScope | None = None
    _context: TaskContext | None = None
    _steps: StepWriter | None = None

    def __init__(
        self,
        task: TaskDefinition,
        message: TaskMessage,
        app: AsyncQueueTasks,
        thread_pool: TaskThreadPool | Executor | None = None,
    ) -> None:
        self.task = task
        self.message = message
        self.app = app
        self.thread_pool = thread_pool
        self.args: list[Any] = message.args
        self.kwargs: dict[str, Any] = message.kwargs
        self.plugins = app.plugins_for(task) if task.plugins else app.plugins
        """The plugins this task's triggers fire on (the app's, then the task's own)."""

    @property
    def context(self) -> TaskContext:
        """The task's context (created on first use: most tasks never need it)."""
        if self._context is None:
            # Sync functions run in a thread, where a coroutine-returning add_task would
            # be useless: they get a context whose add_task blocks instead.
            cls = TaskContext if self.task.kind.on_loop else SyncTaskContext
            self._context = cls(self.app, self.message, self.task.metadata, worker=self.worker)
        return self._context

    def dependency_scope(self, scope: Scope) -> DependencyScope:
        """Where values of `scope` live: this attempt, the worker, or the app."""
        if scope is Scope.TASK:
            if self._task_scope is None:
                self._task_scope = DependencyScope(
                    Scope.TASK, owner=f"task {self.task.name} {self.message.uuid}"
                )
            return self._task_scope
        if scope is Scope.WORKER and self.worker is not None:
            return self.worker.dependency_scope
        return self.app.dependency_scopes[scope]

    # -- steps a subclass may override -------------------------------------------------

    async def prepare_args(self) -> None:
        """Check the arguments against the signature, validate annotated models, and put
        in the context (echo tasks), Depends and State values."""
        try:
            self.task.bind(self.args, self.kwargs)
        except TypeError as exc:
            raise ArgumentsMismatch(
                f"arguments do not fit {self.task.name}{self.task.signature}: {exc}"
            ) from None
        plan = self.task.call_plan
        if plan is not None:
            self.args, self.kwargs = await build_call(plan, self, self.args, self.kwargs)
        elif self.task.echo:
            self.args = [self.context, *self.args]

    async def run_middlewares_before(self) -> None:
        """App-wide then per-task `before` hooks; they may change args and kwargs."""
        for mw in self.app.middlewares:
            await mw.before(self)
        for mw in self.task.middlewares_before:
            await mw.before(self)

    async def run_middlewares_after(self, result: Any) -> Any:
        """Per-task then app-wide `after` hooks (reverse order); each may replace the result."""
        for mw in self.task.middlewares_after:
            result = await mw.after(self, result)
        for mw in reversed(self.app.middlewares):
            result = await mw.after(self, result)
        return result

    async def call(self) -> Any:
        """Call the task function the way its kind needs."""
        kind = self.task.kind
        if kind is FunctionKind.ASYNC:
            return await self.task.func(*self.args, **self.kwargs)
        if kind is FunctionKind.SYNC:
            return await self.run_sync(self.task.func, *self.args, **self.kwargs)
        if kind is FunctionKind.GENERATOR:
            return await self.run_generator(self.task.func(*self.args, **self.kwargs))
        return await self.run_async_generator(self.task.func(*self.args, **self.kwargs))

    async def run_sync(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking callable in the worker's thread pool, with this context copied."""
        call = functools.partial(func, *args, **kwargs) if kwargs else func
        call_args = () if kwargs else args
        pool = self.thread_pool
        if isinstance(pool, TaskThreadPool):
            return await pool.run(call, *call_args)
        # Outside a worker (an executor used on its own): any concurrent.futures pool.
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(pool, ctx.run, call, *call_args)

    async def handle_yield(self, value: Any) -> Any:
        """The generate_handler's result for one yielded value (the value itself if none)."""
        handler = self.task.generate_handler
        if handler is None:
            return value
        result = handler(value)
        if inspect.isawaitable(result):
            result = await result
        return result

    def publish_step(self, value: Any) -> None:
        """Store one step (a handle_yield result) for producers streaming this task.

        Returns at once: a background writer stores steps in order, batching those that
        come while it writes. The generator paths wait for it (`_close_steps`) before the
        attempt ends, so the final record is never stored before the last step.
        """
        if self._steps is None:
            self._steps = StepWriter(self.app.storage, str(self.message.uuid), self.task.name)
        self._steps.add(value)

    async def _close_steps(self) -> None:
        if self._steps is not None:
            # Shielded: even when the attempt is cancelled, the steps already handed over
            # are written (a retry's readers then see them before the next attempt's).
            await asyncio.shield(self._steps.close())

    async def run_generator(self, gen: Generator[Any, Any, Any]) -> Any:
        """Drive a sync generator in the thread pool; yields go through handle_yield.

        Each generate_handler result is sent back into the generator (without a handler
        it is iterated plainly: `yield` gives None, so `yield from iterator` works) and
        published as a step (`publish_step`). The task's result is the generator's
        `return` value when it is not None, else the list of handle_yield results.
        """
        results: list[Any] = []
        send_value: Any = None

        def step(value: Any) -> Any:
            try:
                return gen.send(value)
            except StopIteration as stop:
                return (_STOP_ITERATION, stop.value)

        try:
            while True:
                yielded = await self.run_sync(step, send_value)
                if isinstance(yielded, tuple) and yielded and yielded[0] is _STOP_ITERATION:
                    returned = yielded[1]
                    return results if returned is None else returned
                results.append(await self.handle_yield(yielded))
                self.publish_step(results[-1])
                send_value = self._sent_back(results[-1])
        finally:
            try:
                # Still stepping in a thread after a cancel: it cannot be closed from here.
                if inspect.getgeneratorstate(gen) != inspect.GEN_RUNNING:
                    gen.close()
            finally:
                await self._close_steps()

    async def run_async_generator(self, agen: AsyncGenerator[Any, Any]) -> Any:
        """Drive an async generator; each handler result is a step, the result their list.

        (An async generator cannot `return` a value; that is Python's rule.)
        """
        results: list[Any] = []
        send_value: Any = None
        try:
            while True:
                try:
                    yielded = await agen.asend(send_value)
                except StopAsyncIteration:
                    return results
                results.append(await self.handle_yield(yielded))
                self.publish_step(results[-1])
                send_value = self._sent_back(results[-1])
        finally:
            try:
                await agen.aclose()
            finally:
                await self._close_steps()

    def _sent_back(self, handled: Any) -> Any:
        return handled if self.task.generate_handler is not None else None

    async def execute(self) -> Any:
        """Prepare, call and post-process the task; returns its result (storable data)."""
        await self.prepare_args()
        plugins = self.plugins
        if plugins and TASK_EXECUTOR_ARGS_REPLACE in plugins:
            changes = await plugins.fire(
                TASK_EXECUTOR_ARGS_REPLACE,
                task_executor=self,
                task=self.message,
                args=self.args,
                kwargs=self.kwargs,
            )
            self.args = changes.get("args", self.args)
            self.kwargs = changes.get("kwargs", self.kwargs)
        if self.app.middlewares or self.task.middlewares_before:
            await self.run_middlewares_before()
        try:
            result = await self.call()
        except TaskPluginTriggerError as exc:
            result = await self.handle_plugin_error(exc)
        else:
            if plugins:
                trigger = (
                    TASK_EXECUTOR_RUN_TASK
                    if self.task.kind in (FunctionKind.SYNC, FunctionKind.ASYNC)
                    else TASK_EXECUTOR_RUN_TASK_GEN
                )
                if trigger in plugins:
                    changes = await plugins.fire(
                        trigger, task_executor=self, task=self.message, result=result
                    )
                    result = changes.get("result", result)
        if self.app.middlewares or self.task.middlewares_after:
            result = await self.run_middlewares_after(result)
        if self.task.decode is not None:
            result = self.task.decode(result)
        if plugins and TASK_EXECUTOR_DECODE in plugins:
            changes = await plugins.fire(
                TASK_EXECUTOR_DECODE, task_executor=self, task=self.message, result=result
            )
            result = changes.get("result", result)
        return to_builtins(result)

    async def handle_plugin_error(self, exc: TaskPluginTriggerError) -> Any:
        """The result a plugin gave for `ctx.plugin_error(...)`; re-raises if none did."""
        plugins = self.plugins
        if plugins and TASK_EXECUTOR_RUN_TASK_TRIGGER_ERROR in plugins:
            changes = await plugins.fire(
                TASK_EXECUTOR_RUN_TASK_TRIGGER_ERROR,
                task_executor=self,
                task=self.message,
                error=exc,
                result=None,
            )
            if "result" in changes:
                return changes["result"]
        raise exc

    # -- the worker's entry point ------------------------------------------------------

    async def run(self) -> Outcome:
        """Execute under max_time and turn the ending into an Outcome (never raises).

        Task-scope dependencies are closed before it returns, also when the task failed
        or this run is cancelled (the error is passed to their teardown).
        """
        token = current_context.set(self.context) if self.task.echo else None
        # Log lines of the whole attempt, teardown included, carry the task (qtasks.logs).
        task_token = current_task.set(self)
        try:
            try:
                max_time = self.task.max_time
                if max_time is None:
                    result = await self.execute()
                else:
                    try:
                        result = await asyncio.wait_for(self.execute(), max_time)
                    except asyncio.TimeoutError:
                        # For sync tasks the thread keeps running until the function
                        # returns; only the slot and the record are freed (Python cannot
                        # kill a thread).
                        raise TaskTimeout(self.task.name, max_time) from None
                outcome = Outcome(OutcomeKind.SUCCESS, result=result)
            except Cancel as exc:
                self.error = exc
                outcome = Outcome(OutcomeKind.CANCEL, error_type="Cancel", error_message=exc.reason)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
                # sys.exit() or KeyboardInterrupt raised by task code must not end the
                # worker: the worker's own stop comes through signals, never through these.
                self.error = exc
                outcome = self.failure(exc)
        except BaseException as exc:  # cancelled (worker shutdown): still close the scope
            if self._task_scope is not None:
                await asyncio.shield(self._task_scope.close(exc))
            current_task.reset(task_token)
            raise
        finally:
            if token is not None:
                current_context.reset(token)
        # Written inline, not as a nested coroutine: this is every task's path.
        if self._task_scope is not None:
            await self._task_scope.close(self.error)
        plugins = self.plugins
        if plugins and TASK_EXECUTOR_TASK_CLOSE in plugins:
            await plugins.fire(
                TASK_EXECUTOR_TASK_CLOSE, task_executor=self, task=self.message, outcome=outcome
            )
        current_task.reset(task_token)
        return outcome

    def failure(self, exc: BaseException) -> Outcome:
        """Retry or error, by the task's retry settings; NEVER_RETRIED errors never retry."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        kind = OutcomeKind.ERROR
        delay = 0.0
        retriable = not isinstance(exc, NEVER_RETRIED)
        if retriable and should_retry(
            exc,
            attempt=self.message.attempt,
            retries=self.task.retry,
            retry_on_exc=self.task.retry_on_exc,
        ):
            kind = OutcomeKind.RETRY
            if isinstance(exc, Retry) and exc.delay is not None:
                delay = exc.delay
            else:
                policy = self.task.retry_backoff
                if policy is None:
                    policy = Backoff(base_seconds=self.app.config.default_retry_backoff_seconds)
                delay = backoff_delay(policy, self.message.attempt + 1)
        return Outcome(
            kind,
            error_type=type(exc).__name__,
            error_message=str(exc),
            traceback=tb,
            retry_delay=delay,
        )


AsyncTaskExecutor = TaskExecutor
"""The name QTasks users know; qtasks has one executor for sync and async tasks."""


def now() -> float:
    """Wall-clock seconds, the time base of records and etas."""
    return time.time()
