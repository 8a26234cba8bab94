"""`BasePlugin` and the registry that fires triggers at plugins.

A plugin is an object with `start()`, `stop()` and `trigger(name, **payload)`, each sync or
async. The registry is a dict from trigger name to the plugins listening, so the core's
`if NAME in plugins:` is the whole cost of a trigger nobody listens to. See
`qtasks.plugins.triggers` for every trigger, its payload and what it may replace.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from qtasks.errors import ConfigurationError, PluginError
from qtasks.plugins.triggers import COMPONENTS, PER_TASK_COMPONENTS, TRIGGERS, OnError, spec

log = logging.getLogger(__name__)


class BasePlugin:
    """Subclass it: override `trigger` (or fill `handlers`), and `start`/`stop` if needed.

    Every method may be sync or async. `trigger` returns None to change nothing, or a
    mapping of replacements (see each trigger's `replaces`). Class attribute `triggers`
    (or the keys of `handlers`) names the triggers listened to when `add_plugin` gets no
    `trigger_names`.
    """

    triggers: ClassVar[tuple[str, ...]] = ()
    """Triggers to listen to by default."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.handlers: dict[str, Callable[..., Any]] = {}
        """Trigger name -> function called with the payload (the QTasks style)."""

    def start(self) -> Any:
        """Called when the plugin's owner (the app, or the worker) starts."""
        return None

    def stop(self) -> Any:
        """Called when the owner stops; the plugin may be started again later."""
        return None

    def trigger(self, name: str, **kwargs: Any) -> Any:
        """Handle one trigger; by default calls `handlers[name](**kwargs)` if present."""
        handler = getattr(self, "handlers", {}).get(name)
        return None if handler is None else handler(**kwargs)

    def default_triggers(self) -> tuple[str, ...]:
        """`triggers`, else the keys of `handlers`."""
        return tuple(self.triggers) or tuple(getattr(self, "handlers", {}))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {plugin_name(self)!r}>"


def plugin_name(plugin: object) -> str:
    """The name errors and logs use for a plugin."""
    name = getattr(plugin, "name", None)
    return name if isinstance(name, str) and name else type(plugin).__name__


@dataclasses.dataclass(frozen=True)
class PluginEntry:
    """One `add_plugin` call: the plugin, its triggers, and who starts and stops it."""

    plugin: BasePlugin
    trigger_names: tuple[str, ...]
    owner: str
    """'app' (started with the app) or 'worker' (started with the worker)."""


def entry_for(
    plugin: BasePlugin,
    trigger_names: Iterable[str] | str | None = None,
    component: str | None = None,
    *,
    per_task: bool = False,
) -> PluginEntry:
    """Check one plugin registration and describe it; ConfigurationError says what is wrong."""
    if not isinstance(plugin, BasePlugin):
        raise ConfigurationError(
            f"{plugin!r} is not a plugin: subclass qtasks.plugins.base.BasePlugin"
        )
    if isinstance(trigger_names, str):
        trigger_names = (trigger_names,)
    names = tuple(trigger_names) if trigger_names is not None else plugin.default_triggers()
    who = plugin_name(plugin)
    if not names:
        raise ConfigurationError(
            f"plugin {who!r} listens to no trigger: pass trigger_names=[...] or set its "
            f"`triggers` (or `handlers`)"
        )
    if component is not None and component not in COMPONENTS:
        raise ConfigurationError(
            f"unknown component {component!r}; one of: {', '.join(COMPONENTS)}"
        )
    for name in names:
        try:
            declared = spec(name)
        except ValueError as exc:
            raise ConfigurationError(f"plugin {who!r}: {exc}") from None
        if (
            component is not None
            and declared.component != component
            and not (component == "worker" and declared.component == "task_executor")
        ):
            raise ConfigurationError(
                f"plugin {who!r}: trigger {name!r} is fired by {declared.component}, "
                f"not by {component}"
            )
        if per_task and not declared.per_task:
            per_task_names = ", ".join(n for n, s in TRIGGERS.items() if s.per_task)
            raise ConfigurationError(
                f"plugin {who!r}: {name!r} does not fire while one task runs, so a task's "
                f"own plugin cannot use it; use app.add_plugin, or one of: {per_task_names}"
            )
    owner = "worker" if per_task or (component or "") in PER_TASK_COMPONENTS else "app"
    return PluginEntry(plugin, names, owner)


def task_plugin_entries(items: Sequence[Any]) -> tuple[PluginEntry, ...]:
    """Entries for `@app.task(plugins=[plugin, (plugin, ["trigger", ...]), ...])`."""
    entries = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            entries.append(entry_for(item[0], item[1], per_task=True))
        else:
            entries.append(entry_for(item, per_task=True))
    return tuple(entries)


class PluginRegistry(dict[str, tuple[BasePlugin, ...]]):
    """Trigger name -> listening plugins, in order; `fire` runs them and chains replacements."""

    def __init__(self, entries: Iterable[PluginEntry] = ()) -> None:
        super().__init__()
        self.entries: list[PluginEntry] = []
        self.version = 0
        """Bumped on every add, so merged per-task registries know when to rebuild."""
        for entry in entries:
            self.add(entry)

    def add(self, entry: PluginEntry) -> None:
        """Make the plugin listen to its triggers, after those already listening."""
        self.entries.append(entry)
        for name in entry.trigger_names:
            current = self.get(name, ())
            if entry.plugin not in current:
                self[name] = (*current, entry.plugin)
        self.version += 1

    def with_entries(self, entries: Sequence[PluginEntry]) -> PluginRegistry:
        """A new registry: these plugins, then the given ones."""
        return PluginRegistry([*self.entries, *entries])

    def owned_by(self, owner: str) -> list[BasePlugin]:
        """Each distinct plugin that `owner` ('app' or 'worker') starts, in order."""
        out: list[BasePlugin] = []
        for entry in self.entries:
            if entry.owner == owner and not any(p is entry.plugin for p in out):
                out.append(entry.plugin)
        return out

    async def fire(self, name: str, /, **payload: Any) -> dict[str, Any]:
        """Run the listeners of `name`; the replacements they made (empty if none).

        Each plugin sees the payload as the previous ones left it. A plugin's exception,
        or a return value of the wrong shape, becomes PluginError naming the plugin;
        for triggers whose `on_error` is LOG it is logged and the next plugin runs.
        """
        listeners = self.get(name)
        if not listeners:
            return {}
        declared = TRIGGERS[name]
        changes: dict[str, Any] = {}
        for plugin in listeners:
            try:
                result = plugin.trigger(name, **payload)
                if inspect.isawaitable(result):
                    result = await result
                if result is None:
                    continue
                replaced = declared.check_return(result)
            except Exception as exc:
                error = PluginError(plugin_name(plugin), name, f"{type(exc).__name__}: {exc}")
                if declared.on_error is OnError.LOG:
                    log.error("%s", error, exc_info=exc)
                    continue
                raise error from exc
            payload.update(replaced)
            changes.update(replaced)
        return changes


async def start_plugins(plugins: Sequence[BasePlugin]) -> None:
    """Start plugins in order; if one fails, stop those started and raise PluginError."""
    started: list[BasePlugin] = []
    for plugin in plugins:
        try:
            await _maybe_await(plugin.start())
        except Exception as exc:
            await stop_plugins(started)
            raise PluginError(plugin_name(plugin), "start", f"{type(exc).__name__}: {exc}") from exc
        started.append(plugin)


async def stop_plugins(plugins: Sequence[BasePlugin]) -> None:
    """Stop plugins in reverse order; each failure is logged and the others still stop."""
    for plugin in reversed(plugins):
        try:
            await _maybe_await(plugin.stop())
        except Exception:
            log.exception("stopping plugin %r failed", plugin_name(plugin))


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
