"""Shared fixtures: an async app on memory:// and helpers that run a worker until idle.

Tests never sleep to wait for work: `run_until_idle` starts a worker, waits for
`MemoryBroker.join()` (every message acked, so every record stored) and stops it;
`RecordingStorage.wait_for` wakes on the save that matches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.brokers.memory import MemoryBroker
from qtasks.interfaces import Delivery
from qtasks.message import Envelope, Task, TaskMessage, TaskStatusEnum, new_uuid
from qtasks.runtime.worker import Worker
from qtasks.storages.memory import MemoryStorage

JOIN_TIMEOUT = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", default=False, help="fault suite: sizes times 10"
    )


class RecordingStorage(MemoryStorage):
    """A MemoryStorage that keeps every saved record and lets tests wait for one."""

    def __init__(self, result_ttl_seconds: float | None = None) -> None:
        super().__init__(result_ttl_seconds)
        self.history: list[Task] = []
        self._saved: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._saved is None:
            self._saved = asyncio.Condition()
        return self._saved

    async def save(self, tasks: Sequence[Task]) -> None:
        await super().save(tasks)
        self.history.extend(tasks)
        cond = self._condition()
        async with cond:
            cond.notify_all()

    def statuses(self, uuid: object) -> list[TaskStatusEnum]:
        """Every status saved for one task, in order."""
        return [t.status for t in self.history if t.uuid == uuid or str(t.uuid) == str(uuid)]

    async def wait_for(
        self, predicate: Callable[[Task], bool], timeout: float = JOIN_TIMEOUT
    ) -> Task:
        """The first saved record matching `predicate` (waits for it, no polling)."""
        cond = self._condition()

        def found() -> Task | None:
            return next((t for t in self.history if predicate(t)), None)

        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: found() is not None), timeout)
        task = found()
        assert task is not None
        return task


class CountingBroker(MemoryBroker):
    """A MemoryBroker that remembers the most claims it ever had out at once."""

    def __init__(self) -> None:
        super().__init__()
        self.max_in_flight = 0
        self.fetched = 0
        self.acked = 0

    async def fetch(self, queues: Sequence[str], max_count: int, timeout: float) -> list[Delivery]:
        out = await super().fetch(queues, max_count, timeout)
        self.fetched += len(out)
        self.max_in_flight = max(self.max_in_flight, len(self._in_flight))
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.acked += len(deliveries)
        await super().ack(deliveries)

    @property
    def in_flight(self) -> int:
        """Messages claimed and not yet acked or returned."""
        return len(self._in_flight)

    @property
    def ready(self) -> int:
        """Messages waiting to be claimed (due now)."""
        return sum(len(h) for h in self._ready.values())


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder with no QTASKS_* URL from the caller's shell.

    The embedded default is a file in the working directory; without this a test that
    builds a default app would leave it in the checkout.
    """
    monkeypatch.chdir(tmp_path)
    for name in ("QTASKS_BROKER_URL", "QTASKS_STORAGE_URL", "QTASKS_APP"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def app() -> AsyncIterator[QueueTasks]:
    """An async app on memory://, stopped after the test."""
    app = QueueTasks(broker_url="memory://")
    yield app
    await app.stop()


MakeApp = Callable[..., QueueTasks]


@pytest.fixture
async def make_app() -> AsyncIterator[MakeApp]:
    """Build async memory:// apps with other constructor arguments; all stopped after the test."""
    apps: list[QueueTasks] = []

    def build(**kwargs: Any) -> QueueTasks:
        kwargs.setdefault("broker_url", "memory://")
        built = QueueTasks(**kwargs)
        apps.append(built)
        return built

    yield build
    for built in apps:
        await built.stop()


@pytest.fixture
def recording_storage() -> RecordingStorage:
    """A MemoryStorage that keeps every saved record (pass it as `storage=`)."""
    return RecordingStorage()


@pytest.fixture
def counting_broker() -> CountingBroker:
    """A MemoryBroker that counts claims (pass it as `broker=`)."""
    return CountingBroker()


@contextlib.asynccontextmanager
async def _running_worker(
    app: QueueTasks,
    *,
    concurrency: int | None = None,
    grace_seconds: float = 5.0,
    worker: Worker | None = None,
) -> AsyncIterator[Worker]:
    await app.start()
    worker = worker or Worker(concurrency=concurrency)
    await worker.start(app)
    try:
        yield worker
    finally:
        await worker.stop(grace_seconds=grace_seconds)


@pytest.fixture
def running_worker() -> Callable[..., contextlib.AbstractAsyncContextManager[Worker]]:
    """`async with running_worker(app, concurrency=...)`: a started worker, stopped on exit."""
    return _running_worker


async def _run_until_idle(
    app: QueueTasks, *, concurrency: int | None = None, timeout: float = JOIN_TIMEOUT
) -> Worker:
    async with _running_worker(app, concurrency=concurrency) as worker:
        broker = app.broker
        assert isinstance(broker, MemoryBroker)
        await broker.join(timeout)
    return worker


@pytest.fixture
def run_until_idle() -> Callable[..., Awaitable[Worker]]:
    """`await run_until_idle(app)`: start a worker, wait until every message is acked, stop it."""
    return _run_until_idle


async def _publish_raw(app: QueueTasks, body: bytes, *, uuid: str | None = None) -> str:
    await app.start()
    uuid = uuid or str(new_uuid())
    await app.broker.publish([Envelope(uuid, "default", 0, None, 0.0, body)])
    return uuid


@pytest.fixture
def publish_raw() -> Callable[..., Awaitable[str]]:
    """`await publish_raw(app, body)`: bytes on the broker as another producer sent them."""
    return _publish_raw


async def _publish_message(app: QueueTasks, message: TaskMessage) -> None:
    await app.start()
    body = app.serializer.encode(message)
    envelope = Envelope(
        str(message.uuid), message.queue, message.priority, message.eta, message.created_at, body
    )
    await app.broker.publish([envelope])


@pytest.fixture
def publish_message() -> Callable[[QueueTasks, TaskMessage], Awaitable[None]]:
    """`await publish_message(app, msg)`: publish without a `new` record or argument checks."""
    return _publish_message
