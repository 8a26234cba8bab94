"""The Redis broker, storage and global config in the contract suites.

Each test gets its own namespace (app name), so every key it touches is under
`qtasks:{<namespace>}:`; those keys are deleted afterwards and nothing else is touched.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

from qtasks.config import QueueConfig
from qtasks.interfaces import Broker, GlobalConfig, Storage

from ..servers import REDIS_URL, delete_namespace, require_server
from .conftest import Harness


class RedisHarness(Harness):
    """Redis at QTASKS_TEST_REDIS_URL (skipped locally, failing under CI if absent)."""

    name = "redis"

    def __init__(self, tmp_path: Path, url: str = REDIS_URL) -> None:
        super().__init__(tmp_path)
        parts = urlsplit(url)
        require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
        self.url = url
        self.namespace = f"contract-{uuid.uuid4().hex[:12]}"

    def broker(self, config: QueueConfig) -> Broker:
        from qtasks.brokers.redis import RedisBroker

        return RedisBroker.from_url(self.url, namespace=self.namespace, config=config)

    def storage(self, config: QueueConfig) -> Storage:
        from qtasks.storages.redis import RedisStorage

        return RedisStorage.from_url(self.url, namespace=self.namespace, config=config)

    def global_config(self, config: QueueConfig) -> GlobalConfig:
        from qtasks.global_configs.redis import RedisGlobalConfig

        return RedisGlobalConfig.from_url(self.url, namespace=self.namespace, config=config)

    async def kill(self, broker: Broker, config: QueueConfig) -> Broker:
        from qtasks._redis import RedisComponent
        from qtasks.brokers.redis import RedisBroker

        assert isinstance(broker, RedisBroker)
        # No more heartbeats and the connections closed with the claims still held: another
        # consumer's sweep gives them back once worker_lost_after_seconds passed.
        heartbeat, broker._heartbeat = broker._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        broker._registered = False
        await RedisComponent.stop(broker)
        return self.broker(config)

    async def cleanup(self) -> None:
        await delete_namespace(self.url, self.namespace)
