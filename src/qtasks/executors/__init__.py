"""The task executor users subclass: `from qtasks.executors import TaskExecutor`."""

from qtasks.runtime.executor import (
    ArgumentsMismatch,
    AsyncTaskExecutor,
    Outcome,
    OutcomeKind,
    TaskExecutor,
)

__all__ = ["ArgumentsMismatch", "AsyncTaskExecutor", "Outcome", "OutcomeKind", "TaskExecutor"]
