"""An in-process storage for tests and single-process apps."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks._waiters import Waiters
from qtasks.errors import EncodeError
from qtasks.interfaces import Steps, Storage
from qtasks.message import Task, TaskStatusEnum
from qtasks.plugins.state import add_number, encode_value
from qtasks.storages.steps import StepWaiters

if TYPE_CHECKING:
    from qtasks.config import QueueConfig


class MemoryStorage(Storage):
    """Records in a dict; finished ones expire after the result TTL."""

    def __init__(self, result_ttl_seconds: float | None = None) -> None:
        self._records: dict[str, Task] = {}
        self._expires: dict[str, float] = {}
        self._waiters = Waiters()
        self.result_ttl_seconds = result_ttl_seconds
        self._next_purge = 0.0
        # State values are kept encoded, so callers never share mutable objects and only
        # JSON data gets in, as with every other storage.
        self._states: dict[str, dict[str, bytes]] = {}
        self._locks: dict[tuple[str, str], tuple[str, float]] = {}
        # Steps are kept encoded too; they go when their task's record goes.
        self._steps: dict[str, list[bytes]] = {}
        self._step_waiters = StepWaiters()

    @classmethod
    def from_url(cls, url: str, *, namespace: str, config: QueueConfig) -> MemoryStorage:
        """Build from `memory://`."""
        return cls(result_ttl_seconds=config.result_ttl_seconds)

    async def add(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            self._records[str(task.uuid)] = task

    async def save(self, tasks: Sequence[Task]) -> None:
        ttl = self.result_ttl_seconds
        now = time.time()
        if self._expires and now >= self._next_purge:
            self._purge(now)
        for task in tasks:
            key = str(task.uuid)
            self._records[key] = task
            if ttl is not None and task.is_final:
                self._expires[key] = (task.finished_at or time.time()) + ttl
        self._waiters.notify(tasks)
        if self._step_waiters:
            self._step_waiters.notify(str(t.uuid) for t in tasks if t.is_final)

    def _purge(self, now: float) -> None:
        """Drop expired records; at most once a second so saves stay cheap."""
        self._next_purge = now + 1.0
        for uuid in [u for u, t in self._expires.items() if t <= now]:
            self._records.pop(uuid, None)
            self._steps.pop(uuid, None)
            del self._expires[uuid]

    async def get(self, uuid: str) -> Task | None:
        task = self._records.get(uuid)
        expires = self._expires.get(uuid)
        if expires is not None and expires <= time.time():
            self._records.pop(uuid, None)
            self._expires.pop(uuid, None)
            self._steps.pop(uuid, None)
            return None
        return task

    async def wait(self, uuid: str, timeout: float) -> Task | None:
        return await self._waiters.wait_final(uuid, timeout, lambda: self.get(uuid))

    async def remove(self, uuids: Sequence[str]) -> None:
        for uuid in uuids:
            self._records.pop(uuid, None)
            self._expires.pop(uuid, None)
            self._steps.pop(uuid, None)

    async def recent(self, status: TaskStatusEnum, limit: int) -> list[Task]:
        """Records with `status`, latest finished (else started, else created) first."""
        now = time.time()
        found = [
            t
            for u, t in self._records.items()
            if t.status is status and self._expires.get(u, now + 1) > now
        ]
        found.sort(key=lambda t: t.finished_at or t.started_at or t.created_at, reverse=True)
        return found[: max(limit, 0)]

    async def add_steps(self, uuid: str, values: Sequence[Any]) -> None:
        """Append steps (EncodeError, and nothing added, if one is not JSON data)."""
        encoded = []
        for value in values:
            try:
                encoded.append(msgspec.json.encode(value))
            except (TypeError, ValueError, OverflowError) as exc:
                raise EncodeError(f"a step of task {uuid} cannot be stored: {exc}") from exc
        self._steps.setdefault(str(uuid), []).extend(encoded)
        self._step_waiters.notify((str(uuid),))

    async def steps(self, uuid: str, after: int, timeout: float) -> Steps:
        """Steps from `after` on, or the final record; waits for either up to `timeout`."""
        uuid = str(uuid)
        after = max(after, 0)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            # Registered before reading, so a step added in between still wakes us.
            fut = self._step_waiters.register(uuid)
            try:
                record = await self.get(uuid)
                final = record if record is not None and record.is_final else None
                raw = self._steps.get(uuid, [])[after:]
                if raw or final is not None:
                    values = [msgspec.json.decode(v) for v in raw]
                    return Steps(values, after + len(values), final)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Steps([], after)
                await self._step_waiters.wait(fut, remaining)
            finally:
                self._step_waiters.discard(uuid, fut)

    # -- State: every method runs without an await, so it is atomic on the event loop ------

    async def state_get(self, name: str, key: str, default: Any = None) -> Any:
        raw = self._states.get(name, {}).get(key)
        return default if raw is None else msgspec.json.decode(raw)

    async def state_get_all(self, name: str) -> dict[str, Any]:
        return {k: msgspec.json.decode(v) for k, v in self._states.get(name, {}).items()}

    async def state_update(self, name: str, values: Mapping[str, Any]) -> None:
        encoded = {key: encode_value(value) for key, value in values.items()}
        self._states.setdefault(name, {}).update(encoded)

    async def state_delete(self, name: str, keys: Sequence[str] | None = None) -> None:
        if keys is None:
            self._states.pop(name, None)
            return
        state = self._states.get(name, {})
        for key in keys:
            state.pop(key, None)

    async def state_incr(self, name: str, key: str, amount: int | float = 1) -> int | float:
        state = self._states.setdefault(name, {})
        raw = state.get(key)
        current = 0 if raw is None else msgspec.json.decode(raw)
        value = add_number(name, key, current, amount)
        state[key] = encode_value(value)
        return value

    async def state_acquire_lock(
        self, name: str, key: str, token: str, expire_seconds: float
    ) -> bool:
        now = time.time()
        held = self._locks.get((name, key))
        if held is not None and held[1] > now:
            return False
        self._locks[(name, key)] = (token, now + expire_seconds)
        return True

    async def state_release_lock(self, name: str, key: str, token: str) -> bool:
        held = self._locks.get((name, key))
        if held is None or held[0] != token:
            return False
        del self._locks[(name, key)]
        return True

    def __len__(self) -> int:
        return len(self._records)
