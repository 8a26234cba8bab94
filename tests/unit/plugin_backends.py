"""Shared by the plugin, Depends, State and validation tests: one app per backend.

Each module's `backend_app` fixture runs its tests on BACKENDS: memory, SQLite and Redis
(Redis only when its backend exists, keeps State, and a server answers; see
tests/servers.py). `run_tasks` runs a worker until the given records are final and returns
them, without sleeping.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from qtasks import QueueConfig, Task
from qtasks.asyncio import QueueTasks
from qtasks.runtime.worker import Worker
from tests.servers import REDIS_URL, delete_namespace, require_server

FAST = QueueConfig(poll_interval_seconds=0.01, heartbeat_interval_seconds=60.0)

BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


def build_app(backend: str, tmp_path: Path, **kwargs: Any) -> QueueTasks:
    """An async app on one backend, not started."""
    kwargs.setdefault("config", QueueConfig(**vars(FAST)))
    if backend == "memory":
        return QueueTasks(broker_url="memory://", **kwargs)
    if backend == "sqlite":
        return QueueTasks(broker_url=f"sqlite:///{tmp_path / 'plugins.sqlite3'}", **kwargs)
    assert backend == "redis"
    host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    require_server("Redis", host or "127.0.0.1", int(port or 6379))
    return QueueTasks(f"t{uuid.uuid4().hex[:12]}", broker_url=REDIS_URL, **kwargs)


@contextlib.asynccontextmanager
async def app_on(backend: str, tmp_path: Path) -> AsyncIterator[QueueTasks]:
    """An async app on `backend`, stopped on exit (what each module's backend_app yields)."""
    app = build_app(backend, tmp_path)
    try:
        yield app
    finally:
        await app.stop()
        if backend == "redis":  # each test has its own namespace: leave no keys behind
            await delete_namespace(REDIS_URL, app.name)


@contextlib.asynccontextmanager
async def worker_running(app: QueueTasks, *, concurrency: int = 4) -> AsyncIterator[Worker]:
    """A started worker, stopped (gracefully) on exit."""
    await app.start()
    worker = Worker(concurrency=concurrency)
    await worker.start(app)
    try:
        yield worker
    finally:
        await worker.stop(grace_seconds=5.0)


async def run_tasks(
    app: QueueTasks, records: Sequence[Task | None], *, concurrency: int = 4, timeout: float = 20
) -> list[Task]:
    """Run a worker until every record is final; the final records, in order."""
    async with worker_running(app, concurrency=concurrency):
        return [await app.wait(r.uuid, timeout) for r in records if r is not None]
