"""The async app under the name QTasks users import: `from qtasks.asyncio import QueueTasks`."""

from qtasks.app import AsyncQueueTasks as QueueTasks
from qtasks.task import AsyncTask

__all__ = ["AsyncTask", "QueueTasks"]
