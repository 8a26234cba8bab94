"""Find the app that `-A module:attribute` names: one function, one error type."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from qtasks.errors import ConfigurationError

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

DEFAULT_ATTRIBUTE = "app"
"""The attribute looked up when the path names only a module."""

# module[:attribute[()]], each side dotted; parts are checked with str.isidentifier().
_PATH = re.compile(r"(?P<module>[\w.]+)(?::(?P<attribute>[\w.]+)(?P<call>\(\))?)?")
_APP_KINDS = "QueueTasks or AsyncQueueTasks"
_MAX_SUGGESTIONS = 3


class AppLoadError(ConfigurationError):
    """The app named on the command line could not be loaded; the message is one line."""


class ServableApp(Protocol):
    """What the command line needs from an app: its async core."""

    @property
    def name(self) -> str:
        """The app name."""

    @property
    def config(self) -> QueueConfig:
        """The app's settings."""

    async def serve(
        self, *, concurrency: int | None = None, queues: Sequence[str] | None = None
    ) -> None:
        """Run a worker in this process until SIGTERM/SIGINT, then drain."""


def load_app(path: str) -> ServableApp:
    """The async core of the app at `module:attribute`; raise AppLoadError if there is none.

    The attribute may be dotted (`proj.worker:apps.main`); `module:factory()` calls a
    zero-argument factory; a bare `module` means `module:app`. Any other exception raised
    by the module's or the factory's own code propagates with its traceback.
    """
    match = _PATH.fullmatch(path.strip())
    if match is None or not all(map(_is_dotted_name, match.group("module", "attribute"))):
        hint = " (a module name, not a file)" if _looks_like_file(path) else ""
        raise AppLoadError(f"expected module:attribute{hint}, got {path!r}")
    module_name = match["module"]
    attribute = match["attribute"] or DEFAULT_ATTRIBUTE

    module = _import(module_name)
    obj = _resolve(module, module_name, attribute, named=match["attribute"] is not None)
    shown = f"{module_name}:{attribute}"
    if match["call"]:
        if not callable(obj):
            raise AppLoadError(f"{shown!r} is {_kind(obj)}, not a factory to call")
        obj = obj()
        shown += "()"
        what = "returned"
    else:
        what = "is"
    core = _as_core(obj)
    if core is None:
        raise AppLoadError(f"{shown!r} {what} {_kind(obj)}, not a qtasks app ({_APP_KINDS})")
    return core


def _is_dotted_name(text: str | None) -> bool:
    return text is None or all(part.isidentifier() for part in text.split("."))


def _looks_like_file(path: str) -> bool:
    module = path.partition(":")[0]
    return "/" in module or "\\" in module or module.endswith(".py")


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Missing itself (or a parent package) vs. present but importing something missing:
        # the second is the user's environment, and they need to see the inner name.
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise AppLoadError(
                f"module {module_name!r} not found; run qtasks from the directory that "
                f"contains it, or install it"
            ) from None
        raise AppLoadError(f"importing {module_name!r} failed: {_one_line(exc)}") from exc
    except ImportError as exc:
        raise AppLoadError(f"importing {module_name!r} failed: {_one_line(exc)}") from exc


def _resolve(module: ModuleType, module_name: str, attribute: str, *, named: bool) -> object:
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            message = f"module {module_name!r} has no attribute {attribute!r}"
            if not named:
                message += f"; name the app: -A {module_name}:<attribute>"
            apps = _apps_in(module)
            if apps:
                message += f" (qtasks apps in it: {', '.join(apps)})"
            raise AppLoadError(message) from None
    return obj


def _apps_in(module: ModuleType) -> list[str]:
    """A few public names in the module that are qtasks apps, to suggest one."""
    names = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and _as_core(value) is not None
    ]
    return sorted(names)[:_MAX_SUGGESTIONS]


def _as_core(obj: object) -> ServableApp | None:
    """The async core behind a qtasks app (sync facade or core, or a subclass), else None."""
    # Imported here so that `qtasks --help` does not pay for importing the whole app.
    from qtasks.app import AsyncQueueTasks
    from qtasks.sync import QueueTasks

    if isinstance(obj, QueueTasks):
        # Producer calls made at import time started the components on the facade's
        # portal loop; hand them back so the worker's own loop starts them afresh.
        obj.close()
        return obj.core
    if isinstance(obj, AsyncQueueTasks):
        return obj
    return None


def _kind(obj: object) -> str:
    """`a module`, `the class QueueConfig`, `an object of type int`: what the user named."""
    if isinstance(obj, ModuleType):
        return "a module"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    return f"an object of type {type(obj).__qualname__}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
