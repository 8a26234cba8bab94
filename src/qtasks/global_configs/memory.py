"""An in-process global config for tests and single-process apps."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qtasks.interfaces import GlobalConfig

if TYPE_CHECKING:
    from qtasks.config import QueueConfig


class MemoryGlobalConfig(GlobalConfig):
    """Settings and the worker registry in dicts."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._workers: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_url(cls, url: str, *, namespace: str, config: QueueConfig) -> MemoryGlobalConfig:
        """Build from `memory://`."""
        return cls()

    async def set(self, key: str, value: Any) -> None:
        self._values[key] = value

    async def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def items(self) -> dict[str, Any]:
        return dict(self._values)

    async def register_worker(self, info: dict[str, Any]) -> None:
        self._workers[str(info["id"])] = {**info, "heartbeat": time.time()}

    async def unregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[dict[str, Any]]:
        return [dict(w) for w in self._workers.values()]
