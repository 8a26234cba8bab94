"""`Router`: tasks declared apart from any app, registered later with `include_router`.

Big projects declare tasks next to the code they belong to without importing the app
(which would be a circular import):

    # emails/tasks.py
    router = Router(queue="emails", plugins=[AuditPlugin()])

    @router.task(retry=3)
    def send(to: str) -> None: ...

    # app.py
    app.include_router(router)
    send.add_task("a@example.org")

The router's options are defaults for its tasks (a task's own options win); the router's
plugins run before a task's own plugins. A router task can be called locally at any time;
`add_task` works once its router is included in an app.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from qtasks.errors import ConfigurationError
from qtasks.task import caller_locals

if TYPE_CHECKING:
    from qtasks.plugins.base import BasePlugin

P = ParamSpec("P")
R = TypeVar("R")

PluginItem = Any
"""A plugin, or `(plugin, ["trigger", ...])`, as `@app.task(plugins=[...])` takes them."""


class RouterTask(Generic[P, R]):
    """A task declared on a router; behaves like the app's handle once included."""

    def __init__(self, func: Callable[P, R], name: str) -> None:
        self.func = func
        self.name = name
        self.__name__ = name
        self.__doc__ = func.__doc__
        self.__wrapped__ = func
        self._handle: Any = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, now, as a plain call (no queue)."""
        return self.func(*args, **kwargs)

    @property
    def bound(self) -> Any:
        """The app's handle (AsyncTask or SyncTask) once the router is included."""
        if self._handle is None:
            raise ConfigurationError(
                f"task {self.name!r} belongs to a Router that is not included in an app yet; "
                f"call app.include_router(router) first"
            )
        return self._handle

    def add_task(self, *args: Any, **kwargs: Any) -> Any:
        """Enqueue through the including app (a coroutine on the async app)."""
        return self.bound.add_task(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        """Enqueue and follow a generator task's steps through the including app."""
        return self.bound.stream(*args, **kwargs)

    @property
    def definition(self) -> Any:
        """The registered TaskDefinition (once included)."""
        return self.bound.definition

    def _bind(self, handle: Any) -> None:
        if self._handle is not None:
            raise ConfigurationError(f"task {self.name!r} is already included in an app")
        self._handle = handle

    def __repr__(self) -> str:
        state = "included" if self._handle is not None else "not included"
        return f"<RouterTask {self.name!r} ({state})>"


@dataclasses.dataclass
class RouterEntry:
    """One declared task: the function, its options and the handle users hold."""

    func: Callable[..., Any]
    options: dict[str, Any]
    localns: dict[str, Any] | None
    handle: RouterTask[Any, Any]


class Router:
    """A group of tasks with shared default options and plugins."""

    def __init__(self, *, plugins: Sequence[PluginItem] = (), **defaults: Any) -> None:
        self.plugins: list[PluginItem] = list(plugins)
        self.defaults = defaults
        self.entries: list[RouterEntry] = []

    def add_plugin(self, plugin: BasePlugin, trigger_names: Sequence[str] | None = None) -> None:
        """Run `plugin` for every task of this router (before each task's own plugins)."""
        self.plugins.append(plugin if trigger_names is None else (plugin, list(trigger_names)))

    @overload
    def task(self, func: Callable[P, R], /) -> RouterTask[P, R]: ...

    @overload
    def task(
        self, func: None = None, /, **options: Any
    ) -> Callable[[Callable[P, R]], RouterTask[P, R]]: ...

    def task(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Declare a task; options as `@app.task` takes them."""
        localns = caller_locals()

        def declare(f: Callable[..., Any]) -> RouterTask[Any, Any]:
            name = options.get("name") or getattr(f, "__name__", None)
            if not name:
                raise ValueError(f"cannot infer a task name for {f!r}; pass name=...")
            if any(e.handle.name == name for e in self.entries):
                raise ConfigurationError(f"the router already has a task named {name!r}")
            handle: RouterTask[Any, Any] = RouterTask(f, name)
            self.entries.append(RouterEntry(f, dict(options), localns, handle))
            return handle

        return declare(func) if func is not None else declare

    def merged_options(self, entry: RouterEntry) -> dict[str, Any]:
        """The router's defaults overlaid by the task's options; router plugins first."""
        options = {**self.defaults, **entry.options}
        plugins = [*self.plugins, *entry.options.get("plugins", ())]
        if plugins:
            options["plugins"] = plugins
        return options
