"""Task middlewares: code that runs around every call of a task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qtasks.runtime.executor import TaskExecutor


class TaskMiddleware:
    """Hooks around one task's call; subclass and override what you need.

    In `middlewares_before`, `before` runs after the arguments are prepared and may change
    `executor.args` / `executor.kwargs`. In `middlewares_after`, `after` receives the
    result and returns the one to keep. App-wide middlewares (`app.add_middleware`) run
    both hooks, before the task's own ones and after them, in reverse order.
    """

    async def before(self, executor: TaskExecutor) -> None:
        """Runs before the task function is called."""

    async def after(self, executor: TaskExecutor, result: Any) -> Any:
        """Runs after the task function returned; returns the result to keep."""
        return result


def as_middleware(item: TaskMiddleware | type[TaskMiddleware]) -> TaskMiddleware:
    """An instance from an instance or a class with a no-argument constructor."""
    if isinstance(item, type):
        if not issubclass(item, TaskMiddleware):
            raise TypeError(f"{item!r} is not a TaskMiddleware subclass")
        return item()
    if not isinstance(item, TaskMiddleware):
        raise TypeError(f"{item!r} is not a TaskMiddleware")
    return item
