"""qtasks: a task queue for Python. Every part is replaceable; the default needs no server.

from qtasks import QueueTasks
app = QueueTasks()

@app.task
def add(x: int, y: int) -> int:
    return x + y

add.add_task(1, 2, timeout=10).returning  # 3, once a worker runs: qtasks -A module:app run
"""

from qtasks.app import AsyncQueueTasks
from qtasks.config import QueueConfig
from qtasks.context import TaskContext
from qtasks.errors import (
    BrokerError,
    Cancel,
    ConfigurationError,
    DecodeError,
    EncodeError,
    QTasksError,
    Retry,
    StorageError,
    TaskAlreadyRegistered,
    TaskTimeout,
    UnknownTask,
    WaitTimeout,
)
from qtasks.message import Task, TaskMessage, TaskStatusEnum
from qtasks.middlewares import TaskMiddleware
from qtasks.retry import Backoff
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
    "DecodeError",
    "EncodeError",
    "QTasksError",
    "QueueConfig",
    "QueueTasks",
    "Retry",
    "StorageError",
    "SyncTask",
    "Task",
    "TaskAlreadyRegistered",
    "TaskContext",
    "TaskExecutor",
    "TaskMessage",
    "TaskMiddleware",
    "TaskStatusEnum",
    "TaskTimeout",
    "UnknownTask",
    "WaitTimeout",
]
