"""SQLite-specific behaviour: liveness and sweeping, processes racing, group commit, TTL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from qtasks import _sqlite
from qtasks.brokers.sqlite import SqliteBroker, sweep
from qtasks.config import QueueConfig
from qtasks.errors import BrokerError, ConfigurationError, StorageError
from qtasks.global_configs.sqlite import SqliteGlobalConfig
from qtasks.message import Envelope, TaskMessage, TaskStatusEnum, new_uuid, record_for
from qtasks.storages.sqlite import SqliteStorage

FAST = QueueConfig(
    poll_interval_seconds=0.01,
    heartbeat_interval_seconds=0.03,
    worker_lost_after_seconds=0.25,
    sweep_interval_seconds=0.05,
)


def env(body: str, *, queue: str = "q", eta: float | None = None) -> Envelope:
    return Envelope(str(uuid.uuid4()), queue, 0, eta, time.time(), body.encode())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "q.sqlite3"


@pytest.fixture
async def make(db_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await make(Cls, namespace=..., config=...)`: started, stopped at teardown."""
    parts: list[Any] = []

    async def build(cls: type[Any], *, namespace: str = "app", config: QueueConfig = FAST) -> Any:
        part = cls(db_path, namespace=namespace, config=config)
        await part.start()
        parts.append(part)
        return part

    yield build
    for part in reversed(parts):
        await part.stop()
    assert _sqlite._registry == {}, "every handle must be released after stop"


def raw(path: Path) -> sqlite3.Connection:
    """A separate connection, as another process would have."""
    return sqlite3.connect(path, isolation_level=None, timeout=10)


# -- URLs and lifecycle ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///rel/q.db", "rel/q.db"),
        ("sqlite:////abs/q.db", "/abs/q.db"),
        ("sqlite://", "qtasks.sqlite3"),
        ("sqlite:///", "qtasks.sqlite3"),
        ("sqlite:///with%20space.db?ignored=1", "with space.db"),
    ],
)
def test_path_from_url(url: str, expected: str, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    assert _sqlite.path_from_url(url) == str(tmp_path / expected)


@pytest.mark.parametrize("url", ["sqlite://host/q.db", "sqlite:///:memory:", "redis://x"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        _sqlite.path_from_url(url)


def test_from_url_and_url_roundtrip(db_path: Path) -> None:
    broker = SqliteBroker.from_url(f"sqlite:///{db_path}", namespace="ns", config=FAST)
    assert broker.path == str(db_path)
    assert broker.namespace == "ns"
    assert broker.config is FAST
    assert _sqlite.path_from_url(broker.url) == str(db_path)


async def test_unopenable_file_raises_with_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "q.db"
    with pytest.raises(BrokerError, match="no-such-dir"):
        await SqliteBroker(missing).start()
    with pytest.raises(StorageError, match="no-such-dir"):
        await SqliteStorage(missing).start()
    assert _sqlite._registry == {}


async def test_not_started_is_a_clear_error(db_path: Path) -> None:
    with pytest.raises(BrokerError, match="not started"):
        await SqliteBroker(db_path).publish([env("x")])


async def test_components_share_one_handle_and_restart(db_path: Path) -> None:
    broker, storage = SqliteBroker(db_path, config=FAST), SqliteStorage(db_path, config=FAST)
    gc = SqliteGlobalConfig(db_path)
    for _ in range(2):
        for part in (broker, storage, gc):
            await part.start()
        assert broker.db is storage.db is gc.db
        assert broker.db.refs == 3
        await broker.publish([env("x")])
        got = await broker.fetch(["q"], 10, 0)
        assert len(got) == 1
        await broker.ack(got)
        for part in (broker, storage, gc):
            await part.stop()
        assert _sqlite._registry == {}


# -- liveness ---------------------------------------------------------------------------


async def test_lost_consumer_claims_come_back(make: Callable[..., Any]) -> None:
    dead: SqliteBroker = await make(SqliteBroker)
    alive: SqliteBroker = await make(SqliteBroker)
    await dead.publish([env("orphan")])
    (first,) = await dead.fetch(["q"], 10, 1.0)
    assert first.delivery_count == 1
    assert dead._heartbeat is not None
    dead._heartbeat.stop()  # as if the process was killed: no more heartbeats
    start = time.monotonic()
    (again,) = await alive.fetch(["q"], 10, 3.0)
    assert again.body == b"orphan"
    assert again.delivery_count == 2
    # Back after worker_lost_after_seconds plus at most a sweep interval and a poll.
    assert time.monotonic() - start < FAST.worker_lost_after_seconds + 0.5


async def test_claims_without_consumer_row_are_swept(
    make: Callable[..., Any], db_path: Path
) -> None:
    broker: SqliteBroker = await make(SqliteBroker)
    await broker.publish([env("ghost")])
    with raw(db_path) as conn:
        conn.execute("UPDATE qtasks_queue SET consumer = 'crashed-before-heartbeat'")
    conn.close()
    (got,) = await broker.fetch(["q"], 10, 2.0)  # our heartbeat thread sweeps on start
    assert got.body == b"ghost"


async def test_live_consumer_keeps_long_claims(make: Callable[..., Any]) -> None:
    holder: SqliteBroker = await make(SqliteBroker)
    other: SqliteBroker = await make(SqliteBroker)
    await holder.publish([env("long")])
    assert len(await holder.fetch(["q"], 10, 1.0)) == 1
    assert await other.fetch(["q"], 10, 0.05) == []  # `other` now sweeps in the background
    # Block the event loop well past worker_lost_after_seconds, as a CPU-bound task would:
    # the heartbeat runs in a thread, so `holder` still looks alive.
    time.sleep(FAST.worker_lost_after_seconds * 3)
    await asyncio.sleep(FAST.worker_lost_after_seconds)
    assert await other.fetch(["q"], 10, 0.05) == []
    assert await other.queue_sizes(["q"]) == {"q": 1}


def test_sweep_function_frees_only_silent_consumers(db_path: Path) -> None:
    conn = _sqlite.connect(str(db_path))
    try:
        conn.executescript(_sqlite.SCHEMA)
        now = time.time()
        conn.executemany(
            "INSERT INTO qtasks_consumers (id, ns, heartbeat) VALUES (?, ?, ?)",
            [("old", "app", now - 100), ("fresh", "app", now), ("other-ns", "b", now - 100)],
        )
        for consumer, ns in [("old", "app"), ("fresh", "app"), ("other-ns", "b")]:
            conn.execute(
                "INSERT INTO qtasks_queue (ns, queue, uuid, priority, created_at, body, consumer)"
                " VALUES (?, 'q', 'u', 0, 0, x'00', ?)",
                (ns, consumer),
            )
        assert sweep(conn, "app", 10.0) == 1
        held = dict(conn.execute("SELECT ns, consumer FROM qtasks_queue WHERE ns = 'b'"))
        assert held == {"b": "other-ns"}  # another namespace's sweep is not ours to run
        assert {r[0] for r in conn.execute("SELECT id FROM qtasks_consumers")} == {
            "fresh",
            "other-ns",
        }
    finally:
        conn.close()


async def test_stop_gives_back_and_unregisters(make: Callable[..., Any], db_path: Path) -> None:
    a: SqliteBroker = await make(SqliteBroker)
    b: SqliteBroker = await make(SqliteBroker)
    await a.publish([env("x"), env("y")])
    assert len(await a.fetch(["q"], 10, 1.0)) == 2
    await a.stop()
    got = await b.fetch(["q"], 10, 1.0)
    assert sorted(d.body for d in got) == [b"x", b"y"]
    assert all(d.delivery_count == 1 for d in got)
    with raw(db_path) as conn:
        ids = {r[0] for r in conn.execute("SELECT id FROM qtasks_consumers")}
    conn.close()
    assert ids == {b.consumer_id}


async def test_cancelled_fetch_gives_claims_back(make: Callable[..., Any]) -> None:
    broker: SqliteBroker = await make(SqliteBroker)
    await broker.publish([env("c")])
    await broker.fetch(["none"], 1, 0)  # registers the consumer up front
    gate = threading.Event()
    broker.db.submit(lambda conn: gate.wait(5))  # hold the writer so the claim is queued
    fetching = asyncio.ensure_future(broker.fetch(["q"], 10, 1.0))
    await asyncio.sleep(0.02)
    fetching.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await fetching
    (got,) = await broker.fetch(["q"], 10, 1.0)
    assert got.body == b"c"
    assert got.delivery_count == 1


# -- polling ----------------------------------------------------------------------------


async def test_fetch_sees_other_process_writes_quickly(
    make: Callable[..., Any], db_path: Path
) -> None:
    broker: SqliteBroker = await make(SqliteBroker)
    assert await broker.fetch(["q"], 10, 0.1) == []  # backoff is at its maximum now

    def other_process_publishes() -> None:
        time.sleep(0.05)
        conn = raw(db_path)
        try:
            conn.execute(
                "INSERT INTO qtasks_queue (ns, queue, uuid, priority, created_at, eta, body)"
                " VALUES ('app', 'q', 'u', 0, 0, 0, x'61')"
            )
        finally:
            conn.close()

    thread = threading.Thread(target=other_process_publishes)
    start = time.monotonic()
    thread.start()
    got = await broker.fetch(["q"], 10, 2.0)
    thread.join()
    assert [d.body for d in got] == [b"a"]
    assert time.monotonic() - start < 0.05 + FAST.poll_interval_seconds + 0.1


async def test_storage_wait_sees_other_process_writes(
    make: Callable[..., Any], db_path: Path
) -> None:
    storage: SqliteStorage = await make(SqliteStorage)
    task = record_for(TaskMessage(uuid=new_uuid(), name="t"))
    await storage.add([task])
    done = msgspec.structs.replace(task, status=TaskStatusEnum.SUCCESS, finished_at=time.time())

    def other_process_saves() -> None:
        time.sleep(0.05)
        conn = raw(db_path)
        try:
            conn.execute(
                "UPDATE qtasks_tasks SET status = 'success', record = ? WHERE uuid = ?",
                (msgspec.json.encode(done), str(task.uuid)),
            )
        finally:
            conn.close()

    thread = threading.Thread(target=other_process_saves)
    thread.start()
    got = await storage.wait(str(task.uuid), 2.0)
    thread.join()
    assert got == done


async def test_storages_of_one_process_wake_each_other(make: Callable[..., Any]) -> None:
    producer: SqliteStorage = await make(
        SqliteStorage, config=dataclasses.replace(FAST, poll_interval_seconds=10)
    )
    worker: SqliteStorage = await make(SqliteStorage)
    task = record_for(TaskMessage(uuid=new_uuid(), name="t"))
    await producer.add([task])
    waiting = asyncio.ensure_future(producer.wait(str(task.uuid), 5.0))
    await asyncio.sleep(0.05)
    done = msgspec.structs.replace(task, status=TaskStatusEnum.SUCCESS, finished_at=time.time())
    start = time.monotonic()
    await worker.save([done])
    assert await asyncio.wait_for(waiting, 1.0) == done
    assert time.monotonic() - start < 0.1


# -- namespaces -------------------------------------------------------------------------


async def test_namespaces_isolate(make: Callable[..., Any]) -> None:
    a: SqliteBroker = await make(SqliteBroker, namespace="a")
    b: SqliteBroker = await make(SqliteBroker, namespace="b")
    await a.publish([env("for-a")])
    assert await b.fetch(["q"], 10, 0.05) == []
    assert [d.body for d in await a.fetch(["q"], 10, 1.0)] == [b"for-a"]

    sa: SqliteStorage = await make(SqliteStorage, namespace="a")
    sb: SqliteStorage = await make(SqliteStorage, namespace="b")
    task = record_for(TaskMessage(uuid=new_uuid(), name="t"))
    await sa.add([task])
    assert await sb.get(str(task.uuid)) is None
    assert await sa.get(str(task.uuid)) == task

    ga: SqliteGlobalConfig = await make(SqliteGlobalConfig, namespace="a")
    gb: SqliteGlobalConfig = await make(SqliteGlobalConfig, namespace="b")
    await ga.set("k", 1)
    await ga.register_worker({"id": "w"})
    assert await gb.items() == {}
    assert await gb.workers() == []


# -- TTL --------------------------------------------------------------------------------


async def test_expired_records_are_purged(make: Callable[..., Any], db_path: Path) -> None:
    config = dataclasses.replace(FAST, result_ttl_seconds=0.01, sweep_interval_seconds=0.0)
    storage: SqliteStorage = await make(SqliteStorage, config=config)
    old = [record_for(TaskMessage(uuid=new_uuid(), name="t")) for _ in range(3)]
    await storage.save(
        [
            msgspec.structs.replace(t, status=TaskStatusEnum.SUCCESS, finished_at=time.time())
            for t in old
        ]
    )
    pending = record_for(TaskMessage(uuid=new_uuid(), name="t"))
    await asyncio.sleep(0.03)
    await storage.save([pending])  # piggy-backed purge
    with raw(db_path) as conn:
        left = [r[0] for r in conn.execute("SELECT uuid FROM qtasks_tasks")]
    conn.close()
    assert left == [str(pending.uuid)]


# -- group commit -----------------------------------------------------------------------


async def test_group_commit_isolates_a_failing_job(make: Callable[..., Any], db_path: Path) -> None:
    gc: SqliteGlobalConfig = await make(SqliteGlobalConfig)
    db = gc.db
    running, gate = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        running.set()
        gate.wait(5)

    db.submit(hold)  # everything below queues up behind this job
    assert running.wait(5)
    batches = db.batches

    def insert(key: str) -> Callable[[sqlite3.Connection], str]:
        def job(conn: sqlite3.Connection) -> str:
            conn.execute(
                "INSERT INTO qtasks_global (ns, key, value) VALUES ('app', ?, '1')", (key,)
            )
            return key

        return job

    def failing(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO qtasks_global (ns, key, value) VALUES ('app', 'bad', '1')")
        raise ValueError("job failed after writing")

    jobs = [asyncio.ensure_future(db.run(fn)) for fn in (insert("a"), failing, insert("b"))]
    await asyncio.sleep(0.02)
    gate.set()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert results[0] == "a", results
    assert isinstance(results[1], ValueError), results
    assert results[2] == "b"
    assert db.batches == batches + 1  # all three in one transaction
    assert await gc.items() == {"a": 1, "b": 1}  # 'bad' was rolled back with its job


async def test_group_commit_batches_concurrent_publishes(make: Callable[..., Any]) -> None:
    broker: SqliteBroker = await make(SqliteBroker)
    db = broker.db
    batches = db.batches
    await asyncio.gather(*(broker.publish([env(str(i))]) for i in range(200)))
    assert db.batches - batches < 50
    assert await broker.queue_sizes(["q"]) == {"q": 200}


# -- processes --------------------------------------------------------------------------


def _claim_in_process(path: str, out: str, barrier: Any) -> None:
    async def main() -> list[str]:
        broker = SqliteBroker(path, namespace="race", config=FAST)
        await broker.start()
        barrier.wait()
        bodies: list[str] = []
        try:
            while batch := await broker.fetch(["q"], 25, 0.3):
                bodies += [d.body.decode() for d in batch]
                # Stand-in for running the batch: with no work between claims, one process
                # can take every row before a loaded machine schedules the other at all.
                await asyncio.sleep(0.02)
                await broker.ack(batch)
        finally:
            await broker.stop()
        return bodies

    Path(out).write_text(json.dumps(asyncio.run(main())))


@pytest.fixture
def spawn() -> Any:
    # spawn, not fork: forking a process with threads (pytest's, ours) is unsafe.
    return multiprocessing.get_context("spawn")


def test_processes_never_claim_the_same_row(db_path: Path, tmp_path: Path, spawn: Any) -> None:
    total = 2000

    async def publish() -> None:
        broker = SqliteBroker(db_path, namespace="race", config=FAST)
        await broker.start()
        await broker.publish([env(str(i)) for i in range(total)])
        await broker.stop()

    asyncio.run(publish())
    barrier = spawn.Barrier(2)
    outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
    procs = [
        spawn.Process(target=_claim_in_process, args=(str(db_path), out, barrier)) for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    claimed = [json.loads(Path(out).read_text()) for out in outs]
    every = claimed[0] + claimed[1]
    assert len(every) == total, "a row was claimed twice or not at all"
    assert set(every) == {str(i) for i in range(total)}
    assert all(claimed), "both processes should have taken part"


async def test_enqueue_is_one_transaction_with_same_file_storage(
    make: Callable[..., Any],
) -> None:
    broker: SqliteBroker = await make(SqliteBroker)
    storage: SqliteStorage = await make(SqliteStorage)
    message = TaskMessage(uuid=new_uuid(), name="t")
    envelope = Envelope(str(message.uuid), "q", 0, None, time.time(), b"m")
    batches = broker.db.batches
    await broker.enqueue(storage, [record_for(message)], [envelope])
    assert broker.db.batches == batches + 1
    assert await storage.get(str(message.uuid)) == record_for(message)
    assert await broker.queue_sizes(["q"]) == {"q": 1}


async def test_enqueue_failure_leaves_nothing(make: Callable[..., Any], db_path: Path) -> None:
    broker: SqliteBroker = await make(SqliteBroker)
    storage: SqliteStorage = await make(SqliteStorage)
    message = TaskMessage(uuid=new_uuid(), name="t")
    bad = Envelope(str(message.uuid), "q", 0, None, time.time(), None)  # type: ignore[arg-type]
    with pytest.raises(BrokerError):
        await broker.enqueue(storage, [record_for(message)], [bad])  # body NOT NULL fails
    assert await storage.get(str(message.uuid)) is None


def _claim_and_hang(path: str, claimed: Any) -> None:
    async def main() -> None:
        broker = SqliteBroker(path, namespace="kill", config=FAST)
        await broker.start()
        got = await broker.fetch(["q"], 5, 5.0)
        claimed.put(len(got))
        await asyncio.sleep(60)  # killed long before this ends

    asyncio.run(main())


async def test_killed_process_tasks_come_back(db_path: Path, spawn: Any) -> None:
    broker = SqliteBroker(db_path, namespace="kill", config=FAST)
    await broker.start()
    try:
        await broker.publish([env(str(i)) for i in range(5)])
        claimed = spawn.Queue()
        proc = spawn.Process(target=_claim_and_hang, args=(str(db_path), claimed))
        proc.start()
        try:
            assert claimed.get(timeout=20) == 5
        finally:
            proc.kill()
            proc.join(5)
            claimed.close()
            claimed.join_thread()
        assert await broker.fetch(["q"], 10, 0.05) == []  # still held by the dead process
        start = time.monotonic()
        got = await drain_all(broker)
        assert sorted(d.body for d in got) == [str(i).encode() for i in range(5)]
        assert {d.delivery_count for d in got} == {2}
        assert time.monotonic() - start < FAST.worker_lost_after_seconds + 1.0
    finally:
        await broker.stop()


async def drain_all(broker: SqliteBroker) -> list[Any]:
    """Fetch until five messages came back (or 3 s passed)."""
    out: list[Any] = []
    deadline = time.monotonic() + 3
    while len(out) < 5 and time.monotonic() < deadline:
        out += await broker.fetch(["q"], 10, 0.5)
    return out
