"""What a running task can see of itself: `TaskContext`, passed first to `echo=True` tasks."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any

from qtasks.errors import Cancel, TaskPluginTriggerError

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.message import Task, TaskMessage
    from qtasks.runtime.worker import Worker

current_context: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("qtasks_task_context")


class TaskLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that puts the task's name and uuid on every line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[{extra.get('task_name')} {extra.get('task_uuid')}] {msg}", kwargs


class TaskContext:
    """The running task's identity, logger and handles back into the app.

    Passed first to `echo=True` tasks; dependencies get it by annotating a parameter with
    `TaskContext`; `qtasks.context.current_context` holds it while an echo task runs.
    """

    def __init__(
        self,
        app: AsyncQueueTasks,
        message: TaskMessage,
        metadata: dict[str, Any],
        *,
        worker: Worker | None = None,
    ):
        self.loop = asyncio.get_running_loop()
        self.app = app
        self.message = message
        self.metadata = metadata
        """The task's metadata: the extra keywords of `@app.task` (plus `tags`)."""
        self.worker = worker
        """The worker running the task (None when an executor runs it directly)."""
        self.logger = TaskLogger(
            logging.getLogger(f"qtasks.task.{message.name}"),
            {"task_name": message.name, "task_uuid": str(message.uuid)},
        )

    @property
    def uuid(self) -> str:
        """This task's id."""
        return str(self.message.uuid)

    @property
    def name(self) -> str:
        """The registered task name."""
        return self.message.name

    @property
    def attempt(self) -> int:
        """0 on the first run, n on the n-th retry."""
        return self.message.attempt

    @property
    def priority(self) -> int:
        """The message's priority (lower runs first)."""
        return self.message.priority

    @property
    def queue(self) -> str:
        """The queue the message came from."""
        return self.message.queue

    @property
    def headers(self) -> dict[str, str]:
        """The message's headers (tracing ids and the like)."""
        return self.message.headers

    @property
    def broker(self) -> Any:
        """The app's broker."""
        return self.app.broker

    @property
    def storage(self) -> Any:
        """The app's storage."""
        return self.app.storage

    @property
    def global_config(self) -> Any:
        """The app's global config."""
        return self.app.global_config

    def get_component(self, name: str) -> Any:
        """One of the app's parts by name ("broker", "storage", "global_config", "worker",
        "starter", ...), or None."""
        if name == "worker":
            return self.worker
        return getattr(self.app, name, None)

    async def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Task | None:
        """Enqueue a subtask (same options as `app.add_task`)."""
        return await self.app.add_task(task_name, *args, **kwargs)

    async def get_task(self, uuid: Any) -> Task | None:
        """Another task's record (`app.get`)."""
        return await self.app.get(uuid)

    def cancel(self, reason: str = "") -> None:
        """End this task now with status `cancel`."""
        raise Cancel(reason)

    def plugin_error(self, message: str = "", **kwargs: Any) -> None:
        """Hand this task to the plugins listening to `task_executor_run_task_trigger_error`.

        Raises TaskPluginTriggerError(message, **kwargs): a plugin that returns
        `{"result": value}` makes the task succeed with it; otherwise the task fails.
        """
        raise TaskPluginTriggerError(message, **kwargs)

    async def sleep(self, seconds: float) -> None:
        """Sleep without blocking the worker (async tasks)."""
        await asyncio.sleep(seconds)


class SyncTaskContext(TaskContext):
    """The context of a sync or generator task, which runs in a worker thread.

    Its `add_task` and `sleep` block the thread instead of returning coroutines; the
    enqueue itself runs on the worker's loop, so there is still one producer code path.
    """

    def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Task | None:  # type: ignore[override]
        """Enqueue a subtask from the task's thread and return its record."""
        coro = self.app.add_task(task_name, *args, **kwargs)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def get_task(self, uuid: Any) -> Task | None:  # type: ignore[override]
        """Another task's record, read from the task's thread."""
        return asyncio.run_coroutine_threadsafe(self.app.get(uuid), self.loop).result()

    def sleep(self, seconds: float) -> None:  # type: ignore[override]
        """Sleep in the task's thread."""
        time.sleep(seconds)
