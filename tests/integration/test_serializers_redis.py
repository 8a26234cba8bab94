"""MsgpackSerializer on a real Redis broker and storage, with an in-process worker.

Bytes arguments travel as msgpack through Redis and reach the task as bytes; a JSON
message from a producer with the other serializer is dead-lettered as `wrong_serializer`,
under its own uuid and name, while the tasks behind it run. The test's namespace is
deleted afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from qtasks import QueueConfig, TaskMessage, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.message import DeadLetter, Envelope
from qtasks.runtime.worker import Worker
from qtasks.serializers import JsonSerializer, MsgpackSerializer
from tests.servers import REDIS_URL, delete_namespace, require_server

pytestmark = pytest.mark.redis

FAST = QueueConfig(
    poll_interval_seconds=0.01,
    heartbeat_interval_seconds=0.05,
    sweep_interval_seconds=0.1,
)
WAIT = 20.0


@pytest.fixture
async def app() -> AsyncIterator[QueueTasks]:
    """A msgpack app on its own Redis namespace, deleted afterwards."""
    parts = urlsplit(REDIS_URL)
    require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    namespace = f"mp-{uuid.uuid4().hex[:12]}"
    app = QueueTasks(namespace, broker_url=REDIS_URL, config=FAST, serializer=MsgpackSerializer())
    try:
        yield app
    finally:
        await app.stop()
        await delete_namespace(REDIS_URL, namespace)


async def letters_until(app: QueueTasks, count: int) -> list[DeadLetter]:
    """The app's dead letters once there are `count` (the record is stored just before)."""
    deadline = time.monotonic() + WAIT
    while True:
        letters = await app.dead_letters()
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.02)


async def test_msgpack_app_on_redis(app: QueueTasks) -> None:
    seen: list[object] = []

    @app.task
    async def checksum(blob: bytes, label: str) -> bytes:
        seen.append(blob)
        return bytes([sum(blob) % 256]) + label.encode()

    await app.start()
    foreign = TaskMessage(uuid=uuid.uuid4(), name="checksum", args=["not bytes", "x"])
    json_body = JsonSerializer().encode(foreign)
    await app.broker.publish(
        [Envelope(str(foreign.uuid), "default", 0, None, time.time(), json_body)]
    )
    record = await checksum.add_task(b"\x00\x01\xfe\x80", "ok")
    assert record is not None

    worker = Worker(concurrency=2)
    await worker.start(app)
    try:
        done = await app.wait(record.uuid, WAIT)
        assert done.status is TaskStatusEnum.SUCCESS
        assert seen == [b"\x00\x01\xfe\x80"]
        # The Redis storage keeps records as JSON: a bytes result comes back base64.
        assert done.returning == base64.b64encode(b"\x7fok").decode()

        (letter,) = await letters_until(app, 1)
        assert (letter.reason, letter.name, letter.uuid) == (
            "wrong_serializer",
            "checksum",
            str(foreign.uuid),
        )
        assert letter.body == json_body
        failed = await app.wait(foreign.uuid, WAIT)
        assert (failed.status, failed.error_type) == (TaskStatusEnum.ERROR, "DecodeError")
        assert "JsonSerializer" in (failed.error_message or "")
    finally:
        await worker.stop()
