"""The RabbitMQ broker in the contract suite (results go to SQLite: RabbitMQ keeps none).

Each test gets its own namespace, so its queues are its own; they are deleted afterwards.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

from qtasks.config import QueueConfig
from qtasks.interfaces import Broker, GlobalConfig, Storage

from ..servers import RABBITMQ_URL, require_server
from .conftest import Harness


class RabbitMQHarness(Harness):
    """RabbitMQ at QTASKS_TEST_RABBITMQ_URL (skipped locally, failing under CI if absent)."""

    name = "rabbitmq"
    removes_queued = False  # a log/queue without random deletes (see the broker docs)
    priority_across_queues = False  # priorities are per queue; the prefetch is shared

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        parts = urlsplit(RABBITMQ_URL)
        require_server("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
        self.namespace = f"qtasks-contract-{uuid.uuid4().hex[:10]}"
        self.brokers: list[Broker] = []

    def broker(self, config: QueueConfig) -> Broker:
        from qtasks.brokers.rabbitmq import RabbitMQBroker

        broker = RabbitMQBroker.from_url(RABBITMQ_URL, namespace=self.namespace, config=config)
        self.brokers.append(broker)
        return broker

    async def kill(self, broker: Broker, config: QueueConfig) -> Broker:
        from qtasks.brokers.rabbitmq import RabbitMQBroker

        assert isinstance(broker, RabbitMQBroker)
        session = broker._session
        assert session is not None
        # Drop the socket without an AMQP goodbye, as the kernel does for a killed process.
        transport = session.connection.transport
        assert transport is not None
        amqp = transport.connection
        amqp._reader_task.cancel()  # type: ignore[attr-defined]
        amqp._writer_task.cancel()  # type: ignore[attr-defined]
        return self.broker(config)

    @property
    def _sqlite_url(self) -> str:
        return f"sqlite:///{self.tmp_path / 'results.sqlite3'}"

    def storage(self, config: QueueConfig) -> Storage:
        from qtasks.storages.sqlite import SqliteStorage

        return SqliteStorage.from_url(self._sqlite_url, namespace="test", config=config)

    def global_config(self, config: QueueConfig) -> GlobalConfig:
        from qtasks.global_configs.sqlite import SqliteGlobalConfig

        return SqliteGlobalConfig.from_url(self._sqlite_url, namespace="test", config=config)

    async def cleanup(self) -> None:
        from qtasks.brokers.rabbitmq import RabbitMQBroker

        queues: set[str] = set()
        for broker in self.brokers:
            assert isinstance(broker, RabbitMQBroker)
            queues |= broker.declared_queues
        if not queues:
            return
        janitor = RabbitMQBroker.from_url(
            RABBITMQ_URL, namespace=self.namespace, config=QueueConfig()
        )
        await janitor.start()
        try:
            await janitor.delete_queues(sorted(queues))
        finally:
            await janitor.stop()
