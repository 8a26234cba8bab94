"""The Kafka broker in the contract suite, on tansu (results go to SQLite: Kafka keeps none).

Each test gets its own namespace, so its topics and consumer group are its own. The
broker joins its group at start for the queues the suite uses, since a join takes about
a second; "another consumer" is the same instance, because a Kafka partition has one
consumer at a time (two members splitting partitions are covered in
tests/integration/test_kafka_broker.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from qtasks.config import QueueConfig
from qtasks.interfaces import Broker, GlobalConfig, Storage

from ..kafka_server import crash_member, kafka_url
from .conftest import Harness

SUITE_QUEUES = "q,a,b,other"


class KafkaHarness(Harness):
    """tansu started once per test process (skipped locally, failing under CI if absent)."""

    name = "kafka"
    removes_queued = False  # a log/queue without random deletes (see the broker docs)

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.url = kafka_url(partitions=2, queues=SUITE_QUEUES)
        self.namespace = f"qtasks-contract-{uuid.uuid4().hex[:10]}"
        self.brokers: list[Broker] = []

    def broker(self, config: QueueConfig) -> Broker:
        from qtasks.brokers.kafka import KafkaBroker

        broker = KafkaBroker.from_url(self.url, namespace=self.namespace, config=config)
        self.brokers.append(broker)
        return broker

    def peer_broker(self, first: Broker, config: QueueConfig) -> Broker:
        return first  # one consumer per partition: a second member would just wait

    async def kill(self, broker: Broker, config: QueueConfig) -> Broker:

        from qtasks.brokers.kafka import KafkaBroker

        assert isinstance(broker, KafkaBroker)
        await crash_member(broker)  # vanish without committing what it held
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
