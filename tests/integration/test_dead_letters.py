"""Dead letters end to end on the SQLite and Redis brokers, with a real in-process worker.

A task failing for good, an unknown task and undecodable bytes are set aside by the
worker (which keeps running what comes behind them); a dead letter is retried under its
uuid and the rest dropped. Each test has its own SQLite file or Redis namespace, whose
keys are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio

from qtasks import QueueConfig, TaskStatusEnum
from qtasks.asyncio import QueueTasks
from qtasks.brokers.sqlite import SqliteBroker
from qtasks.message import DeadLetter, Envelope
from qtasks.runtime.worker import Worker
from tests.servers import REDIS_URL, delete_namespace, require_server

FAST = QueueConfig(
    poll_interval_seconds=0.01,
    heartbeat_interval_seconds=0.05,
    worker_lost_after_seconds=2.0,
    sweep_interval_seconds=0.1,
    default_retry_backoff_seconds=0.01,
)
WAIT = 20.0
RAW = b"\xff\xfe not a task message"

BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@dataclasses.dataclass
class Backend:
    name: str
    url: str
    namespace: str


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Where the test's app lives; a Redis namespace's keys are deleted afterwards."""
    namespace = f"dl-{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'dead.sqlite3'}", namespace)
        return
    parts = urlsplit(REDIS_URL)
    require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    try:
        yield Backend("redis", REDIS_URL, namespace)
    finally:
        await delete_namespace(REDIS_URL, namespace)


@pytest.fixture
async def make_app(backend: Backend) -> AsyncIterator[Callable[..., QueueTasks]]:
    """`make_app(config=...)`: apps on the backend, stopped after the test."""
    apps: list[QueueTasks] = []

    def build(config: QueueConfig = FAST) -> QueueTasks:
        app = QueueTasks(backend.namespace, broker_url=backend.url, config=config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.stop()


async def letters_until(app: QueueTasks, count: int) -> list[DeadLetter]:
    """The app's dead letters once there are `count` (the record is stored just before)."""
    deadline = time.monotonic() + WAIT
    while True:
        letters = await app.dead_letters()
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.02)


async def test_worker_dead_letters_then_retry_and_drop(
    backend: Backend, make_app: Callable[..., QueueTasks]
) -> None:
    app = make_app()
    runs: list[int] = []
    healed = {"now": False}

    @app.task(retry=2, retry_backoff=0.01)
    async def flaky(n: int) -> int:
        runs.append(n)
        if not healed["now"]:
            raise ValueError(f"boom {n}")
        return n * 2

    @app.task
    async def fine(n: int) -> int:
        return n + 100

    await app.start()
    failing = await flaky.add_task(7)
    unknown = await app.add_task("nope")
    assert failing is not None
    assert unknown is not None
    # Straight through the broker, as a foreign producer would; valid tasks come behind it.
    await app.broker.publish([Envelope(str(uuid.uuid4()), "default", 0, None, time.time(), RAW)])
    behind = [await fine.add_task(i) for i in range(3)]

    worker = Worker(concurrency=1)
    await worker.start(app)
    try:
        for i, record in enumerate(behind):
            done = await app.wait(record.uuid, WAIT)
            assert (done.status, done.returning) == (TaskStatusEnum.SUCCESS, i + 100)
        failed = await app.wait(failing.uuid, WAIT)
        assert failed.status is TaskStatusEnum.ERROR
        lost = await app.wait(unknown.uuid, WAIT)
        assert (lost.status, lost.error_type) == (TaskStatusEnum.ERROR, "UnknownTask")

        letters = await letters_until(app, 3)
        assert len(letters) == 3, letters
        assert [x.dead_at for x in letters] == sorted((x.dead_at for x in letters), reverse=True)
        by_uuid = {x.uuid: x for x in letters}
        poison = by_uuid[str(failing.uuid)]
        assert runs == [7, 7, 7], "the first run and two retries, then set aside"
        assert (poison.reason, poison.name, poison.queue) == ("failed", "flaky", "default")
        assert "ValueError: boom 7" in poison.detail
        assert "Traceback" in poison.detail
        assert poison.delivery_count >= 1
        nameless = by_uuid[str(unknown.uuid)]
        assert (nameless.reason, nameless.name) == ("unknown_task", "nope")
        (raw,) = [x for x in letters if x.body == RAW]
        assert raw.reason, raw
        assert raw.reason not in ("failed", "unknown_task"), raw
        assert raw.detail

        (stats,) = await app.broker.queue_stats(["default"])
        assert (stats.total, stats.dead_lettered) == (0, 3)
        if backend.name == "redis":
            await assert_dead_keys_expire(backend.namespace)

        healed["now"] = True
        assert await app.retry_dead_letters([failing.uuid]) == [str(failing.uuid)]
        again = await app.wait(failing.uuid, WAIT)
        assert (again.status, again.returning) == (TaskStatusEnum.SUCCESS, 14)
        assert runs == [7, 7, 7, 7], "run again under the same uuid"
        assert {x.uuid for x in await app.dead_letters()} == {nameless.uuid, raw.uuid}

        assert sorted(await app.drop_dead_letters()) == sorted([nameless.uuid, raw.uuid])
        assert await app.dead_letters() == []
        (stats,) = await app.broker.queue_stats(["default"])
        assert (stats.total, stats.dead_lettered) == (0, 0)
    finally:
        await worker.stop()


async def assert_dead_keys_expire(namespace: str) -> None:
    """Every dead-letter key of the namespace has a TTL (none is left forever)."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"qtasks:{{{namespace}}}:dead*")]
        assert len(keys) == 2, keys  # the queue's hash and sorted set
        for key in keys:
            ttl = await client.pttl(key)
            assert 0 < ttl <= FAST.dead_letter_ttl_seconds * 1000, (key, ttl)  # type: ignore[operator]
    finally:
        await client.aclose()


async def test_expired_dead_letters_are_not_listed_and_get_removed(
    backend: Backend, make_app: Callable[..., QueueTasks]
) -> None:
    app = make_app(dataclasses.replace(FAST, dead_letter_ttl_seconds=60.0))
    await app.start()
    broker = app.broker
    await broker.publish(
        [Envelope(str(uuid.uuid4()), "q", 0, None, time.time(), b"m%d" % i) for i in range(2)]
    )
    got = await broker.fetch(["q"], 10, 2.0)
    assert len(got) == 2
    now = time.time()
    old, new = (
        DeadLetter(uuid=str(uuid.uuid4()), queue="q", reason="failed", body=d.body, dead_at=t)
        for d, t in zip(got, (now - 120.0, now), strict=True)
    )
    await broker.dead_letter([(got[0], old), (got[1], new)])
    assert [x.uuid for x in await broker.dead_letters(["q"])] == [new.uuid]
    assert await broker.dead_letters(["q"], uuids=[old.uuid]) == []
    (stats,) = await broker.queue_stats(["q"])
    assert stats.dead_lettered == 1
    if backend.name == "redis":
        client: Any = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            # Trimmed by the write itself.
            assert await client.hkeys(f"qtasks:{{{backend.namespace}}}:dead:q") == [
                new.uuid.encode()
            ]
        finally:
            await client.aclose()
    else:
        assert isinstance(broker, SqliteBroker)
        path = broker.path

        def count() -> int:
            with sqlite3.connect(path) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM qtasks_dead_letters").fetchone()[0])

        # The heartbeat thread's sweep (every 0.1 s) deletes the expired one.
        deadline = time.monotonic() + WAIT
        while count() > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert count() == 1


async def test_sqlite_file_of_the_previous_version_gains_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    first = SqliteBroker(path, namespace="old", config=FAST)
    await first.start()
    await first.publish([Envelope(str(uuid.uuid4()), "q", 0, None, time.time(), b"kept")])
    await first.stop()
    with sqlite3.connect(path) as conn:  # as the previous version left it: no such table
        conn.execute("DROP TABLE qtasks_dead_letters")
    broker = SqliteBroker(path, namespace="old", config=FAST)
    await broker.start()
    try:
        (d,) = await broker.fetch(["q"], 10, 2.0)
        letter = DeadLetter(
            uuid=str(uuid.uuid4()), queue="q", reason="failed", body=d.body, dead_at=time.time()
        )
        await broker.dead_letter([(d, letter)])
        assert await broker.dead_letters(["q"]) == [letter]
        assert await broker.queue_sizes(["q"]) == {"q": 0}
    finally:
        await broker.stop()
