"""An in-process storage for tests and single-process apps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qtasks._waiters import Waiters
from qtasks.interfaces import Storage
from qtasks.message import Task

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

    def _purge(self, now: float) -> None:
        """Drop expired records; at most once a second so saves stay cheap."""
        self._next_purge = now + 1.0
        for uuid in [u for u, t in self._expires.items() if t <= now]:
            self._records.pop(uuid, None)
            del self._expires[uuid]

    async def get(self, uuid: str) -> Task | None:
        task = self._records.get(uuid)
        expires = self._expires.get(uuid)
        if expires is not None and expires <= time.time():
            self._records.pop(uuid, None)
            self._expires.pop(uuid, None)
            return None
        return task

    async def wait(self, uuid: str, timeout: float) -> Task | None:
        return await self._waiters.wait_final(uuid, timeout, lambda: self.get(uuid))

    async def remove(self, uuids: Sequence[str]) -> None:
        for uuid in uuids:
            self._records.pop(uuid, None)
            self._expires.pop(uuid, None)

    def __len__(self) -> int:
        return len(self._records)
