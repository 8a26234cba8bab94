"""`Depends`: resources injected into tasks, created once per scope and closed with it.

    def get_db():                                  # plain, async, generator, async
        db = connect()                             # generator, (async) context manager
        try:
            yield db
        finally:
            db.close()                             # runs when the scope ends

    @app.task
    def save(data: int, db: Connection = Depends(get_db, scope="worker")): ...
    # or: db: Annotated[Connection, Depends(get_db, scope="worker")]

How it works (FastAPI's model, checked earlier):

* At registration (`build_call_plan`) the task's parameters are read once: `Depends`
  defaults or `Annotated[..., Depends(...)]`, State subclasses, validated models. Each
  dependency becomes a `DependencyNode` whose own parameters may be further `Depends`,
  a State, or the `TaskContext`. Cycles, parameters that cannot be provided, and a
  dependency that outlives one it uses are ConfigurationErrors there and then.
* Per call, each node is resolved at most once per scope: its value is cached in the
  `DependencyScope` of its scope (the task's executor, the worker, or the app for the
  component scopes), and concurrent tasks asking for the same worker-scope dependency
  share one creation.
* Teardown runs when the scope ends, newest first: `task` when the attempt ends (also on
  failure, timeout or cancellation; the task's exception is thrown into generators and
  passed to `__exit__`, which may not swallow it), `worker` at worker stop, `broker`,
  `storage` and `global_config` just before that component stops. A teardown error is
  logged with the dependency's name and never hides the others.
* Sync dependency code runs in a thread (never blocking the loop); async code on the loop.
* `app.dependency_overrides[get_db] = fake_db` swaps a dependency (tests), as in FastAPI.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import functools
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

from qtasks.context import TaskContext
from qtasks.errors import ConfigurationError
from qtasks.plugins.state import SyncState, is_state_class
from qtasks.plugins.validation import Converter, converter_for, validate

if TYPE_CHECKING:
    from qtasks.runtime.executor import TaskExecutor

log = logging.getLogger(__name__)


class Scope(str, enum.Enum):
    """How long a dependency's value lives; each one lives at least as long as the one above."""

    TASK = "task"
    """One attempt of one task."""
    WORKER = "worker"
    """From the first use on a worker until the worker stops."""
    BROKER = "broker"
    """Until the app's broker stops."""
    STORAGE = "storage"
    """Until the app's storage stops (after the broker)."""
    GLOBAL_CONFIG = "global_config"
    """Until the app's global config stops (last)."""

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        """Order of lifetimes: a dependency may only use ones of equal or higher rank."""
        return _RANKS[self]


_RANKS = {scope: i for i, scope in enumerate(Scope)}


def as_scope(value: Scope | str) -> Scope:
    """A Scope from itself or its name; ConfigurationError listing the names otherwise."""
    try:
        return value if isinstance(value, Scope) else Scope(value)
    except ValueError:
        names = ", ".join(s.value for s in Scope)
        raise ConfigurationError(f"unknown dependency scope {value!r}; one of: {names}") from None


@dataclasses.dataclass(frozen=True, init=False)
class Depends:
    """Marks a parameter as injected: `param = Depends(fn, scope="task")`.

    Without `fn`, the annotation itself is called (`db: Annotated[Database, Depends()]`).
    """

    dependency: Callable[..., Any] | None
    scope: Scope

    def __init__(
        self, dependency: Callable[..., Any] | None = None, scope: Scope | str = Scope.TASK
    ) -> None:
        if dependency is not None and not callable(dependency):
            raise ConfigurationError(f"Depends needs a callable, got {dependency!r}")
        object.__setattr__(self, "dependency", dependency)
        object.__setattr__(self, "scope", as_scope(scope))

    def __repr__(self) -> str:
        fn = getattr(self.dependency, "__qualname__", self.dependency)
        return f"Depends({fn}, scope={self.scope.value!r})"


class CallKind(enum.Enum):
    """How a dependency's value is obtained and torn down."""

    CALL = "function"
    COROUTINE = "coroutine function"
    GENERATOR = "generator"
    ASYNC_GENERATOR = "async generator"
    CONTEXT_MANAGER = "context manager"
    ASYNC_CONTEXT_MANAGER = "async context manager"


def call_kind(fn: Callable[..., Any]) -> CallKind:
    """Classify a dependency; `@contextmanager` functions and classes with `__enter__` count
    as context managers (their value is what `__enter__` returns)."""
    if inspect.isclass(fn):
        if hasattr(fn, "__aenter__"):
            return CallKind.ASYNC_CONTEXT_MANAGER
        if hasattr(fn, "__enter__"):
            return CallKind.CONTEXT_MANAGER
        return CallKind.CALL
    if inspect.isasyncgenfunction(fn):
        return CallKind.ASYNC_GENERATOR
    if inspect.isgeneratorfunction(fn):
        return CallKind.GENERATOR
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    ):
        return CallKind.COROUTINE
    target = inspect.unwrap(fn)
    if target is not fn:  # a decorated function: what does it wrap?
        if inspect.isasyncgenfunction(target):
            return CallKind.ASYNC_CONTEXT_MANAGER  # @asynccontextmanager
        if inspect.isgeneratorfunction(target):
            return CallKind.CONTEXT_MANAGER  # @contextmanager
        if inspect.iscoroutinefunction(target):
            return CallKind.COROUTINE
    return CallKind.CALL


class _Context:
    """Source marker: the running task's TaskContext."""

    def __repr__(self) -> str:
        return "TaskContext"


CONTEXT = _Context()


@dataclasses.dataclass(frozen=True)
class Injected:
    """One parameter the core fills in: from a dependency, a State class or the context."""

    name: str
    positional: bool
    """Positional-only parameters are passed by position."""
    source: DependencyNode | type | _Context


@dataclasses.dataclass(eq=False)
class DependencyNode:
    """One dependency in the graph: the callable, its scope, what its parameters get."""

    func: Callable[..., Any]
    scope: Scope
    kind: CallKind
    params: tuple[Injected, ...]

    @property
    def label(self) -> str:
        """A readable name for errors and logs."""
        return getattr(self.func, "__qualname__", None) or repr(self.func)

    @property
    def key(self) -> Hashable:
        """What identifies the cached value within a scope."""
        return (self.func, self.scope)


Closer = Callable[[BaseException | None], Awaitable[None]]


class DependencyScope:
    """Values of one scope and their teardowns; `close()` ends it (it can be reused after)."""

    def __init__(self, scope: Scope, owner: str = "") -> None:
        self.scope = scope
        self.owner = owner
        self._values: dict[Hashable, asyncio.Future[Any]] = {}
        self._closers: list[tuple[str, Closer]] = []

    def __len__(self) -> int:
        return len(self._closers)

    async def get(self, key: Hashable, create: Callable[[], Awaitable[Any]]) -> Any:
        """The value under key, created by `create()` once even when asked concurrently."""
        fut = self._values.get(key)
        if fut is not None:
            return await asyncio.shield(fut)  # a waiter's cancel must not cancel the creation
        fut = asyncio.get_running_loop().create_future()
        self._values[key] = fut
        try:
            value = await create()
        except BaseException as exc:
            self._values.pop(key, None)  # the next caller tries again
            if isinstance(exc, Exception):
                fut.set_exception(exc)
                fut.exception()  # retrieved: nobody may be waiting
            else:
                fut.cancel()
            raise
        fut.set_result(value)
        return value

    def push(self, label: str, closer: Closer) -> None:
        """Run `closer(exc)` when the scope closes (newest first)."""
        self._closers.append((label, closer))

    async def close(self, exc: BaseException | None = None) -> list[BaseException]:
        """Tear everything down, newest first; errors are logged and returned, never raised."""
        closers, self._closers = self._closers, []
        self._values = {}
        errors: list[BaseException] = []
        for label, closer in reversed(closers):
            try:
                await closer(exc)
            except Exception as error:
                errors.append(error)
                log.error(
                    "closing dependency %s (scope %s%s) failed: %s: %s",
                    label,
                    self.scope.value,
                    f", {self.owner}" if self.owner else "",
                    type(error).__name__,
                    error,
                    exc_info=error,
                )
        return errors


# -- the plan, built at registration -------------------------------------------------------


@dataclasses.dataclass
class CallPlan:
    """How to turn a message's arguments into the call of one task function."""

    task_name: str
    signature: inspect.Signature
    """The function's full signature."""
    context_param: str | None
    """The echo parameter that receives the TaskContext."""
    injected: tuple[Injected, ...]
    converters: dict[str, Converter]
    """Parameters validated into models (dataclass, msgspec Struct, pydantic)."""
    bind_signature: inspect.Signature
    """What the message's arguments bind to (without the context and injected ones)."""


def _type_hints(
    fn: Callable[..., Any], params: list[inspect.Parameter], localns: dict[str, Any] | None
) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target, localns=localns, include_extras=True)
    except Exception:
        pass
    # One unresolvable name must not hide the others: resolve parameter by parameter.
    globalns = getattr(inspect.unwrap(target), "__globals__", {})
    hints: dict[str, Any] = {}
    for p in params:
        ann = p.annotation
        if isinstance(ann, str):
            try:
                # The user's own annotation, evaluated as typing.get_type_hints would.
                ann = eval(ann, globalns, dict(localns or {}))
            except Exception:
                continue
        if ann is not inspect.Parameter.empty:
            hints[p.name] = ann
    return hints


def _split_annotated(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, tuple(extras)
    return hint, ()


def _depends_of(p: inspect.Parameter, hint: Any, where: str) -> Depends | None:
    _, extras = _split_annotated(hint)
    marks = [e for e in extras if isinstance(e, Depends)]
    if isinstance(p.default, Depends):
        marks.append(p.default)
    if len(marks) > 1:
        raise ConfigurationError(f"{where}: parameter {p.name!r} has more than one Depends")
    return marks[0] if marks else None


def _is_context(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, TaskContext)


class _GraphBuilder:
    """Builds dependency nodes, checking cycles and scopes."""

    def __init__(self, localns: dict[str, Any] | None) -> None:
        self.localns = localns
        self.nodes: dict[Hashable, DependencyNode] = {}
        self.visiting: list[str] = []

    def source(self, p: inspect.Parameter, hint: Any, where: str) -> Injected | None:
        """What fills parameter p, or None if the caller provides it."""
        positional = p.kind is inspect.Parameter.POSITIONAL_ONLY
        mark = _depends_of(p, hint, where)
        base, _ = _split_annotated(hint)
        if mark is not None:
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ConfigurationError(f"{where}: *{p.name} cannot be a Depends")
            fn = mark.dependency if mark.dependency is not None else base
            if not callable(fn):
                raise ConfigurationError(
                    f"{where}: Depends() on {p.name!r} has no callable: pass Depends(fn) or "
                    f"annotate the parameter with a class"
                )
            return Injected(p.name, positional, self.node(fn, mark.scope))
        if is_state_class(base):
            return Injected(p.name, positional, base)
        return None

    def node(self, fn: Callable[..., Any], scope: Scope) -> DependencyNode:
        key = (fn, scope)
        found = self.nodes.get(key)
        if found is not None:
            return found
        label = getattr(fn, "__qualname__", None) or repr(fn)
        if label in self.visiting:
            cycle = " -> ".join([*self.visiting[self.visiting.index(label) :], label])
            raise ConfigurationError(f"dependency cycle: {cycle}")
        self.visiting.append(label)
        try:
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                sig = inspect.Signature()
            params = list(sig.parameters.values())
            hints = _type_hints(fn, params, self.localns)
            injected: list[Injected] = []
            where = f"dependency {label}"
            for p in params:
                hint = hints.get(p.name, p.annotation)
                source = self.source(p, hint, where)
                if source is None and _is_context(_split_annotated(hint)[0]):
                    if scope is not Scope.TASK:
                        raise ConfigurationError(
                            f"{where} (scope {scope.value}) asks for the TaskContext; only "
                            f"task-scope dependencies can have it"
                        )
                    source = Injected(p.name, p.kind is p.POSITIONAL_ONLY, CONTEXT)
                if source is None:
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                        raise ConfigurationError(
                            f"{where}: cannot provide parameter {p.name!r}; give it a default, "
                            f"a Depends(...), or annotate it with a State class or TaskContext"
                        )
                    continue
                if isinstance(source.source, DependencyNode) and source.source.scope.rank < (
                    scope.rank
                ):
                    raise ConfigurationError(
                        f"{where} (scope {scope.value}) depends on {source.source.label} "
                        f"(scope {source.source.scope.value}), which is closed before it; "
                        f"give {source.source.label} a scope that lives at least as long"
                    )
                injected.append(source)
            node = DependencyNode(fn, scope, call_kind(fn), tuple(injected))
        finally:
            self.visiting.pop()
        self.nodes[key] = node
        return node


def build_call_plan(
    func: Callable[..., Any],
    *,
    task_name: str,
    echo: bool,
    localns: dict[str, Any] | None = None,
) -> tuple[inspect.Signature | None, CallPlan | None]:
    """The signature add_task binds arguments to, and the plan (None: nothing to inject).

    Raises TypeError for an echo task without a positional first parameter and
    ConfigurationError for a dependency graph that cannot work.
    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: skip the checks
        return None, None
    params = list(sig.parameters.values())
    context_param: str | None = None
    if echo:
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise TypeError(
                f"task {task_name!r} has echo=True, so its first parameter must be "
                f"positional: it receives the TaskContext"
            )
        context_param = params[0].name
        params = params[1:]
    hints = _type_hints(func, params, localns)
    builder = _GraphBuilder(localns)
    where = f"task {task_name!r}"
    injected: list[Injected] = []
    converters: dict[str, Converter] = {}
    regular: list[inspect.Parameter] = []
    for p in params:
        hint = hints.get(p.name, p.annotation)
        source = builder.source(p, hint, where)
        if source is not None:
            injected.append(source)
            continue
        regular.append(p)
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            convert = converter_for(_split_annotated(hint)[0])
            if convert is not None:
                converters[p.name] = convert
    bind_signature = sig.replace(parameters=regular)
    if not injected and not converters:
        return bind_signature, None
    plan = CallPlan(
        task_name, sig, context_param, tuple(injected), converters, bind_signature=bind_signature
    )
    return bind_signature, plan


# -- resolution, per call ------------------------------------------------------------------


async def build_call(
    plan: CallPlan, executor: TaskExecutor, args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The (args, kwargs) to call the task with: validated, injected, context first."""
    values = plan.bind_signature.bind(*args, **kwargs).arguments
    for name, convert in plan.converters.items():
        if name in values:
            values[name] = validate(plan.task_name, name, convert, values[name])
    if plan.context_param is not None:
        values[plan.context_param] = executor.context
    for item in plan.injected:
        values[item.name] = await resolve(item.source, executor)
    ordered = {name: values[name] for name in plan.signature.parameters if name in values}
    bound = inspect.BoundArguments(plan.signature, ordered)  # type: ignore[arg-type, unused-ignore]
    return list(bound.args), dict(bound.kwargs)


async def resolve(source: DependencyNode | type | _Context, executor: TaskExecutor) -> Any:
    """The value one injected parameter gets."""
    if isinstance(source, DependencyNode):
        node = source
        overrides = executor.app.dependency_overrides
        if overrides:
            replacement = overrides.get(node.func)
            if replacement is not None:
                node = _GraphBuilder(None).node(replacement, node.scope)
        scope = executor.dependency_scope(source.scope)
        return await scope.get(source.key, functools.partial(_create, node, executor, scope))
    if isinstance(source, _Context):
        return executor.context
    state_class: Any = source
    if issubclass(state_class, SyncState):
        return state_class(executor.app.storage, loop=asyncio.get_running_loop())
    return state_class(executor.app.storage)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(None, ctx.run, fn, *args)


async def _create(node: DependencyNode, executor: TaskExecutor, scope: DependencyScope) -> Any:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in node.params:
        value = await resolve(item.source, executor)
        if item.positional:
            args.append(value)
        else:
            kwargs[item.name] = value
    fn, kind, label = node.func, node.kind, node.label
    call = functools.partial(fn, *args, **kwargs)
    if kind is CallKind.CALL:
        return await _in_thread(call)
    if kind is CallKind.COROUTINE:
        return await call()
    if kind is CallKind.GENERATOR:
        gen = await _in_thread(call)
        value = await _in_thread(next, gen)
        scope.push(label, functools.partial(_close_generator, gen, label))
        return value
    if kind is CallKind.ASYNC_GENERATOR:
        agen = call()
        value = await agen.__anext__()
        scope.push(label, functools.partial(_close_async_generator, agen, label))
        return value
    if kind is CallKind.CONTEXT_MANAGER:

        def enter() -> tuple[Any, Any]:
            cm = call()
            return cm, cm.__enter__()

        cm, value = await _in_thread(enter)
        scope.push(label, functools.partial(_exit_context, cm))
        return value
    acm = call()
    value = await acm.__aenter__()
    scope.push(label, functools.partial(_exit_async_context, acm))
    return value


async def _close_generator(gen: Any, label: str, exc: BaseException | None) -> None:
    def finish() -> None:
        try:
            if exc is None:
                next(gen)
            else:
                gen.throw(exc)
        except StopIteration:
            return
        except BaseException as raised:
            if raised is exc:
                return  # the task's own error went through the generator unchanged
            raise
        gen.close()
        raise RuntimeError(f"dependency {label} yielded more than once")

    await _in_thread(finish)


async def _close_async_generator(agen: Any, label: str, exc: BaseException | None) -> None:
    try:
        if exc is None:
            await agen.__anext__()
        else:
            await agen.athrow(exc)
    except StopAsyncIteration:
        return
    except BaseException as raised:
        if raised is exc:
            return
        raise
    await agen.aclose()
    raise RuntimeError(f"dependency {label} yielded more than once")


async def _exit_context(cm: Any, exc: BaseException | None) -> None:
    # The return value is ignored on purpose: a dependency cannot swallow the task's error.
    args = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
    try:
        await _in_thread(cm.__exit__, *args)
    except BaseException as raised:
        if raised is not exc:
            raise


async def _exit_async_context(acm: Any, exc: BaseException | None) -> None:
    args = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
    try:
        await acm.__aexit__(*args)
    except BaseException as raised:
        if raised is not exc:
            raise
