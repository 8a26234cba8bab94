"""Redis and issue 7's safety checks against a real server: startup warnings about settings
that lose tasks, CONFIG refused by a restricted user, big payloads, and no leaked password.

Every test uses its own namespace on the test database and deletes its keys afterwards.
The eviction test flips maxmemory-policy for a moment (maxmemory stays 0, so nothing is
evicted) and puts it back; the ACL users made here are deleted again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio

from qtasks import QTasksError, QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers.redis import RedisBroker
from qtasks.runtime.worker import Worker
from tests.servers import REDIS_URL, delete_namespace, require_server

pytestmark = pytest.mark.redis


def _require_redis() -> None:
    parts = urlsplit(REDIS_URL)
    require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    _require_redis()
    ns = f"it-sec-{uuid.uuid4().hex[:10]}"
    yield ns
    await delete_namespace(REDIS_URL, ns)


@pytest.fixture
async def admin() -> AsyncIterator[redis.asyncio.Redis]:
    _require_redis()
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


def _as_user(user: str, password: str) -> str:
    parts = urlsplit(REDIS_URL)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 6379}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _warnings(namespace: str, url: str = REDIS_URL) -> list[str]:
    broker = RedisBroker(url, namespace=namespace)
    await broker.start()
    try:
        return await broker.startup_warnings()
    finally:
        await broker.stop()


async def test_no_persistence_is_warned_about(namespace: str, admin: redis.asyncio.Redis) -> None:
    settings = await admin.config_get("save")
    settings.update(await admin.config_get("appendonly"))
    unsafe = settings["save"] == "" and settings["appendonly"] == "no"
    warnings = await _warnings(namespace)
    said = [w for w in warnings if "persists nothing" in w]
    assert bool(said) == unsafe, (settings, warnings)
    if unsafe:  # the test server keeps nothing on disk: the warning must be there
        assert "a Redis restart loses every queued task" in said[0]
        assert "appendonly yes" in said[0]


async def test_an_evicting_policy_is_warned_about_and_noeviction_is_not(
    namespace: str, admin: redis.asyncio.Redis
) -> None:
    before = (await admin.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        assert not [w for w in await _warnings(namespace) if "maxmemory-policy" in w]
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        (warning,) = [w for w in await _warnings(namespace) if "maxmemory-policy" in w]
    finally:
        await admin.config_set("maxmemory-policy", before)
    assert "allkeys-lru" in warning
    assert "can vanish" in warning
    assert "noeviction" in warning


async def test_config_refused_means_no_warnings_and_no_error(
    namespace: str, admin: redis.asyncio.Redis
) -> None:
    # Managed Redis services refuse CONFIG: a user without it stands in for one.
    user, password = f"qtasks-noconfig-{uuid.uuid4().hex[:6]}", "pw-0123456789"
    await admin.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all", "-config"
    )
    try:
        assert await _warnings(namespace, _as_user(user, password)) == []
    finally:
        await admin.execute_command("ACL", "DELUSER", user)


async def test_the_worker_logs_the_warnings_at_start(
    namespace: str, admin: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = QueueTasks(namespace, broker_url=REDIS_URL)
    expected = await _warnings(namespace)
    worker = Worker()
    with caplog.at_level(logging.WARNING):
        await app.start()
        await worker.start(app)
        await worker.stop()
    await app.stop()
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert expected, "the test server persists nothing, so there is something to say"
    for line in expected:
        assert line in logged


async def test_ten_megabytes_round_trip_on_redis(namespace: str) -> None:
    app = QueueTasks(
        namespace, broker_url=REDIS_URL, config=QueueConfig(max_payload_bytes=16 * 1024**2)
    )

    @app.task
    def measure(blob: str) -> int:
        return len(blob)

    blob = "z" * (10 * 1024 * 1024)
    worker = Worker()
    try:
        await app.start()
        await worker.start(app)
        record = await app.add_task("measure", blob, timeout=60)
        await worker.stop()
    finally:
        await app.stop()
    assert record is not None
    assert record.status is TaskStatusEnum.SUCCESS, record.error_message
    assert record.returning == len(blob)


async def test_a_refused_password_is_not_in_the_error_or_logs(
    namespace: str, admin: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user, secret = f"qtasks-pw-{uuid.uuid4().hex[:6]}", "wrong-s3cr3t-value"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">the-right-one-123", "+@all")
    app = QueueTasks(namespace, broker_url=_as_user(user, secret))
    try:
        with pytest.raises(QTasksError) as info:
            await app.add_task("anything")
    finally:
        await app.stop()
        await admin.execute_command("ACL", "DELUSER", user)
    assert "WRONGPASS" in str(info.value) or "invalid" in str(info.value).lower()
    assert secret not in str(info.value)
    assert secret not in repr(app.broker)
    assert secret not in caplog.text
