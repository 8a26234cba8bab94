"""State: a named key/value map kept by the app's Storage, shared by every worker process.

    class Cart(AsyncState): pass          # its name in the storage is "Cart"

    @app.task
    async def checkout(user: str, state: Cart) -> int:   # injected by annotation
        return await state.incr(f"orders:{user}")         # atomic across processes

`AsyncState` is for async tasks and dependencies, `SyncState` for sync tasks (it blocks
its thread while the worker's loop does the I/O). Values are JSON data. `incr` and
`lock()` are atomic on every storage that keeps State (memory, SQLite, Redis): plain
`get` then `set` from two tasks at once can lose a write; `incr`, `update` and a block
under `lock()` cannot. Outside a task, `Cart(app)` works with either app.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import msgspec

from qtasks.errors import EncodeError, StateLockTimeout
from qtasks.interfaces import Storage

T = TypeVar("T")

DEFAULT_LOCK_EXPIRE_SECONDS = 30.0
"""A lock not released within this time (its holder died) is free again."""


class _StateBase:
    """What both faces share: the name and how to reach the storage."""

    state_name: ClassVar[str | None] = None
    """The state's name in the storage; the class name when None."""

    def __init__(self, target: Any, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`target`: a Storage, or an app (sync or async) whose storage keeps the state."""
        self.name = type(self).state_name or type(self).__name__
        self._app: Any = None
        if isinstance(target, Storage):
            self._storage: Storage | None = target
        elif hasattr(target, "storage"):
            self._app = getattr(target, "core", target)  # the sync facade drives its core
            self._storage = None
        else:
            raise TypeError(f"{type(self).__name__} needs a Storage or an app, got {target!r}")
        self._loop = loop
        self._portal = getattr(target, "portal", None)

    async def _store(self) -> Storage:
        if self._storage is not None:
            return self._storage
        await self._app.start()  # idempotent: producers may use state before any add_task
        storage: Storage = self._app.storage
        return storage

    async def _get(self, key: str, default: Any) -> Any:
        return await (await self._store()).state_get(self.name, key, default)

    async def _update(self, values: Mapping[str, Any]) -> None:
        await (await self._store()).state_update(self.name, dict(values))

    async def _delete(self, keys: list[str] | None) -> None:
        await (await self._store()).state_delete(self.name, keys)

    async def _get_all(self) -> dict[str, Any]:
        return await (await self._store()).state_get_all(self.name)

    async def _incr(self, key: str, amount: float) -> int | float:
        return await (await self._store()).state_incr(self.name, key, amount)

    async def _acquire(self, key: str, expire_seconds: float, wait_seconds: float | None) -> str:
        storage = await self._store()
        token = uuid.uuid4().hex
        deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
        delay = 0.002
        # Across processes there is nothing to wait on but the storage itself: poll with
        # a short, growing delay (a lock is held for a short block of code).
        while not await storage.state_acquire_lock(self.name, key, token, expire_seconds):
            if deadline is not None and time.monotonic() >= deadline:
                raise StateLockTimeout(self.name, key, wait_seconds or 0.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return token

    async def _release(self, key: str, token: str) -> bool:
        return await (await self._store()).state_release_lock(self.name, key, token)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class AsyncState(_StateBase):
    """A named map in the storage; subclass it and annotate a task parameter with it."""

    async def get(self, key: str, default: Any = None) -> Any:
        """The value under key, or default."""
        return await self._get(key, default)

    async def set(self, key: str, value: Any) -> None:
        """Store a JSON value under key."""
        await self._update({key: value})

    async def update(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set several keys at once (all or none)."""
        await self._update({**(values or {}), **more})

    async def delete(self, key: str) -> None:
        """Remove key if present."""
        await self._delete([key])

    async def get_all(self) -> dict[str, Any]:
        """Every key and value."""
        return await self._get_all()

    async def clear(self) -> None:
        """Remove every key."""
        await self._delete(None)

    async def incr(self, key: str, amount: int | float = 1) -> int | float:
        """Add `amount` (missing counts as 0) and return the new value; atomic."""
        return await self._incr(key, amount)

    def lock(
        self,
        key: str = "lock",
        *,
        expire_seconds: float = DEFAULT_LOCK_EXPIRE_SECONDS,
        wait_seconds: float | None = None,
    ) -> AsyncStateLock:
        """`async with state.lock():` one holder at a time across every process.

        A holder that dies frees the lock after `expire_seconds`; waiting longer than
        `wait_seconds` (None: no limit) raises StateLockTimeout.
        """
        return AsyncStateLock(self, key, expire_seconds, wait_seconds)


class AsyncStateLock:
    """The context manager `AsyncState.lock()` returns."""

    def __init__(
        self, state: _StateBase, key: str, expire_seconds: float, wait_seconds: float | None
    ) -> None:
        self.state = state
        self.key = key
        self.expire_seconds = expire_seconds
        self.wait_seconds = wait_seconds
        self.token: str | None = None

    async def __aenter__(self) -> AsyncStateLock:
        self.token = await self.state._acquire(self.key, self.expire_seconds, self.wait_seconds)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self.token = self.token, None
        if token is not None:
            await asyncio.shield(self.state._release(self.key, token))


class SyncState(_StateBase):
    """`AsyncState` for sync code: sync tasks (in worker threads) and sync producers."""

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                f"{type(self).__name__} is a SyncState: it blocks, so it cannot be used on "
                f"an event loop; make it an AsyncState for async tasks and dependencies"
            )
        if self._portal is not None:
            result: T = self._portal.call(coro)
            return result
        if self._loop is None:
            coro.close()
            raise RuntimeError(
                f"{type(self).__name__} has no event loop to run on: let the worker inject "
                f"it, or build it from the sync app: {type(self).__name__}(app)"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get(self, key: str, default: Any = None) -> Any:
        """The value under key, or default."""
        return self._run(self._get(key, default))

    def set(self, key: str, value: Any) -> None:
        """Store a JSON value under key."""
        self._run(self._update({key: value}))

    def update(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set several keys at once (all or none)."""
        self._run(self._update({**(values or {}), **more}))

    def delete(self, key: str) -> None:
        """Remove key if present."""
        self._run(self._delete([key]))

    def get_all(self) -> dict[str, Any]:
        """Every key and value."""
        return self._run(self._get_all())

    def clear(self) -> None:
        """Remove every key."""
        self._run(self._delete(None))

    def incr(self, key: str, amount: int | float = 1) -> int | float:
        """Add `amount` (missing counts as 0) and return the new value; atomic."""
        return self._run(self._incr(key, amount))

    def lock(
        self,
        key: str = "lock",
        *,
        expire_seconds: float = DEFAULT_LOCK_EXPIRE_SECONDS,
        wait_seconds: float | None = None,
    ) -> SyncStateLock:
        """`with state.lock():` one holder at a time across every process."""
        return SyncStateLock(self, key, expire_seconds, wait_seconds)


class SyncStateLock:
    """The context manager `SyncState.lock()` returns."""

    def __init__(
        self, state: SyncState, key: str, expire_seconds: float, wait_seconds: float | None
    ) -> None:
        self.state = state
        self.key = key
        self.expire_seconds = expire_seconds
        self.wait_seconds = wait_seconds
        self.token: str | None = None

    def __enter__(self) -> SyncStateLock:
        self.token = self.state._run(
            self.state._acquire(self.key, self.expire_seconds, self.wait_seconds)
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self.token = self.token, None
        if token is not None:
            self.state._run(self.state._release(self.key, token))


def encode_value(value: Any) -> bytes:
    """A State value as the JSON bytes storages keep; EncodeError if it is not JSON data."""
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"{value!r:.80} cannot be stored in a State: {exc}") from exc


def add_number(name: str, key: str, current: Any, amount: int | float) -> int | float:
    """`current + amount` for `incr`; TypeError unless both are numbers (bools are not)."""
    for value in (current, amount):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"state {name!r} key {key!r}: incr needs numbers, got {value!r:.80}")
    result: int | float = current + amount
    return result


def is_state_class(hint: Any) -> bool:
    """True for a subclass of AsyncState or SyncState (the classes injected by annotation)."""
    return isinstance(hint, type) and issubclass(hint, (AsyncState, SyncState))
