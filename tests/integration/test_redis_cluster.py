"""The Redis backend on a 3-master Redis Cluster started for this module.

Three private `redis-server --cluster-enabled yes` on free ports joined by
`redis-cli --cluster create`, torn down after the module. The contract suites run against
it (`redis://host:port?cluster=true`), plus a worker process end to end. Each app's keys
share one hash slot, so namespaces land on different masters: the link finds its master.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from qtasks import TaskStatusEnum
from qtasks import _redis as redis_link
from qtasks.brokers.redis import RedisBroker
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
        pytest.skip("redis-server and redis-cli are needed for the Cluster tests")
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
