"""qtasks: a task queue for Python. Every part is replaceable; the default needs no server.

from qtasks import QueueTasks
app = QueueTasks()

@app.task
def add(x: int, y: int) -> int:
    return x + y

add.add_task(1, 2, timeout=10).returning  # 3, once a worker runs: qtasks -A module:app run
"""

from qtasks.app import AsyncQueueTasks, TaskCall
from qtasks.config import QueueConfig
from qtasks.context import TaskContext
from qtasks.errors import (
    BrokerError,
    Cancel,
    ConfigurationError,
    DecodeError,
    EncodeError,
    PayloadTooLarge,
    PluginError,
    QTasksError,
    Retry,
    StateLockTimeout,
    StateNotSupported,
    StorageError,
    TaskAlreadyRegistered,
    TaskFailed,
    TaskInterrupted,
    TaskNotFound,
    TaskPluginTriggerError,
    TaskTimeout,
    UnknownTask,
    WaitTimeout,
    WorkerLost,
)
from qtasks.message import DeadLetter, DeadLetterReason, Task, TaskMessage, TaskStatusEnum
from qtasks.middlewares import TaskMiddleware
from qtasks.plugins.depends import Depends
from qtasks.retry import Backoff
from qtasks.router import Router, RouterTask
from qtasks.runtime.executor import TaskExecutor
from qtasks.sync import QueueTasks, SyncTask
from qtasks.task import ADD_TASK_OPTIONS, AsyncTask

__all__ = [
    "ADD_TASK_OPTIONS",
    "AsyncQueueTasks",
    "AsyncTask",
    "Backoff",
    "BrokerError",
    "Cancel",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterReason",
    "DecodeError",
    "Depends",
    "EncodeError",
    "PayloadTooLarge",
    "PluginError",
    "QTasksError",
    "QueueConfig",
    "QueueTasks",
    "Retry",
    "Router",
    "RouterTask",
    "StateLockTimeout",
    "StateNotSupported",
    "StorageError",
    "SyncTask",
    "Task",
    "TaskAlreadyRegistered",
    "TaskCall",
    "TaskContext",
    "TaskExecutor",
    "TaskFailed",
    "TaskInterrupted",
    "TaskMessage",
    "TaskMiddleware",
    "TaskNotFound",
    "TaskPluginTriggerError",
    "TaskStatusEnum",
    "TaskTimeout",
    "UnknownTask",
    "WaitTimeout",
    "WorkerLost",
]
