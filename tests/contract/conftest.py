"""Fixtures that build each backend for the contract suites.

Every interface has ONE suite (test_broker_contract.py, ...) that runs against every
backend listed in BROKER_BACKENDS / STORAGE_BACKENDS / GLOBAL_CONFIG_BACKENDS. A backend
plugs in through a `Harness` subclass registered in HARNESSES:

* to add Redis here: write `RedisHarness`, add it to HARNESSES and add
  `pytest.param("redis", marks=pytest.mark.redis)` to the lists;
* a third-party backend reuses the suites by copying (or importing) the test modules into
  its own tests and overriding the `harness` fixture in its conftest.py to return its
  harness; the tests only use the `broker`, `make_broker`, `peer_broker`, `storage`,
  `make_storage`, `global_config` and `qconfig` fixtures defined below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qtasks.brokers.memory import MemoryBroker
from qtasks.config import QueueConfig
from qtasks.global_configs.memory import MemoryGlobalConfig
from qtasks.interfaces import Broker, GlobalConfig, Storage
from qtasks.storages.memory import MemoryStorage

# Small enough that liveness and polling never dominate a test's run time.
FAST_CONFIG = QueueConfig(
    poll_interval_seconds=0.01,
    heartbeat_interval_seconds=0.05,
    worker_lost_after_seconds=0.5,
    sweep_interval_seconds=0.1,
)


class Harness:
    """Builds one backend's components; subclass it per backend."""

    name = "?"
    priority_across_queues = True
    """One fetch from several queues hands out the best priorities of all of them."""
    removes_queued = True
    """`purge` and `discard` work (else they raise NotImplementedError, documented)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def broker(self, config: QueueConfig) -> Broker:
        """A new, not yet started broker."""
        raise NotImplementedError

    def peer_broker(self, first: Broker, config: QueueConfig) -> Broker:
        """A second consumer of `first`'s queues (not started).

        Return `first` itself when the backend has one consumer per process (the memory
        broker); "another consumer" tests then fetch from the same instance twice.
        """
        return self.broker(config)

    def storage(self, config: QueueConfig) -> Storage:
        """A new, not yet started storage."""
        raise NotImplementedError

    def global_config(self, config: QueueConfig) -> GlobalConfig:
        """A new, not yet started global config."""
        raise NotImplementedError

    async def kill(self, broker: Broker, config: QueueConfig) -> Broker:
        """Drop `broker` as if its process died (no ack, release or stop) and return
        another consumer of the same queues (not started) to take over.

        This default fits brokers that live and die with their process (memory): nothing
        of them can die apart from it, so it stops the broker and hands it back.
        """
        await broker.stop()
        return broker

    async def cleanup(self) -> None:
        """Remove what the test left behind (e.g. flush a server database)."""


class MemoryHarness(Harness):
    """The in-process backend."""

    name = "memory"

    def broker(self, config: QueueConfig) -> Broker:
        return MemoryBroker.from_url("memory://", namespace="test", config=config)

    def peer_broker(self, first: Broker, config: QueueConfig) -> Broker:
        return first  # one in-process queue: the same instance is the only consumer

    def storage(self, config: QueueConfig) -> Storage:
        return MemoryStorage.from_url("memory://", namespace="test", config=config)

    def global_config(self, config: QueueConfig) -> GlobalConfig:
        return MemoryGlobalConfig.from_url("memory://", namespace="test", config=config)


class SqliteHarness(Harness):
    """The embedded backend, one file per test."""

    name = "sqlite"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.tmp_path / 'contract.sqlite3'}"

    async def kill(self, broker: Broker, config: QueueConfig) -> Broker:
        from qtasks._sqlite import SqliteComponent
        from qtasks.brokers.sqlite import SqliteBroker

        assert isinstance(broker, SqliteBroker)
        # No more heartbeats and the file closed with the claims still held: the sweep
        # frees them once worker_lost_after_seconds passed.
        heartbeat, broker._heartbeat = broker._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        broker._registered = False
        await SqliteComponent.stop(broker)
        return self.broker(config)

    def broker(self, config: QueueConfig) -> Broker:
        from qtasks.brokers.sqlite import SqliteBroker

        return SqliteBroker.from_url(self.url, namespace="test", config=config)

    def storage(self, config: QueueConfig) -> Storage:
        from qtasks.storages.sqlite import SqliteStorage

        return SqliteStorage.from_url(self.url, namespace="test", config=config)

    def global_config(self, config: QueueConfig) -> GlobalConfig:
        from qtasks.global_configs.sqlite import SqliteGlobalConfig

        return SqliteGlobalConfig.from_url(self.url, namespace="test", config=config)


HARNESSES: dict[str, type[Harness]] = {"memory": MemoryHarness, "sqlite": SqliteHarness}
BROKER_BACKENDS: list[Any] = ["memory", "sqlite"]
STORAGE_BACKENDS: list[Any] = ["memory", "sqlite"]
GLOBAL_CONFIG_BACKENDS: list[Any] = ["memory", "sqlite"]

# Server brokers, one module each (they import Harness from here, hence the late import).
from .harness_kafka import KafkaHarness  # noqa: E402
from .harness_rabbitmq import RabbitMQHarness  # noqa: E402

HARNESSES["rabbitmq"] = RabbitMQHarness
HARNESSES["kafka"] = KafkaHarness
BROKER_BACKENDS.append(pytest.param("rabbitmq", marks=pytest.mark.rabbitmq))
BROKER_BACKENDS.append(pytest.param("kafka", marks=pytest.mark.kafka))

from .harness_redis import RedisHarness  # noqa: E402

HARNESSES["redis"] = RedisHarness
for _backends in (BROKER_BACKENDS, STORAGE_BACKENDS, GLOBAL_CONFIG_BACKENDS):
    _backends.append(pytest.param("redis", marks=pytest.mark.redis))


@pytest.fixture
def qconfig() -> QueueConfig:
    """Fast liveness and polling settings (a fresh copy per test)."""
    return dataclasses.replace(FAST_CONFIG)


class _Started:
    """Starts components and stops them (in reverse order) at teardown."""

    def __init__(self) -> None:
        self.parts: list[Broker | Storage | GlobalConfig] = []

    async def start(self, part: Any) -> Any:
        if not any(p is part for p in self.parts):
            await part.start()
            self.parts.append(part)
        return part

    async def stop_all(self) -> None:
        for part in reversed(self.parts):
            await part.stop()
        self.parts.clear()


async def _harness_for(name: str, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = HARNESSES[name](tmp_path)
    try:
        yield harness
    finally:
        await harness.cleanup()


@pytest.fixture(params=BROKER_BACKENDS)
async def broker_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The harness of the broker backend under test."""
    async for harness in _harness_for(request.param, tmp_path):
        yield harness


@pytest.fixture(params=STORAGE_BACKENDS)
async def storage_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The harness of the storage backend under test."""
    async for harness in _harness_for(request.param, tmp_path):
        yield harness


@pytest.fixture(params=GLOBAL_CONFIG_BACKENDS)
async def global_config_harness(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Harness]:
    """The harness of the global config backend under test."""
    async for harness in _harness_for(request.param, tmp_path):
        yield harness


@pytest.fixture
async def started() -> AsyncIterator[_Started]:
    """Everything started through it is stopped at teardown."""
    registry = _Started()
    try:
        yield registry
    finally:
        await registry.stop_all()


MakeBroker = Callable[..., Awaitable[Broker]]
MakeStorage = Callable[..., Awaitable[Storage]]


@pytest.fixture
def make_broker(broker_harness: Harness, started: _Started, qconfig: QueueConfig) -> MakeBroker:
    """`await make_broker(config=None)`: a started broker, stopped at teardown."""

    async def make(config: QueueConfig | None = None) -> Broker:
        broker: Broker = await started.start(broker_harness.broker(config or qconfig))
        return broker

    return make


@pytest.fixture
async def broker(make_broker: MakeBroker) -> Broker:
    """A started broker of the backend under test."""
    return await make_broker()


@pytest.fixture
async def peer_broker(
    broker: Broker, broker_harness: Harness, started: _Started, qconfig: QueueConfig
) -> Broker:
    """Another consumer of `broker`'s queues (the same instance if the backend has one)."""
    peer: Broker = await started.start(broker_harness.peer_broker(broker, qconfig))
    return peer


@pytest.fixture
def make_storage(storage_harness: Harness, started: _Started, qconfig: QueueConfig) -> MakeStorage:
    """`await make_storage(config=None)`: a started storage, stopped at teardown."""

    async def make(config: QueueConfig | None = None) -> Storage:
        storage: Storage = await started.start(storage_harness.storage(config or qconfig))
        return storage

    return make


@pytest.fixture
async def storage(make_storage: MakeStorage) -> Storage:
    """A started storage of the backend under test."""
    return await make_storage()


@pytest.fixture
async def global_config(
    global_config_harness: Harness, started: _Started, qconfig: QueueConfig
) -> GlobalConfig:
    """A started global config of the backend under test."""
    gc: GlobalConfig = await started.start(global_config_harness.global_config(qconfig))
    return gc
