"""The Redis backend on a 3-master Redis Cluster started for this module.

Three private `redis-server --cluster-enabled yes` on free ports joined by
`redis-cli --cluster create`, torn down after the module. The contract suites run against
it (`redis://host:port?cluster=true`), plus a worker process end to end. Each app's keys
share one hash slot, so namespaces land on different masters: the link finds its master.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from qtasks import TaskStatusEnum
from qtasks import _redis as redis_link
from qtasks.brokers.redis import RedisBroker, message_id
from qtasks.message import DeadLetter, Envelope, Task, TaskMessage, new_uuid, record_for
from qtasks.storages.redis import RedisStorage
from tests.contract.conftest import (  # noqa: F401 - fixtures the suites below use
    Harness,
    broker,
    global_config,
    make_broker,
    make_storage,
    peer_broker,
    qconfig,
    started,
    storage,
)
from tests.contract.harness_redis import RedisHarness, delete_namespace
from tests.contract.test_broker_contract import *  # noqa: F403 - the broker suite, re-run here
from tests.contract.test_global_config_contract import *  # noqa: F403
from tests.contract.test_storage_contract import *  # noqa: F403

from ..servers import in_ci
from .test_redis_workers import Setup, wait_all

pytestmark = pytest.mark.redis


def _free_ports(n: int) -> list[int]:
    # A cluster node also listens on port + 10000 (the cluster bus): keep both free.
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`redis://127.0.0.1:<first port>/0?cluster=true` of a fresh 3-master cluster."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "redis-server and redis-cli are needed for the Cluster tests"
        if in_ci():
            pytest.fail(f"{message}; CI must provide them (see .ci/run)")
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("cluster")
    ports = _free_ports(3)
    procs = []
    try:
        for port in ports:
            data = folder / str(port)
            data.mkdir()
            args = (
                f"--port {port} --bind 127.0.0.1 --cluster-enabled yes --appendonly no"
                f" --dir {data} --cluster-config-file nodes-{port}.conf"
            )
            procs.append(
                subprocess.Popen(
                    [server, *args.split(), "--save", ""],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            _wait_port(port)
        nodes = [f"127.0.0.1:{p}" for p in ports]
        create = ["--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run([cli, *create], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        for port in ports:
            client = redis.Redis(port=port)
            try:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not become ready")
                    time.sleep(0.05)
            finally:
                client.close()
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)


class ClusterHarness(RedisHarness):
    """The Redis components on the module's cluster."""

    name = "redis-cluster"


@pytest.fixture
async def broker_harness(cluster_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = ClusterHarness(tmp_path, cluster_url)
    yield harness
    await harness.cleanup()


@pytest.fixture
async def storage_harness(cluster_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = ClusterHarness(tmp_path, cluster_url)
    yield harness
    await harness.cleanup()


@pytest.fixture
async def global_config_harness(cluster_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = ClusterHarness(tmp_path, cluster_url)
    yield harness
    await harness.cleanup()


async def test_namespaces_are_served_by_their_own_masters(cluster_url: str) -> None:
    # Each namespace's link asks which master serves its slot; across many namespaces
    # all three masters are used, and each works end to end.
    nodes = set()
    for _ in range(60):  # random names: all three masters are seen long before 60
        if len(nodes) == 3:
            break
        ns = f"spread-{uuid.uuid4().hex[:8]}"
        part_b = RedisBroker(cluster_url, namespace=ns)
        part_s = RedisStorage(cluster_url, namespace=ns)
        await part_b.start()
        await part_s.start()
        try:
            nodes.add(part_b.link.node_url)
            assert part_b.link is part_s.link
            assert await part_s.get("nothing") is None
            assert await part_b.queue_sizes(["q"]) == {"q": 0}
        finally:
            await part_s.stop()
            await part_b.stop()
    assert len(nodes) == 3
    assert not [k for k in redis_link._registry if k[0] == cluster_url]


async def test_worker_process_on_the_cluster(cluster_url: str, tmp_path: Path) -> None:
    s = Setup(tmp_path, f"cl-{uuid.uuid4().hex[:8]}", cluster_url)
    s.write_app()
    try:
        app = s.producer()
        worker = s.start_worker("--concurrency", "8")
        records = await app.add_tasks([("work", (i,)) for i in range(300)])
        finals = await wait_all(app, [r.uuid for r in records], 60)
        assert [f.returning for f in finals] == list(range(300))
        delayed = await app.add_task("when", time.time() + 0.3, delay=0.3)
        assert delayed is not None
        done = await app.wait(delayed.uuid, 10)
        assert done.returning >= delayed.eta
        # Results through sharded pub/sub (SSUBSCRIBE / SPUBLISH on the slot's master).
        for i in range(20):
            final = await app.add_task("work", i, timeout=10)
            assert final is not None
            assert final.status == TaskStatusEnum.SUCCESS
        assert worker.stop() == 0, worker.log()
    finally:
        await s.close()
        await delete_namespace(cluster_url, s.namespace)


# -- resharding: the app's slot moves to another master while tasks flow -------------------


class Resharder:
    """Moves one slot between the masters as `redis-cli --cluster reshard` does.

    IMPORTING on the target, MIGRATING on the source, MIGRATE the keys in batches, then
    SETSLOT NODE on every master (target, source, the others).
    """

    def __init__(self, cluster_url: str, namespace: str) -> None:
        seed = redis_link.parse_url(cluster_url).connect_url
        self.seed = redis.Redis.from_url(seed)
        self.slot = int(
            self.seed.execute_command("CLUSTER", "KEYSLOT", f"qtasks:{{{namespace}}}:x")
        )
        self.nodes: dict[str, tuple[str, int]] = {}
        owner = None
        for line in self.seed.execute_command("CLUSTER", "NODES").decode().splitlines():
            node_id, addr, flags, *_rest = line.split()
            if "master" not in flags:
                continue
            host, port = addr.split("@")[0].rsplit(":", 1)
            self.nodes[node_id] = (host, int(port))
            for part in line.split()[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= self.slot <= int(hi or lo):
                    owner = node_id
        assert owner is not None, f"nobody serves slot {self.slot}"
        self.source = owner
        self.target = next(n for n in sorted(self.nodes) if n != owner)
        self.clients = {n: redis.Redis(host=h, port=p) for n, (h, p) in self.nodes.items()}
        self.begun = False

    def url(self, node: str) -> str:
        host, port = self.nodes[node]
        return f"redis://{host}:{port}/0"

    def begin(self) -> None:
        src, dst = self.source, self.target
        self.clients[dst].execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", src)
        self.clients[src].execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", dst)
        self.begun = True

    def keys_on(self, node: str) -> list[bytes]:
        client = self.clients[node]
        return list(client.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1_000_000))

    def complete(self) -> None:
        """Finish a migration a failed test left half done (teardown deletes the keys)."""
        if self.begun:
            self.move()
            self.finish()

    def keys_left(self) -> int:
        return int(
            self.clients[self.source].execute_command("CLUSTER", "COUNTKEYSINSLOT", self.slot)
        )

    def move(self, at_most: int | None = None, batch: int = 50) -> int:
        """MIGRATE up to `at_most` of the slot's keys to the target; how many moved."""
        src = self.clients[self.source]
        host, port = self.nodes[self.target]
        moved = 0
        while at_most is None or moved < at_most:
            n = batch if at_most is None else min(batch, at_most - moved)
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, n)
            if not keys:
                break
            # No REPLACE: a key the app created on the target meanwhile fails with BUSYKEY.
            src.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        return moved

    def move_keys(self, keys: list[bytes], batch: int = 50) -> None:
        """MIGRATE these keys of the slot to the target."""
        host, port = self.nodes[self.target]
        for i in range(0, len(keys), batch):
            part = keys[i : i + batch]
            self.clients[self.source].execute_command(
                "MIGRATE", host, port, "", 0, 5000, "KEYS", *part
            )

    def heartbeats(self, namespace: str) -> tuple[float, list[float]]:
        """Redis TIME on the target, and the consumers' last beats there (ASKING)."""
        pipe = self.clients[self.target].pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.execute_command("ZRANGE", f"qtasks:{{{namespace}}}:consumers", 0, -1, "WITHSCORES")
        pipe.execute_command("TIME")
        _, pairs, (sec, usec) = pipe.execute()
        return int(sec) + int(usec) / 1e6, [float(score) for _, score in pairs]

    def finish(self) -> None:
        assert self.keys_left() == 0
        order = [
            self.target,
            self.source,
            *(n for n in self.nodes if n not in (self.target, self.source)),
        ]
        for node in order:
            self.clients[node].execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target)
        self.source, self.target = self.target, self.source
        self.begun = False

    def close(self) -> None:
        self.seed.close()
        for client in self.clients.values():
            client.close()


class Flow:
    """Enqueues tasks in small batches until stopped (a producer that keeps going)."""

    def __init__(self, app: Any, batch: int = 10, pause: float = 0.01) -> None:
        self.app = app
        self.batch = batch
        self.pause = pause
        self.uuids: list[str] = []
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            records = await self.app.add_tasks(
                [("work", (i + j, 0.002)) for j in range(self.batch)]
            )
            self.uuids += [str(r.uuid) for r in records]
            i += self.batch
            await asyncio.sleep(self.pause)

    async def stop(self) -> list[str]:
        self._stop.set()
        await self._task
        return self.uuids


def _record_cluster_errors(link: Any) -> set[str]:
    """What Cluster errors the link met (and ASKs it followed), as it goes."""
    seen: set[str] = set()
    fix, asking = link._fix_replies, link._send_asking

    async def fix_replies(commands: Any, replies: list[Any], *args: Any) -> Any:
        for command, reply in zip(commands, replies, strict=True):
            if "non local key" in str(reply):
                seen.add("non local key")
            elif isinstance(reply, redis.exceptions.AskError) and command[0] == "EVALSHA":
                seen.add("AskError (script)")
            elif isinstance(reply, Exception):
                seen.add(type(reply).__name__)
        return await fix(commands, replies, *args)

    async def send_asking(*args: Any) -> Any:
        seen.add("ask followed")
        return await asking(*args)

    link._fix_replies, link._send_asking = fix_replies, send_asking
    return seen


def _check_ledger(s: Setup, uuids: list[str]) -> None:
    ledger = s.ledger()
    starts = collections.Counter(w[1] for w in ledger if w[0] == "start")
    ends = collections.Counter(w[1] for w in ledger if w[0] == "end")
    assert set(ends) == set(uuids), "none lost"
    assert max(starts.values()) == 1, [u for u, n in starts.items() if n > 1]
    assert max(ends.values()) == 1, "none run twice"


@pytest.fixture
async def cluster_setup(cluster_url: str, tmp_path: Path) -> AsyncIterator[Setup]:
    s = Setup(tmp_path, f"mv-{uuid.uuid4().hex[:8]}", cluster_url)
    # Heartbeats fail while the app's slot is split between two masters: a lost-after
    # well above the migration keeps the live worker from being swept meanwhile.
    s.write_app(heartbeat=0.2, lost=10.0, sweep=0.2)
    try:
        yield s
    finally:
        await s.close()
        await delete_namespace(cluster_url, s.namespace)


@pytest.mark.timeout(60)
async def test_moved_slot_after_a_reshard_is_followed_and_nothing_is_lost(
    cluster_url: str, cluster_setup: Setup
) -> None:
    s = cluster_setup
    app = s.producer()
    worker = s.start_worker("--concurrency", "8")
    first = await app.add_tasks([("work", (i, 0.002)) for i in range(200)])
    await wait_all(app, [first[0].uuid], 30)  # the worker is up
    shard = Resharder(cluster_url, s.namespace)
    before = shard.url(shard.source)
    flow = Flow(app)
    try:
        await asyncio.sleep(0.3)
        # A complete migration, batch by batch, while tasks are enqueued, claimed, acked.
        await asyncio.to_thread(shard.begin)
        await asyncio.to_thread(shard.move)
        await asyncio.to_thread(shard.finish)
        await asyncio.sleep(0.5)
        uuids = [str(r.uuid) for r in first] + await flow.stop()
        # Waiting (GET after SSUBSCRIBE) follows MOVED to the new master as well.
        finals = await wait_all(app, uuids, 40)
        assert [f.status for f in finals] == [TaskStatusEnum.SUCCESS] * len(uuids)
        _check_ledger(s, uuids)
        link = app.broker.link  # type: ignore[attr-defined]
        assert link.node_url == shard.url(shard.source) != before, "the link moved with the slot"
        # New tasks after the move run and their results arrive by sharded pub/sub.
        final = await app.add_task("work", 7, timeout=10)
        assert final is not None
        assert final.returning == 7
        assert worker.stop() == 0, worker.log()
        assert "Traceback" not in worker.log(), worker.log()[-3000:]
    finally:
        if not flow._stop.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(flow.stop(), 5)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(shard.complete)
        shard.close()


@pytest.mark.timeout(60)
async def test_ask_during_a_migration_is_followed_and_nothing_is_lost(
    cluster_url: str, cluster_setup: Setup
) -> None:
    s = cluster_setup
    app = s.producer()
    worker = s.start_worker("--concurrency", "8")
    first = await app.add_tasks([("work", (i, 0.002)) for i in range(300)])
    await wait_all(app, [r.uuid for r in first], 30)
    # Due after the migration: its body keeps the bodies hash on the source meanwhile.
    later = await app.add_task("work", -1, delay=4.0)
    assert later is not None
    shard = Resharder(cluster_url, s.namespace)
    seen = _record_cluster_errors(app.broker.link)  # type: ignore[attr-defined]
    flow = Flow(app)
    try:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(shard.begin)
        # Half-way: the records, the ready set and the consumers (heartbeats) on the
        # target, the rest (the bodies hash...) still on the source.
        keys = [
            k
            for k in shard.keys_on(shard.source)
            if b":task:" in k or b":ready:" in k or k.endswith(b":consumers")
        ]
        await asyncio.to_thread(shard.move_keys, keys)
        # A record already moved: GET on the source says ASK, the link asks the target.
        moved = [
            k.decode().rpartition(":")[2]
            for k in shard.keys_on(shard.target)
            if b":task:" in k and k.decode().rpartition(":")[2] in {str(r.uuid) for r in first}
        ]
        source = redis.Redis.from_url(shard.url(shard.source))
        try:
            with pytest.raises(redis.exceptions.AskError):
                source.get(f"qtasks:{{{s.namespace}}}:task:{moved[0]}")
        finally:
            source.close()
        record = await asyncio.wait_for(app.get(moved[0]), 5)
        assert record is not None
        assert record.status == TaskStatusEnum.SUCCESS
        # Tasks keep being enqueued, claimed and settled mid-migration: the scripts that
        # meet a split slot (TRYAGAIN, ASK, a non-local key) wait for it to end.
        await asyncio.sleep(1.5)
        # GET of a moved record: ASK, followed. ENQUEUE (it declares the bodies hash,
        # on the source) stopped at its first record key: retried until the end.
        assert {"ask followed", "non local key"} <= seen, seen
        # The worker's heartbeat thread beats on the target meanwhile (ASKING + BEAT), so
        # however long a migration takes, the live worker is not swept.
        now, beats = await asyncio.to_thread(shard.heartbeats, s.namespace)
        assert beats, "the worker is registered"
        assert max(beats) > now - 1.0, (now, beats)
        await asyncio.to_thread(shard.move)
        await asyncio.to_thread(shard.finish)
        await asyncio.sleep(0.3)
        uuids = [str(r.uuid) for r in first] + await flow.stop() + [str(later.uuid)]
        finals = await wait_all(app, uuids, 40)
        assert [f.status for f in finals] == [TaskStatusEnum.SUCCESS] * len(uuids)
        _check_ledger(s, uuids)
        final = await app.add_task("work", 7, timeout=10)
        assert final is not None
        assert final.returning == 7
        assert worker.stop() == 0, worker.log()
        assert "Traceback" not in worker.log(), worker.log()[-3000:]
        assert "heartbeat" not in worker.log(), worker.log()[-3000:]
    finally:
        if not flow._stop.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(flow.stop(), 5)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(shard.complete)
        shard.close()


async def _move_whole_slot(cluster_url: str, namespace: str) -> Resharder:
    shard = Resharder(cluster_url, namespace)
    await asyncio.to_thread(shard.begin)
    await asyncio.to_thread(shard.move)
    await asyncio.to_thread(shard.finish)
    return shard


@pytest.mark.timeout(30)
async def test_a_connection_in_use_when_the_slot_moves_is_not_reused(cluster_url: str) -> None:
    # Regression: a connection busy during the move went back to the pool afterwards and,
    # popped first, got MOVED again and again (the link already pointed at the new node).
    ns = f"stale-{uuid.uuid4().hex[:8]}"
    part = RedisStorage(cluster_url, namespace=ns)
    await part.start()
    shard = None
    try:
        link = part.link
        await link.call("SET", part.keys.record("x"), "1")
        # Blocked on the source: Redis answers it MOVED once the slot has left.
        blocked = asyncio.ensure_future(
            link.run([("BLPOP", part.keys.wake("q"), "3")], read_timeout=10)
        )
        await asyncio.sleep(0.1)
        shard = await _move_whole_slot(cluster_url, ns)
        assert await asyncio.wait_for(link.call("GET", part.keys.record("x")), 3) == b"1"
        assert await asyncio.wait_for(blocked, 5) == [None]
        for _ in range(5):
            assert await asyncio.wait_for(link.call("GET", part.keys.record("x")), 1) == b"1"
        assert link.node_url == shard.url(shard.source)
    finally:
        await part.stop()
        if shard is not None:
            shard.close()
        await delete_namespace(cluster_url, ns)


@pytest.mark.timeout(30)
async def test_a_waiter_follows_its_channel_when_the_slot_moves(cluster_url: str) -> None:
    # Regression: the old master unsubscribes the sharded channels of a slot it gave
    # away (an unsolicited SUNSUBSCRIBE); a process that only waits must subscribe again
    # on the new master, or it never hears the result.
    ns = f"sub-{uuid.uuid4().hex[:8]}"
    part = RedisStorage(cluster_url, namespace=ns)
    await part.start()
    shard = None
    try:
        task = record_for(TaskMessage(uuid=new_uuid(), name="job", created_at=time.time()))
        await part.add([task])
        waiting = asyncio.ensure_future(part.wait(str(task.uuid), 20.0))
        await asyncio.sleep(0.2)
        shard = await _move_whole_slot(cluster_url, ns)
        await asyncio.sleep(0.5)  # the waiter's process sends no command meanwhile
        done = msgspec.structs.replace(
            task, status=TaskStatusEnum.SUCCESS, returning=5, finished_at=time.time()
        )
        await asyncio.to_thread(_save_elsewhere, cluster_url, ns, done)
        got = await asyncio.wait_for(waiting, 5)
        assert got is not None
        assert got.returning == 5
    finally:
        await part.stop()
        if shard is not None:
            shard.close()
        await delete_namespace(cluster_url, ns)


def _save_elsewhere(url: str, namespace: str, task: Task) -> None:
    """Save through a storage with its own loop and link, as another process would."""

    async def save() -> None:
        other = RedisStorage(url, namespace=namespace)
        await other.start()
        try:
            await other.save([task])
        finally:
            await other.stop()

    asyncio.run(save())


def _dump_keys(shard: Resharder, node: str) -> dict[bytes, bytes]:
    client = shard.clients[node]
    return {k: client.dump(k) for k in shard.keys_on(node)}  # type: ignore[misc]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("moved", ["ready", "wake"])
@pytest.mark.parametrize("operation", ["requeue", "release", "enqueue", "dead_letter"])
async def test_a_script_meeting_a_moved_key_writes_nothing_until_the_migration_ends(
    cluster_url: str, operation: str, moved: str
) -> None:
    # Regression: a script wrote, then met a key already migrated ("non local key"): Lua
    # keeps the writes, so REQUEUE/RELEASE had taken the message out of the in-flight hash
    # and ENQUEUE had stored its body, and the retry found nothing left to do: lost.
    # Now every script touches its keys before its first write.
    ns = f"touch-{uuid.uuid4().hex[:8]}"
    part = RedisBroker(cluster_url, namespace=ns)
    await part.start()
    shard = None
    try:
        k = part.keys
        now = time.time()
        first = Envelope(str(new_uuid()), "q", 0, None, now, b"first")
        second = Envelope(str(new_uuid()), "q", 1, None, now, b"second")
        await part.publish([first, second])
        claimed, other = await part.fetch(["q"], 2, 1.0)
        assert claimed.body == b"first"
        # Deferred with its count kept: the counts hash (a declared key) exists, so the
        # scripts run on the source rather than being turned away up front.
        second = Envelope(second.uuid, "q", 1, None, time.time(), b"second", deliveries=1)
        await part.requeue([(other, second)])
        shard = Resharder(cluster_url, ns)
        await asyncio.to_thread(shard.begin)
        # One key the scripts write late moves; the others they write are on the source.
        key = k.ready("q") if moved == "ready" else k.wake("q")
        await asyncio.to_thread(shard.move_keys, [key.encode()])
        before = await asyncio.to_thread(_dump_keys, shard, shard.source)
        third = Envelope(str(new_uuid()), "q", 0, None, now, b"third")
        again = Envelope(first.uuid, "q", 0, None, time.time(), b"again")
        if operation == "requeue":
            running = asyncio.ensure_future(part.requeue([(claimed, again)]))
            expected = {message_id(again): b"again", message_id(second): b"second"}
        elif operation == "release":
            running = asyncio.ensure_future(part.release([claimed]))
            expected = {message_id(first): b"first", message_id(second): b"second"}
        elif operation == "dead_letter":
            # Its dead-letter keys exist nowhere yet: written late, they stop it too.
            letter = DeadLetter(
                uuid=first.uuid, queue="q", reason="failed", body=b"first", dead_at=time.time()
            )
            running = asyncio.ensure_future(part.dead_letter([(claimed, letter)]))
            expected = {message_id(second): b"second"}
        else:
            running = asyncio.ensure_future(part.publish([third]))
            expected = {message_id(second): b"second", message_id(third): b"third"}
        await asyncio.sleep(0.6)
        assert not running.done(), "it waits for the migration"
        assert await asyncio.to_thread(_dump_keys, shard, shard.source) == before
        await asyncio.to_thread(shard.move)
        await asyncio.to_thread(shard.finish)
        await asyncio.wait_for(running, 10)
        ready = await part.link.call("ZRANGE", k.ready("q"), 0, -1)
        assert sorted(ready) == sorted(m.encode() for m in expected), "each once, none lost"
        bodies = await part.link.call("HMGET", k.bodies, *expected)
        assert bodies == list(expected.values())
        inflight = await part.link.call("HGETALL", k.inflight(part.consumer_id))
        assert len(inflight) == (2 if operation == "enqueue" else 0)
        assert not await part.link.call("HEXISTS", k.counts, message_id(first))
        letters = await part.dead_letters(["q"])
        assert [d.uuid for d in letters] == ([first.uuid] if operation == "dead_letter" else [])
    finally:
        await part.stop()
        if shard is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(shard.complete)
            shard.close()
        await delete_namespace(cluster_url, ns)
